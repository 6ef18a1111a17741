"""Dynamic trees: each step's tree grown best-first from the draft's own probabilities, kept lossless.

Sequoia's static tree assumes the k-th child of any node is accepted with the same probability p[k]. The draft
knows more at every node: where its distribution is peaked, its first guess is almost surely right and a deep
chain pays; where it is flat, width pays. `TreeGrowth` grows one row's tree per step from that knowledge, one
draft forward per level (the decoder runs every row's level in the same forward).

Keys. A *slot* (u, r) is "the r-th child drawn at node u". Its key estimates the chance that the verifier
accepts the node it would hold:

    key(root) = 1,    key(u, r) = key(u) * a_u(r)

where a_u(r) in [0, 1], non-increasing in r, comes from an `AcceptanceModel` applied to Q_u, the draft's
distribution at u (its sorted probabilities), *before* u's children are drawn. Keys never increase down the
tree or along siblings. Nodes are ranked by key, ties by breadth-first index (so a parent ranks above its
children and an earlier sibling above a later one: a total order of every potential node).

Growth, with budget n nodes (root included), depth limit d and level width w:
  1. a forward over level m's nodes gives their Q and so the keys of every level m+1 slot;
  2. a slot is drawn when fewer than n - 1 drawn nodes and chosen slots rank above it, fewer than w chosen
     slots of its level do, and its key is above DRAW_FLOOR times the floor predicted for the step; each node's
     chosen slots are ranks 1..k (keys fall with the rank), so its k children are drawn at once, without
     replacement (Gumbel-top-k, or the top k at temperature 0);
  3. after level d (or when nothing more is drawn) the tree keeps the root and the n - 1 highest ranked nodes,
     renumbered breadth-first with siblings in draw order.
With w = n - 1 this is exactly the n best nodes of the infinite tree of depth <= d under these keys (a best-first
search); a smaller w bounds each draft forward. Nodes that have already dropped out of the n - 1 best are
never run through the draft again (their children could only rank lower).

Losslessness. Every decision about a node (drawn? kept?) depends only on the keys, tokens and Q of the nodes
that rank above it, on its own key, which is known before it is drawn, and on what is fixed before the step
(n, d, w, the room left in the context, the predicted floor). The kept tree is closed under parent and earlier
sibling. spec/verify.py (`_walk`) proves that Sequoia's verifier is lossless for trees so
grown; it would not be if a node were kept for its own drawn token (e.g. pruned by its own draft probability).
At temperature 0 the verification is by argmax and any tree is lossless.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np

from ..model.tree import Tree
from .tree_search import best_first_growth_curve

__all__ = ["AcceptanceModel", "ConfidenceAcceptance", "DraftProbabilities", "DynamicTree", "GrownTree",
           "PositionalAcceptance", "TreeGrowth"]


# --- estimating a_u(r) before the children are drawn


class AcceptanceModel(Protocol):
    """a_u(r) from Q_u: maps each row of sorted draft probabilities [rows, R] (descending) to [rows, R] in [0, 1].

    `ceiling` bounds a_u(1) over every Q: a node whose key times it cannot beat the n - 1 best is not run through
    the draft (none of its children could be drawn). `marginal` is the positional acceptance vector the model
    averages to (None: unknown); growth uses it to predict where the n - 1 best will end."""

    @property
    def ceiling(self) -> float: ...

    @property
    def marginal(self) -> tuple[float, ...] | None: ...

    def estimate(self, top: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...


def _monotone(a: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Clip to [0, 1], zero where the draft has no mass left (the support is smaller than the rank), and make each
    row non-increasing, so keys never grow along siblings."""
    a = np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0)
    a = np.where(top > 0, a, 0.0)
    return np.minimum.accumulate(a, axis=-1)


@dataclass(frozen=True)
class DraftProbabilities:
    """a_u(r) = the draft's own probability of its r-th likeliest token (EAGLE-2's and SpecExec's score).

    Needs no measurement; good when the draft is calibrated. A poorly calibrated draft (the demo's is far
    under-confident: its top token has 0.30 of the mass on average but is the target's greedy choice 79% of the
    time) makes it favour width over depth; `ConfidenceAcceptance` corrects that from a measurement.
    """

    ceiling = 1.0
    marginal = None

    def estimate(self, top: np.ndarray) -> np.ndarray:
        return _monotone(top, top)

    def describe(self) -> str:
        return "the draft's own probabilities"


@dataclass(frozen=True)
class PositionalAcceptance:
    """a_u(r) = p[r], Sequoia's positional acceptance, whatever Q_u: growth then gives Sequoia's static best-first
    tree (the same for every step). For comparisons."""

    p: tuple[float, ...]

    @property
    def ceiling(self) -> float:
        return min(1.0, max(self.p, default=0.0))

    @property
    def marginal(self) -> tuple[float, ...]:
        return self.p

    def estimate(self, top: np.ndarray) -> np.ndarray:
        a = np.zeros(top.shape)
        w = min(len(self.p), top.shape[-1])
        a[:, :w] = self.p[:w]
        return _monotone(a, top)

    def describe(self) -> str:
        return "the positional acceptance vector"


@dataclass(frozen=True)
class ConfidenceAcceptance:
    """a_u(r) = p[r | the draft's top probability at u falls in bin b]: Sequoia's acceptance vector measured
    separately for each level of the draft's confidence (planner/acceptance.py measures it in the same run as p).

    `edges` are the B - 1 inner bin edges (increasing) over the draft's largest probability q_(1); `table[b]` is
    the acceptance vector of bin b. Its average over the bins, weighted by their steps, is Sequoia's p.
    """

    edges: tuple[float, ...]
    table: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        assert len(self.table) == len(self.edges) + 1 and self.table, "one acceptance vector per bin"
        assert all(b > a for a, b in zip(self.edges, self.edges[1:])), "bin edges must increase"
        assert len({len(row) for row in self.table}) == 1, "every bin's vector has the same width"

    @property
    def ceiling(self) -> float:
        return min(1.0, max(max(row) for row in self.table))

    @property
    def marginal(self) -> tuple[float, ...]:
        # Quantile bins hold about as many steps each.
        return tuple(float(x) for x in np.mean(np.asarray(self.table), axis=0))

    def estimate(self, top: np.ndarray) -> np.ndarray:
        table = np.asarray(self.table, dtype=np.float64)
        b = np.searchsorted(np.asarray(self.edges), top[:, 0], side="right")
        a = np.zeros(top.shape)
        w = min(table.shape[1], top.shape[-1])
        a[:, :w] = table[b, :w]
        return _monotone(a, top)

    def describe(self) -> str:
        return f"the acceptance vector by draft confidence ({len(self.table)} bins)"

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "table": [list(r) for r in self.table]}

    @classmethod
    def from_dict(cls, data: dict) -> "ConfidenceAcceptance":
        return cls(tuple(float(x) for x in data["edges"]), tuple(tuple(float(x) for x in r) for r in data["table"]))

    @classmethod
    def from_counts(cls, confidence: Sequence[float], ranks: Sequence[int], width: int, bins: int = 8,
                    prior: float = 8.0) -> "ConfidenceAcceptance":
        """Fit from one-level-tree steps: the draft's top probability at the root and the accepted rank (0: none).

        Bins are quantiles of the confidence; each bin's vector is shrunk toward the pooled one with `prior`
        pseudo-steps, so a thin bin does not claim certainty it has not seen.
        """
        conf = np.asarray(confidence, dtype=np.float64)
        rank = np.asarray(ranks, dtype=np.int64)
        assert conf.shape == rank.shape and conf.size, "one confidence per step"
        hits = np.zeros((conf.size, width))
        took = rank > 0
        hits[np.flatnonzero(took), rank[took] - 1] = 1.0
        pooled = hits.mean(axis=0)
        edges = np.unique(np.quantile(conf, np.linspace(0, 1, bins + 1)[1:-1]))
        b = np.searchsorted(edges, conf, side="right")
        table = []
        for k in range(len(edges) + 1):
            mine = hits[b == k]
            table.append(tuple(float(x) for x in (mine.sum(axis=0) + prior * pooled) / (len(mine) + prior)))
        return cls(tuple(float(e) for e in edges), tuple(table))


# Slots whose key is below this fraction of the predicted final floor (the key of the (n-1)-th best node in the
# positional tree of the model's marginal acceptance) are not drawn. On the demo pair the final floor of grown
# trees is above 0.65 of the prediction in 95% of steps, and the shallow levels no longer draw the long tail of
# low-rank children that deeper nodes push out later (at 64 nodes: ~3x fewer nodes through the draft).
DRAW_FLOOR = 0.5


@lru_cache(maxsize=256)
def predicted_floor(p: tuple[float, ...], n: int, d: int) -> float:
    """The n-th largest path product (the root's 1 first) of the positional tree of depth <= d: where the n best
    nodes end if every node's children are accepted with probabilities p."""
    if n < 2 or d < 1 or not p:
        return 0.0
    G = best_first_growth_curve(np.minimum.accumulate(np.clip(np.asarray(p, dtype=np.float64), 0, 1)), n, d)
    return float(G[n] - G[n - 1])


# --- the policy


@dataclass(frozen=True)
class DynamicTree:
    """Grow each step's tree: at most `size` nodes (the root included), depth <= `depth`, at most `width` nodes
    drawn per level (None: size - 1, an exact best-first search), keys from `acceptance` (None: the draft's own
    probabilities)."""

    size: int
    depth: int
    width: int | None = None
    acceptance: AcceptanceModel | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert self.size >= 1 and self.depth >= 0 and (self.width is None or self.width >= 1), self

    @property
    def model(self) -> AcceptanceModel:
        return self.acceptance if self.acceptance is not None else DraftProbabilities()

    @property
    def max_width(self) -> int:
        return max(0, min(self.width or self.size - 1, self.size - 1))

    def describe(self) -> str:
        return f"dynamic trees of up to {self.size} nodes, depth <= {self.depth}, keyed by {self.model.describe()}"


@dataclass(frozen=True)
class GrownTree:
    """The tree one growth kept: its shape, its tokens, and for each node the draft-chunk index it was drawn at
    (its breadth-first index among every drawn node) and whether the draft ran it forward."""

    tree: Tree
    tokens: list[int]
    drawn_index: list[int]
    ran: list[bool]


class TreeGrowth:
    """One row's tree while it grows, level by level (see the module docstring for the rules).

        g = TreeGrowth(spec, root_token, room)
        while g.frontier:                   # nodes to run through the draft now
            top = ...                       # sorted draft probabilities at g.frontier, [len(frontier), R]
            k = g.expand(spec.model.estimate(top))   # children to draw at each frontier node
            g.add_children(drawn)           # their tokens, k[i] per node in draw order; returns who dropped out
        grown = g.finish()
    """

    def __init__(self, spec: DynamicTree, root_token: int, room: int):
        self.spec = spec
        self.budget = spec.size - 1  # nodes besides the root
        # The draft writes every drawn node's K/V at its own slot, so all of them must fit in the context left.
        self.width = min(spec.max_width, (room - 1) // spec.depth) if spec.depth > 0 else 0
        self.parents: list[int] = [-1]
        self.keys: list[float] = [1.0]
        self.tokens: list[int] = [int(root_token)]
        self.ran: list[bool] = [False]
        self.alive: list[bool] = [True]
        self.level = 0
        self.frontier: list[int] = [0] if self.budget > 0 and self.width > 0 else []
        self._k: list[int] = []
        self._chosen: list[list[float]] = []
        self._tree: Tree | None = None
        marginal = spec.model.marginal
        self.min_key = DRAW_FLOOR * predicted_floor(tuple(marginal), spec.size, spec.depth) if marginal else 0.0

    def _floor(self, existing: np.ndarray) -> float:
        """Keys at or below this cannot be drawn: the (n-1)-th live key once there are n - 1 (`existing`: the live
        keys, descending), and never less than `min_key`."""
        return max(existing[self.budget - 1] if len(existing) >= self.budget else 0.0, self.min_key)

    @property
    def max_children(self) -> int:
        """The most children one node can get: the width of the probabilities `expand` needs."""
        return min(self.width, self.budget)

    def tree(self) -> Tree:
        """Every node drawn so far, in draw order (a breadth-first tree: each level's children are appended grouped
        by parent, parents in order, siblings in draw order)."""
        if self._tree is None or len(self._tree) != len(self.parents):
            self._tree = Tree(self.parents)
        return self._tree

    def _alive_keys(self) -> np.ndarray:
        """Keys of the live non-root nodes, descending."""
        keys = np.array([k for i, k in enumerate(self.keys) if i and self.alive[i]], dtype=np.float64)
        return -np.sort(-keys)

    def expand(self, a: np.ndarray) -> list[int]:
        """How many children to draw at each frontier node, from a_u(r) [len(frontier), R] (non-increasing rows)."""
        F = len(self.frontier)
        a = np.asarray(a, dtype=np.float64)[:, : self.max_children]
        assert a.shape[0] == F, (a.shape, F)
        assert np.all((a >= 0) & (a <= 1)) and np.all(np.diff(a, axis=1) <= 0), "a_u(r) must fall with r in [0, 1]"
        keys = np.asarray([self.keys[u] for u in self.frontier])[:, None] * a  # [F, R]
        existing = self._alive_keys()
        # Slots that could still make the n - 1 best: a positive key, above the floor.
        node, rank = np.nonzero(keys > self._floor(existing))
        cand = keys[node, rank]
        # Rank order: key descending, then breadth-first (parent's draw order, then rank).
        order = np.lexsort((rank, node, -cand))
        cand, node = cand[order], node[order]
        # Existing nodes are shallower, so they win ties: count those with a key >= the slot's.
        above = np.searchsorted(-existing, -cand, side="right")
        ok = above + np.arange(len(cand)) < self.budget
        take = int(np.argmin(ok)) if not ok.all() else len(cand)
        take = min(take, self.width)
        self._k = np.bincount(node[:take], minlength=F).tolist()
        # The chosen slots of each node are its ranks 1..k (keys fall with the rank); keep their keys.
        self._chosen = [keys[i, :k].tolist() for i, k in enumerate(self._k)]
        return list(self._k)

    def add_children(self, drawn: Sequence[Sequence[int]]) -> list[int]:
        """Append the drawn children (row i: frontier node i's, in draw order; -1: not drawn, the support ran out)
        and run the next level's frontier. Returns the nodes that dropped out of the n - 1 best."""
        assert len(drawn) == len(self.frontier) == len(self._k)
        new: list[int] = []
        for u, k, row, keys in zip(self.frontier, self._k, drawn, self._chosen):
            self.ran[u] = True
            for j in range(k):
                token = int(row[j]) if j < len(row) else -1
                if token < 0:  # the draft's support is smaller than k (known before the draw)
                    break
                new.append(len(self.parents))
                self.parents.append(u)
                self.keys.append(keys[j])
                self.tokens.append(token)
                self.ran.append(False)
                self.alive.append(True)
        self.level += 1
        dropped = self._prune()
        assert not set(dropped) & set(new), "a node drawn this level dropped out at once"
        self._k, self._chosen = [], []
        if self.level >= self.spec.depth:
            self.frontier = []
            return dropped
        # Run forward only nodes whose first child could still be drawn (the floor only rises).
        floor, ceiling = self._floor(self._alive_keys()), self.spec.model.ceiling
        self.frontier = [u for u in new if self.keys[u] * ceiling > floor]
        return dropped

    def _prune(self) -> list[int]:
        live = [i for i in range(1, len(self.keys)) if self.alive[i]]
        if len(live) <= self.budget:
            return []
        live.sort(key=lambda i: (-self.keys[i], i))
        dropped = live[self.budget:]
        for i in dropped:
            self.alive[i] = False
        return dropped

    def finish(self) -> GrownTree:
        kept = [i for i in range(len(self.parents)) if self.alive[i]]  # draw order: breadth-first already
        new_index = {old: new for new, old in enumerate(kept)}
        parents = [-1] + [new_index[self.parents[i]] for i in kept[1:]]
        return GrownTree(Tree(parents), [self.tokens[i] for i in kept], kept, [self.ran[i] for i in kept])
