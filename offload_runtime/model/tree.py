"""Token trees: the one `Tree` type, with the one rule for a valid tree.

A tree is a parent array in breadth-first order:
- node 0 is the root (the last accepted token, whose K/V is not cached yet): parents[0] == -1;
- every other node's parent comes before it (0 <= parents[i] < i);
- parents never decrease with the index (parents[i] >= parents[i - 1]).

The last rule is what "breadth-first" means here: children are grouped by parent, parents in index order,
so depths never decrease and each depth is one contiguous range of indices (the draft runs one level per
forward). The children of a node appear in the order the draft sampled them: the k-th child has rank k.

The same structure describes a prompt chunk (a chain) followed by a speculative tree (`graft`), which is how
one forward both catches a cache up and verifies a tree.
"""
from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch


class Tree:
    """A parent array (iterating a Tree gives its parents) with the derived structure cached."""

    def __init__(self, parents: Sequence[int]):
        parents = [int(p) for p in parents]
        if not parents or parents[0] != -1:
            raise ValueError("a tree's parent array must start with the root, parents[0] == -1")
        depth = [0] * len(parents)
        for i in range(1, len(parents)):
            p = parents[i]
            if not 0 <= p < i:
                raise ValueError(f"parents[{i}] = {p}: every non-root node needs a parent with a smaller index")
            if p < parents[i - 1]:
                raise ValueError(f"parents[{i}] = {p} < parents[{i - 1}] = {parents[i - 1]}: nodes must be in "
                                 f"breadth-first order (children grouped by parent, parents in index order)")
            depth[i] = depth[p] + 1
        self.parents: tuple[int, ...] = tuple(parents)
        self.depth: tuple[int, ...] = tuple(depth)

    @classmethod
    def of(cls, tree: "Tree | Sequence[int]") -> "Tree":
        """`tree` itself, or the Tree of a parent array."""
        return tree if isinstance(tree, Tree) else cls(tree)

    @classmethod
    def chain(cls, n: int) -> "Tree":
        return cls([-1] + list(range(n - 1)))

    def __len__(self) -> int:
        return len(self.parents)

    def __iter__(self):
        return iter(self.parents)

    def __getitem__(self, i: int) -> int:
        return self.parents[i]

    def __eq__(self, other: object) -> bool:
        # A tree is its parent array: it equals another Tree, list or tuple with the same parents.
        if isinstance(other, Tree):
            return self.parents == other.parents
        if isinstance(other, (list, tuple)):
            return list(self.parents) == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.parents)

    def __repr__(self) -> str:
        more = "..." if len(self) > 16 else ""
        return f"Tree(n={len(self)}, depth={self.max_depth}, parents={list(self.parents)[:16]}{more})"

    @property
    def max_depth(self) -> int:
        return self.depth[-1]

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[u]: u's children in sampling order."""
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, p in enumerate(self.parents[1:], start=1):
            kids[p].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        """Each node's 1-based rank among its siblings (0 for the root)."""
        rank = [0] * len(self)
        for kids in self.children:
            for k, child in enumerate(kids, start=1):
                rank[child] = k
        return tuple(rank)

    @cached_property
    def levels(self) -> tuple[range, ...]:
        """Node index ranges of each depth (contiguous, by breadth-first order)."""
        bounds = [0]
        for i in range(1, len(self)):
            if self.depth[i] != self.depth[i - 1]:
                bounds.append(i)
        bounds.append(len(self))
        return tuple(range(a, b) for a, b in zip(bounds, bounds[1:]))

    @cached_property
    def internal(self) -> tuple[int, ...]:
        """Nodes with children: the ones the draft must run forward to sample the next level."""
        return tuple(i for i, k in enumerate(self.children) if k)

    @cached_property
    def internal_per_level(self) -> tuple[int, ...]:
        """How many nodes of each depth have children: the width of each draft forward."""
        widths = [0] * self.max_depth
        for u in self.internal:
            widths[self.depth[u]] += 1
        return tuple(widths)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: mask[i, j] is True when j is i or an ancestor of i (what node i may attend to)."""
        n = len(self)
        if self.max_depth == n - 1:  # a chain (prompt chunks): causal
            return torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.zeros(n, n, dtype=torch.bool)
        parents = torch.tensor(self.parents)
        # One vectorised copy per level: every parent lies in the previous level.
        for level in self.levels:
            idx = torch.arange(level.start, level.stop)
            if level.start:
                mask[idx] = mask[parents[idx]]
            mask[idx, idx] = True
        return mask

    def graft(self, chain_len: int) -> "Tree":
        """A chain of `chain_len` nodes with this tree hanging from its last node (a prompt chunk + a tree)."""
        if chain_len == 0:
            return self
        parents = [-1] + list(range(chain_len - 1)) + [p + chain_len if p >= 0 else chain_len - 1 for p in self.parents]
        return Tree(parents)
