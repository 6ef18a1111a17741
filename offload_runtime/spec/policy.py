"""Which tree a request speculates with: a tree given for the call, else what the plan for its sampling regime
chose (Sequoia's static tree, or trees grown per step from the draft's probabilities), else the default for the
device.

Plans are made per sampling regime (greedy, or a temperature and top-p), because the best tree differs:
greedy acceptance is concentrated on the draft's first choice (deep, narrow trees), sampled acceptance is
spread over ranks (wider ones). A greedy request takes the greedy plan; a sampled one the plan of its own
settings, else the sampled plan nearest to them.

Modes: "auto" follows each plan's choice (static without a plan); "static" takes the planned static tree (or, for
another size or depth, the best static tree for the plan's acceptance vector); "dynamic" grows trees with the
plan's budget and calibration (spec/growth.py), or the device's default budget keyed by the draft's own
probabilities when no plan measured one. A size or depth given overrides the plan's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..errors import UsageError
from ..model.tree import Tree
from .growth import AcceptanceModel, DynamicTree
from .tree_search import DEFAULT_ACCEPTANCE, best_tree

TreeSpec = Tree | DynamicTree
MODES = ("auto", "static", "dynamic")


def default_tree(device: torch.device) -> Tree:
    """Without a plan: a GPU verifies a bigger tree for about the price of one token (more so when streaming);
    a CPU's verification cost grows with the tree at once."""
    cuda = torch.device(device).type == "cuda"
    return best_tree(DEFAULT_ACCEPTANCE, 64 if cuda else 16, 8 if cuda else 6)[1]


def default_dynamic(device: torch.device, acceptance: AcceptanceModel | None = None) -> DynamicTree:
    """Without a plan's budget: the default static tree's size; deeper, since growth spends depth only where the
    draft is confident."""
    cuda = torch.device(device).type == "cuda"
    return DynamicTree(64 if cuda else 16, 12 if cuda else 8, acceptance=acceptance)


def tree_option(tree: Any, size: int | None = None, depth: int | None = None
                ) -> tuple[str, TreeSpec | None]:
    """(mode, fixed tree) from the `tree`, `tree_size` and `tree_depth` options; UsageError on bad values."""
    for label, value in (("tree_size", size), ("tree_depth", depth)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{label} must be a whole number >= 1, got {value!r}")
    if tree is None:
        return "auto", None
    if isinstance(tree, str):
        if tree not in MODES:
            raise UsageError(f"tree must be one of {', '.join(MODES)} or a parent array, got {tree!r}")
        return tree, None
    if isinstance(tree, DynamicTree):
        return "dynamic", DynamicTree(size or tree.size, depth or tree.depth, tree.width, tree.acceptance)
    if size is not None or depth is not None:
        raise UsageError("tree_size and tree_depth size a 'static' or 'dynamic' tree; a parent array is a tree "
                         "already: drop them or pass tree='static' / 'dynamic'")
    try:
        return "auto", Tree.of(tree)
    except (ValueError, TypeError) as e:
        raise UsageError(f"invalid tree: {e}") from None


@lru_cache(maxsize=64)
def static_tree(p: tuple[float, ...], n: int, d: int) -> Tree:
    """Sequoia's best tree of at most n nodes and depth <= d for acceptance vector p (cached: the DP takes a while)."""
    return best_tree(p, n, d)[1]


@dataclass(frozen=True)
class PlannedTree:
    temperature: float
    top_p: float
    tree: Tree  # the plan's static tree
    source: str  # where it came from, for messages (a plan file)
    policy: str = "static"  # what the plan chose: "static" or "dynamic"
    dynamic: DynamicTree | None = None  # the plan's dynamic budget and calibration (None: not measured)
    acceptance: tuple[float, ...] = ()  # the plan's acceptance vector (static trees of other sizes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TreePolicy:
    def __init__(self, default: Tree, planned: Sequence[PlannedTree] = (), fixed: TreeSpec | None = None, *,
                 mode: str = "auto", size: int | None = None, depth: int | None = None,
                 default_grown: DynamicTree | None = None):
        assert mode in MODES, mode
        self.default, self.planned, self.fixed = default, tuple(planned), fixed
        self.mode, self.size, self.depth = mode, size, depth
        self.default_grown = default_grown or DynamicTree(len(default), max(1, default.max_depth))

    @classmethod
    def one(cls, tree: TreeSpec) -> "TreePolicy":
        return cls(tree if isinstance(tree, Tree) else Tree([-1]), fixed=tree)

    def choose(self, temperature: float, top_p: float) -> PlannedTree | None:
        """The plan for these settings, or None (then the defaults serve)."""
        if self.fixed is not None:
            return None
        same_kind = [p for p in self.planned if p.greedy == (temperature == 0)]
        if not same_kind:
            return None
        return min(same_kind, key=lambda p: (abs(p.temperature - temperature) + abs(p.top_p - top_p)))

    def policy_for(self, temperature: float, top_p: float, mode: str | None = None) -> str:
        """"static" or "dynamic": what a request with these settings gets in `mode` (None: the policy's own)."""
        mode = mode or self.mode
        if mode != "auto":
            return mode
        chosen = self.choose(temperature, top_p)
        return chosen.policy if chosen is not None else "static"

    def tree_for(self, temperature: float, top_p: float, mode: str | None = None) -> TreeSpec:
        if self.fixed is not None:
            return self.fixed
        chosen = self.choose(temperature, top_p)
        if self.policy_for(temperature, top_p, mode) == "dynamic":
            base = chosen.dynamic if chosen is not None and chosen.dynamic is not None else self.default_grown
            return replace(base, size=self.size or base.size, depth=self.depth or base.depth)
        base_tree = chosen.tree if chosen is not None else self.default
        if self.size is None and self.depth is None:
            return base_tree
        p = chosen.acceptance if chosen is not None and chosen.acceptance else DEFAULT_ACCEPTANCE
        return static_tree(tuple(p), self.size or len(base_tree), self.depth or max(1, base_tree.max_depth))

    @property
    def largest(self) -> int:
        """Nodes of the largest tree any request may get (the device budget holds its activations)."""
        sizes = [len(self.default), self.default_grown.size]
        sizes += [len(p.tree) for p in self.planned] + [p.dynamic.size for p in self.planned if p.dynamic]
        if self.fixed is not None:
            sizes.append(len(self.fixed) if isinstance(self.fixed, Tree) else self.fixed.size)
        if self.size is not None:
            sizes.append(self.size)
        return max(sizes)
