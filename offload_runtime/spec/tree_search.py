"""Choose the shape of the speculation tree: Sequoia's dynamic program and its fast special cases.

Conventions (shared across the project):
- A tree is a ``Tree`` (spec/tree.py, the one definition of a valid tree): a parent array in breadth-first
  order whose children appear in draft sampling order, so a child's *rank* (1-based) is its position among
  its siblings. Functions here return Trees and accept a Tree or a parent array.
- ``p[k-1]`` is p[k] of the paper: the probability that the k-th child of an accepted node is accepted.
  Ranks beyond ``len(p)`` have probability 0.
- A node's acceptance probability is the product of p[rank] along its path; the expected number of
  tokens a step yields is the sum of those products over all nodes (the root counts 1).
- Depth limit d: every node has depth <= d, so one step yields at most d + 1 tokens.

The exact optimum for any p is the DP of ``best_trees`` (one run gives G(n, l) for every n <= N and
every l <= d, and the optimal tree for any of them). Where p is non-increasing the best-first search of
``best_first_tree`` reaches the same optimum in O(n log n).
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..model.tree import Tree

__all__ = [
    "DEFAULT_ACCEPTANCE",
    "TreeTable",
    "best_first_growth_curve",
    "best_first_tree",
    "best_tree",
    "best_trees",
    "chain_tree",
    "expected_tokens",
    "k_sequences_tree",
]

# An ASSUMPTION, not a measurement: used only until planner/acceptance.py has measured the real pair.
# Shaped like the acceptance vectors the Sequoia paper reports for Llama-2 pairs (e.g. a 7B draft
# for a 70B target, temperature ~0.6): a dominant first child, then a fast-decaying tail. Since at
# most one child of a node is accepted, the entries are probabilities of disjoint events and must sum
# to at most 1 (here 0.98).
DEFAULT_ACCEPTANCE: tuple[float, ...] = (
    0.72, 0.09, 0.04, 0.025, 0.017, 0.012, 0.009, 0.007,
    0.0055, 0.0045, 0.0037, 0.0031, 0.0026, 0.0022, 0.0019, 0.0016,
)

# Relative tolerance under which two DP values count as equal: a subtree that buys no more than this
# with extra nodes is trimmed to the smaller size (keeps "at most n nodes" trees minimal).
_TIE_RTOL = 1e-12


# --- validation ---------------------------------------------------------------------------------

def _check_p(p: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"acceptance vector p must be a non-empty 1-D sequence p[1..W], got shape {arr.shape}; "
            "pass e.g. DEFAULT_ACCEPTANCE or planner.acceptance's measurement"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0.0) or np.any(arr > 1.0):
        raise ValueError(f"acceptance vector p must have every entry in [0, 1], got {arr.tolist()}")
    return arr


def _check_int(name: str, value: int, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return int(value)


# --- the objective ------------------------------------------------------------------------------

def expected_tokens(tree: Tree | Sequence[int], p: Sequence[float] | np.ndarray) -> float:
    """Expected tokens one step yields with this tree: sum over nodes of the product of p[rank] on its path."""
    tree = Tree.of(tree)
    arr = _check_p(p)
    prob = [1.0] * len(tree)
    for i in range(1, len(tree)):
        rank = tree.ranks[i]
        prob[i] = prob[tree.parents[i]] * arr[rank - 1] if rank <= arr.size else 0.0
    return float(sum(prob))


# --- baselines from the paper -------------------------------------------------------------------

def chain_tree(n: int) -> Tree:
    """One chain of n nodes (the root included): classic single-sequence speculation."""
    return Tree.chain(_check_int("n", n, 1))


def k_sequences_tree(k: int, l: int) -> Tree:
    """k independent sequences of length l hanging from the root (1 + k*l nodes, BFS order)."""
    k = _check_int("k", k, 1)
    l = _check_int("l", l, 0)
    parents = [-1]
    for level in range(1, l + 1):
        # the j-th sequence's node at this level hangs from its node one level up (or from the root)
        parents += [0] * k if level == 1 else [1 + (level - 2) * k + j for j in range(k)]
    return Tree(parents)


# --- Sequoia's dynamic program ------------------------------------------------------------------

@dataclass(frozen=True)
class TreeTable:
    """Result of one DP run: G(n, l) for all n <= N, l <= depth, and the optimal tree for any of them.

    ``values[l, n]`` is the best expected tokens per step with at most n nodes and depth <= l. Rows stop
    at ``min(depth, N - 1)``: deeper limits cannot bind with N nodes; ``curve``/``value``/``tree`` clamp.
    """

    p: np.ndarray
    N: int
    depth: int
    values: np.ndarray               # (L + 1, N + 1) float64
    best_b: list[np.ndarray]         # best_b[l][m]: children of the root of the best m-node subtree
    best_y: list[np.ndarray]         # best_y[l][k - 1, s]: size of child k when children 1..k hold s nodes
    trim: list[np.ndarray]           # trim[l][m]: fewest nodes reaching values[l, m]

    def _level(self, depth: int) -> int:
        depth = _check_int("d", depth, 0)
        if depth > self.depth:
            raise ValueError(f"depth limit {depth} exceeds the {self.depth} this table was built for")
        return min(depth, self.values.shape[0] - 1)

    def curve(self, depth: int) -> np.ndarray:
        """G[n] for n = 0..N at this depth limit (G[0] = 0, G[1] = 1)."""
        return self.values[self._level(depth)].copy()

    def value(self, n: int, depth: int) -> float:
        n = _check_int("n", n, 1)
        if n > self.N:
            raise ValueError(f"n = {n} exceeds the N = {self.N} this table was built for")
        return float(self.values[self._level(depth), n])

    def tree(self, n: int, depth: int) -> Tree:
        """An optimal tree (BFS parent array) with at most n nodes and depth <= ``depth``."""
        self.value(n, depth)
        level = self._level(depth)
        # Each queue entry is a subtree to expand: (its node index, its depth limit, its size).
        parents = [-1]
        queue = deque([(0, level, int(self.trim[level][n]))])
        while queue:
            node, l, m = queue.popleft()
            b = int(self.best_b[l][m]) if l > 0 else 0
            sizes = [0] * b
            s = m - 1
            for k in range(b, 0, -1):
                sizes[k - 1] = int(self.best_y[l][k - 1, s])
                s -= sizes[k - 1]
            assert s == 0, "DP backtrack did not account for every node"
            for y in sizes:
                parents.append(node)
                queue.append((len(parents) - 1, l - 1, int(self.trim[l - 1][y])))
        return Tree(parents)


def _rank_divisors(p: np.ndarray) -> np.ndarray:
    """r_k = 1 + #{j < k : p_j >= p_k} for each rank k (1-based ranks, 0-based array).

    Rearrangement bound: all children share one depth limit, so swapping two children's subtrees keeps
    the tree valid; pairing bigger subtrees with bigger p never loses (F is non-decreasing in size).
    Hence some optimum has child k no larger than the r_k - 1 earlier ranks that precede it in the order
    (p desc, index asc), so r_k * y_k + (k - r_k) <= s for children 1..k holding s nodes.
    """
    return np.array([1 + int(np.sum(p[:k] >= p[k])) for k in range(p.size)], dtype=np.int64)


def best_trees(p: Sequence[float] | np.ndarray, N: int, d: int, *, chunk_elems: int = 1 << 16) -> TreeTable:
    """Run Sequoia's DP once for every size <= N and depth limit <= d; works for any p.

    With F_l[m] the best subtree of at most m nodes and depth limit l, and H_k[s] the best
    sum_{j<=k} p[j] * F_{l-1}[y_j] over children 1..k holding exactly s nodes (each y_j >= 1):
        H_0[0] = 0,  H_k[s] = max_y H_{k-1}[s - y] + p[k] * F_{l-1}[y],  F_l[m] = 1 + max_k H_k[m - 1].
    This is the paper's T[m][l][b] with the max over b folded in. The inner step is a (max,+)
    convolution; it runs vectorised over row chunks of at most max(``chunk_elems``, N) candidates
    (bounds memory), with y limited by the rearrangement bound (see ``_rank_divisors``) and by the size past
    which F_{l-1} stops growing.
    """
    arr = _check_p(p)
    N = _check_int("N", N, 1)
    d = _check_int("d", d, 0)
    chunk_elems = _check_int("chunk_elems", chunk_elems, 1)
    # Ranks past the last non-zero p add nothing, so no optimal tree needs them.
    nonzero = np.flatnonzero(arr)
    W = int(nonzero[-1]) + 1 if nonzero.size else 0
    r = _rank_divisors(arr[:W])
    L = min(d, N - 1)   # a deeper limit cannot bind with N nodes

    F0 = np.ones(N + 1)
    F0[0] = 0.0
    values = [F0]
    index_type = np.int16 if N < 2**15 else np.int32   # argmax tables: the bulk of the memory
    best_b = [np.zeros(N + 1, dtype=index_type)]
    best_y: list[np.ndarray] = [np.zeros((0, N), dtype=index_type)]
    trim = [_trim(F0)]

    # Scratch: Hr holds H_{k-1} reversed and padded with -inf, so that the window view
    # windows[N - s, y - 1] == H_{k-1}[s - y] for every s, y (y > s lands in the padding).
    Hr = np.full(2 * N, -np.inf)
    windows = sliding_window_view(Hr, N)
    scratch = np.empty(max(chunk_elems, N))

    for l in range(1, L + 1):
        F = values[-1]
        cap = int(trim[-1][N])             # no child needs more nodes than F_{l-1} can use
        H = np.full(N, -np.inf)            # H_0
        H[0] = 0.0
        F_new = np.full(N + 1, -np.inf)
        F_new[0] = 0.0
        F_new[1:] = 1.0 + H
        b_new = np.zeros(N + 1, dtype=index_type)
        y_new = np.ones((min(W, N - 1), N), dtype=index_type)
        for k in range(1, W + 1):
            if k > N - 1:
                break
            pk = arr[k - 1]
            H_next = np.full(N, -np.inf)
            if pk == 0.0:
                # a placeholder child (it only makes room for later ranks): one node is enough
                H_next[k:] = H[k - 1:N - 1]
            else:
                Hr[:N] = H[::-1]
                pF = pk * F
                _max_plus_rows(windows, pF, H_next, y_new[k - 1], k, int(r[k - 1]), cap, N, scratch)
            H = H_next
            cand = 1.0 + H[:N]             # root plus k children holding m - 1 nodes
            better = cand > F_new[1:]      # strict: on ties keep fewer children
            F_new[1:][better] = cand[better]
            b_new[1:][better] = k
        # Exact sums s can be unreachable under the y bounds (e.g. l = 1 past 1 + W nodes); G counts
        # trees of *at most* m nodes, and trim[m] points back at the size that attains it.
        np.maximum.accumulate(F_new, out=F_new)
        values.append(F_new)
        best_b.append(b_new)
        best_y.append(y_new)
        trim.append(_trim(F_new))
        if np.array_equal(F_new, F):
            # F_l depends only on F_{l-1}: once a level changes nothing, deeper limits repeat it
            L = l
            break

    return TreeTable(p=arr, N=N, depth=d, values=np.stack(values[: L + 1]), best_b=best_b,
                     best_y=best_y, trim=trim)


def _max_plus_rows(windows: np.ndarray, pF: np.ndarray, H_out: np.ndarray,
                   y_out: np.ndarray, k: int, r_k: int, cap: int, N: int, scratch: np.ndarray) -> None:
    """H_out[s] = max_y H_{k-1}[s - y] + pF[y] for s = k..N-1, argmax into y_out (smallest y on ties)."""
    target = scratch.size
    s0 = k
    while s0 < N:
        y_hi = max(1, min(cap, (s0 - k + r_k) // r_k))
        rows = max(1, min(N - s0, target // y_hi))
        s1 = s0 + rows
        Y = max(1, min(cap, (s1 - 1 - k + r_k) // r_k))
        rows = min(rows, target // Y)
        s1 = s0 + rows
        # windows rows N - s for s = s0..s1-1 (descending row index), columns y - 1 for y = 1..Y
        view = windows[N - s0: N - s1: -1, :Y]   # s1 <= N, so the stop index never wraps to -1
        cand = scratch[: rows * Y].reshape(rows, Y)
        np.add(view, pF[1: Y + 1], out=cand)
        j = cand.argmax(axis=1)
        H_out[s0:s1] = cand[np.arange(rows), j]
        y_out[s0:s1] = j + 1
        s0 = s1


def _trim(F: np.ndarray) -> np.ndarray:
    """trim[m] = the smallest m' <= m with F[m'] within tolerance of F[m] (F is non-decreasing)."""
    tol = _TIE_RTOL * max(1.0, float(F[-1]))
    # for each m, the first index whose value reaches F[m] - tol
    return np.searchsorted(F, F - tol, side="left").astype(np.int64)


def best_tree(p: Sequence[float] | np.ndarray, n: int, d: int) -> tuple[float, Tree]:
    """The optimal tree of at most n nodes and depth <= d for any p, with its expected tokens per step."""
    n = _check_int("n", n, 1)
    table = best_trees(p, n, d)
    tree = table.tree(n, d)
    value = expected_tokens(tree, table.p)
    assert abs(value - table.value(n, d)) <= 1e-9 * max(1.0, value), "DP value and its tree disagree"
    return value, tree


# --- best-first search (non-increasing p) -------------------------------------------------------

def _best_first(p: Sequence[float] | np.ndarray, n: int, d: int) -> tuple[list[float], list[int], list[int]]:
    """Pop the n highest path products among nodes of depth <= d: (products, parent, rank) in pop order."""
    arr = _check_p(p)
    n = _check_int("n", n, 1)
    d = _check_int("d", d, 0)
    if np.any(np.diff(arr) > 0):
        raise ValueError(
            "best-first search is exact only for a non-increasing acceptance vector p; "
            "use best_tree / best_trees (the DP) for this p"
        )
    W = arr.size
    products: list[float] = []
    parent: list[int] = []
    rank: list[int] = []
    depth: list[int] = []
    # Lazy frontier: a popped node offers its first child and its next sibling. Under non-increasing p
    # the n best products are closed under "parent" and "previous sibling", so this finds all of them.
    # Entries: (-product, tie order, parent pop index, rank, depth, parent's product)
    heap: list[tuple[float, int, int, int, int, float]] = [(-1.0, 0, -1, 0, 0, 1.0)]
    order = 1
    while heap and len(products) < n:
        neg, _, par, rk, dep, par_prod = heapq.heappop(heap)
        me = len(products)
        products.append(-neg)
        parent.append(par)
        rank.append(rk)
        depth.append(dep)
        offers = []
        if dep < d and W >= 1:
            offers.append((-neg * arr[0], me, 1, dep + 1, -neg))
        if par >= 0 and rk < W:
            offers.append((par_prod * arr[rk], par, rk + 1, dep, par_prod))
        for prod, o_par, o_rank, o_dep, o_par_prod in offers:
            if prod > 0.0:   # a zero-product node adds nothing: leave it out to keep the tree minimal
                heapq.heappush(heap, (-prod, order, o_par, o_rank, o_dep, o_par_prod))
                order += 1
    return products, parent, rank


def best_first_tree(p: Sequence[float] | np.ndarray, n: int, d: int) -> tuple[float, Tree]:
    """Optimal tree of at most n nodes and depth <= d for non-increasing p, in O(n log n)."""
    products, parent, rank = _best_first(p, n, d)
    children: list[list[tuple[int, int]]] = [[] for _ in products]
    for i in range(1, len(products)):
        children[parent[i]].append((rank[i], i))
    # Re-number in BFS order, children by rank.
    parents = [-1]
    queue = deque([(0, 0)])   # (pop index, BFS index)
    while queue:
        pop_i, bfs_i = queue.popleft()
        for _, child in sorted(children[pop_i]):
            parents.append(bfs_i)
            queue.append((child, len(parents) - 1))
    tree = Tree(parents)
    return expected_tokens(tree, p), tree


def best_first_growth_curve(p: Sequence[float] | np.ndarray, N: int, d: int) -> np.ndarray:
    """G[n] for n = 0..N from best-first search (non-increasing p only): running sums of the products."""
    products, _, _ = _best_first(p, N, d)
    G = np.zeros(N + 1)
    G[1: len(products) + 1] = np.cumsum(products)
    G[len(products) + 1:] = G[len(products)]
    return G
