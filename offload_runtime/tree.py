"""Token trees as parent arrays.

A tree is a parent array in breadth-first order: node 0 is the root (the last accepted token, whose K/V is not
cached yet; parents[0] == -1), parents[i] < i, depths never decrease with the index, and the children of a node
appear in index order = the order in which the draft sampled them (the k-th child has rank k).

The same structure describes a prompt chunk (a chain) followed by a speculative tree, which is how one forward
both catches a cache up and verifies a tree.
"""
from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch


class Tree:
    def __init__(self, parents: Sequence[int]):
        parents = [int(p) for p in parents]
        if not parents or parents[0] != -1:
            raise ValueError("a tree needs a root: parents[0] must be -1")
        depth = [0] * len(parents)
        for i in range(1, len(parents)):
            p = parents[i]
            if not 0 <= p < i:
                raise ValueError(f"parents[{i}] = {p}: every parent must come before its child")
            depth[i] = depth[p] + 1
            if depth[i] < depth[i - 1]:
                raise ValueError(f"node {i} is shallower than node {i - 1}: nodes must be in breadth-first order")
        self.parents: tuple[int, ...] = tuple(parents)
        self.depth: tuple[int, ...] = tuple(depth)

    def __len__(self) -> int:
        return len(self.parents)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and self.parents == other.parents

    def __hash__(self) -> int:
        return hash(self.parents)

    def __repr__(self) -> str:
        return f"Tree(n={len(self)}, depth={self.max_depth}, parents={list(self.parents)[:16]}{'...' if len(self) > 16 else ''})"

    @property
    def max_depth(self) -> int:
        return self.depth[-1]

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, p in enumerate(self.parents[1:], start=1):
            kids[p].append(i)
        return tuple(tuple(k) for k in kids)

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

    def path_to(self, node: int) -> list[int]:
        """Root-to-node path, root included."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def graft(self, chain_len: int) -> "Tree":
        """A chain of `chain_len` nodes with this tree hanging from its last node (a prompt chunk + a tree)."""
        if chain_len == 0:
            return self
        parents = [-1] + list(range(chain_len - 1)) + [p + chain_len if p >= 0 else chain_len - 1 for p in self.parents]
        return Tree(parents)

    @classmethod
    def chain(cls, n: int) -> "Tree":
        return cls([-1] + list(range(n - 1)))
