"""Which tree a request speculates with: a tree given for the call, else the one planned for its sampling
regime, else the default tree for the device.

Plans are made per sampling regime (greedy, or a temperature and top-p), because the best tree differs:
greedy acceptance is concentrated on the draft's first choice (deep, narrow trees), sampled acceptance is
spread over ranks (wider ones). A greedy request takes the greedy plan; a sampled one the plan of its own
settings, else the sampled plan nearest to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.tree import Tree
from .tree_search import DEFAULT_ACCEPTANCE, best_tree


def default_tree(device: torch.device) -> Tree:
    """Without a plan: a GPU verifies a bigger tree for about the price of one token (more so when streaming);
    a CPU's verification cost grows with the tree at once."""
    cuda = torch.device(device).type == "cuda"
    return best_tree(DEFAULT_ACCEPTANCE, 64 if cuda else 16, 8 if cuda else 6)[1]


@dataclass(frozen=True)
class PlannedTree:
    temperature: float
    top_p: float
    tree: Tree
    source: str  # where it came from, for messages (a plan file)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TreePolicy:
    def __init__(self, default: Tree, planned: Sequence[PlannedTree] = (), fixed: Tree | None = None):
        self.default, self.planned, self.fixed = default, tuple(planned), fixed

    @classmethod
    def one(cls, tree: Tree) -> "TreePolicy":
        return cls(tree, fixed=tree)

    def choose(self, temperature: float, top_p: float) -> PlannedTree | None:
        """The planned tree for these settings, or None (then the default serves)."""
        if self.fixed is not None:
            return None
        same_kind = [p for p in self.planned if p.greedy == (temperature == 0)]
        if not same_kind:
            return None
        return min(same_kind, key=lambda p: (abs(p.temperature - temperature) + abs(p.top_p - top_p)))

    def tree_for(self, temperature: float, top_p: float) -> Tree:
        if self.fixed is not None:
            return self.fixed
        chosen = self.choose(temperature, top_p)
        return self.default if chosen is None else chosen.tree

    @property
    def largest(self) -> int:
        """Nodes of the largest tree any request may get (the device budget holds its activations)."""
        trees = [self.default] + [p.tree for p in self.planned] + ([self.fixed] if self.fixed else [])
        return max(len(t) for t in trees)
