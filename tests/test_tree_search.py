"""Tree search: the DP against brute force, best-first against the DP, the paper's baselines."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from offload_runtime.spec.tree_search import (
    DEFAULT_ACCEPTANCE,
    best_first_growth_curve,
    best_first_tree,
    best_tree,
    best_trees,
    chain_tree,
    expected_tokens,
    k_sequences_tree,
)

# --- reference implementations (slow, obviously right) -----------------------------------------

Nested = tuple  # a tree as the tuple of its children's trees, children in rank order


@lru_cache(maxsize=None)
def _trees(m: int, d: int) -> tuple[Nested, ...]:
    """Every ordered tree of exactly m nodes and depth <= d."""
    return tuple(_forests(m - 1, d - 1)) if m >= 1 and (m == 1 or d >= 1) else ()


@lru_cache(maxsize=None)
def _forests(s: int, d: int) -> tuple[Nested, ...]:
    """Every ordered sequence of trees of depth <= d holding s nodes in all."""
    if s == 0:
        return ((),)
    if d < 0:
        return ()
    out = []
    for first in range(1, s + 1):
        for head in _trees(first, d):
            for rest in _forests(s - first, d):
                out.append((head,) + rest)
    return tuple(out)


def _value(tree: Nested, p: np.ndarray) -> float:
    return 1.0 + sum((p[k] if k < len(p) else 0.0) * _value(child, p) for k, child in enumerate(tree))


def _to_parents(tree: Nested) -> list[int]:
    parents, frontier = [-1], [(tree, 0)]
    while frontier:
        nxt = []
        for node, idx in frontier:
            for child in node:
                parents.append(idx)
                nxt.append((child, len(parents) - 1))
        frontier = nxt
    return parents


def _brute_best(p: np.ndarray, n: int, d: int) -> float:
    return max(_value(t, p) for m in range(1, n + 1) for t in _trees(m, d))


def _naive_dp(p: np.ndarray, N: int, d: int) -> np.ndarray:
    """The paper's recurrence with no pruning: G[l][m] for at most m nodes, depth <= l."""
    ninf = float("-inf")
    G = [[0.0] + [1.0] * N]
    for _ in range(d):
        F = G[-1]
        H = [0.0] + [ninf] * (N - 1)                  # children 1..k hold exactly s nodes
        best = [1.0 + h for h in H]
        for k in range(1, len(p) + 1):
            H = [max((H[s - y] + p[k - 1] * F[y] for y in range(1, s + 1)), default=ninf) for s in range(N)]
            best = [max(a, 1.0 + h) for a, h in zip(best, H)]
        G.append([0.0] + list(np.maximum.accumulate(best)))
    return np.array(G)


def _assert_conventions(parents: list[int], n: int, d: int) -> None:
    """BFS parent array, size <= n, depth <= d (checked here independently of the module)."""
    assert 1 <= len(parents) <= n
    assert parents[0] == -1
    depth = [0]
    for i in range(1, len(parents)):
        assert 0 <= parents[i] < i
        assert parents[i] >= parents[i - 1], "children must be grouped by parent in index order (BFS)"
        depth.append(depth[parents[i]] + 1)
    assert depth == sorted(depth)
    assert max(depth) <= d


def _vectors(seed: int) -> list[np.ndarray]:
    """Non-increasing, unsorted and awkward acceptance vectors (zeros inside, ones, ties)."""
    rng = np.random.default_rng(seed)
    out = []
    for w in (1, 2, 3, 5):
        v = rng.random(w)
        out.append(np.sort(v)[::-1].copy())
        out.append(v)
    out += [np.array([0.1, 0.9]), np.array([0.5, 0.0, 0.9]), np.array([1.0, 1.0]),
            np.array([0.3, 0.3, 0.3]), np.array([0.0, 0.7])]
    return out


# --- the objective and the baselines -------------------------------------------------------------

def test_expected_tokens_by_hand():
    # root 1; children 0.5 and 0.25; grandchild under the first child 0.5 * 0.5
    assert expected_tokens([-1, 0, 0, 1], [0.5, 0.25]) == pytest.approx(2.0)
    # a third child has rank 3 > W = 2, so it is never accepted
    assert expected_tokens([-1, 0, 0, 0], [0.5, 0.25]) == pytest.approx(1.75)
    assert expected_tokens([-1], [0.5]) == 1.0


def test_baseline_shapes():
    assert chain_tree(1) == [-1]
    assert chain_tree(4) == [-1, 0, 1, 2]
    assert k_sequences_tree(2, 3) == [-1, 0, 0, 1, 2, 3, 4]
    assert k_sequences_tree(3, 0) == [-1]
    p = [0.6, 0.2, 0.1]
    # three sequences of length 2: (0.6 + 0.2 + 0.1) * (1 + 0.6)
    assert expected_tokens(k_sequences_tree(3, 2), p) == pytest.approx(1 + 0.9 * 1.6)
    _assert_conventions(k_sequences_tree(4, 5), 21, 5)


# --- the DP --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_matches_brute_force(seed):
    for p in _vectors(seed):
        table = best_trees(p, 8, 7)
        for d in (0, 1, 2, 3, 7):
            G = table.curve(d)
            assert G[0] == 0.0 and G[1] == 1.0
            for n in range(1, 9):
                want = _brute_best(p, n, d)
                assert G[n] == pytest.approx(want, rel=1e-12), (p, n, d)
                tree = table.tree(n, d)
                _assert_conventions(tree, n, d)
                assert expected_tokens(tree, p) == pytest.approx(want, rel=1e-12), (p, n, d, tree)
        value, tree = best_tree(p, 8, 3)
        assert value == expected_tokens(tree, p)
        assert value == pytest.approx(_brute_best(p, 8, 3), rel=1e-12)


def test_brute_force_enumerator_counts():
    # guards the reference itself: ordered trees of m nodes are counted by Catalan(m - 1)
    assert [len(_trees(m, m)) for m in range(1, 9)] == [1, 1, 2, 5, 14, 42, 132, 429]
    assert len(_trees(4, 1)) == 1 and len(_trees(4, 2)) == 4
    enc = {tuple(_to_parents(t)) for t in _trees(6, 5)}
    assert len(enc) == 42, "distinct trees must map to distinct parent arrays"
    for t in _trees(6, 5):
        assert expected_tokens(_to_parents(t), [0.7, 0.2]) == pytest.approx(_value(t, np.array([0.7, 0.2])))


@pytest.mark.parametrize("seed", [3, 4])
def test_every_tree_from_one_run(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(6) * 0.8   # unsorted
    table = best_trees(p, 80, 6)
    for d in range(7):
        G = table.curve(d)
        assert np.all(np.diff(G) >= 0)
        for n in range(1, 81):
            tree = table.tree(n, d)
            _assert_conventions(tree, n, d)
            assert expected_tokens(tree, p) == pytest.approx(G[n], rel=1e-9)


@pytest.mark.parametrize("seed", [11, 12])
def test_dp_pruning_matches_naive_dp(seed):
    # the size bounds (rearrangement, plateau) only bite past brute-force sizes: compare at N = 60
    rng = np.random.default_rng(seed)
    for p in (rng.random(6) * 0.9, np.sort(rng.random(6))[::-1] * 0.9, np.array([0.2, 0.2, 0.9, 0.0, 0.5])):
        np.testing.assert_allclose(best_trees(p, 60, 5).values, _naive_dp(p, 60, 5), rtol=1e-12)


def test_chunking_does_not_change_result():
    rng = np.random.default_rng(5)
    p = rng.random(12) * 0.9
    a = best_trees(p, 300, 12)
    b = best_trees(p, 300, 12, chunk_elems=7)   # one row per chunk
    assert np.array_equal(a.values, b.values)
    assert a.tree(300, 12) == b.tree(300, 12)


def test_chain_when_only_first_child_accepted():
    p = [1.0, 0.0, 0.0]
    for n in range(1, 30):
        value, tree = best_tree(p, n, n - 1)
        assert tree == chain_tree(n) and value == n
    for d in (0, 1, 4, 9):
        G = best_trees(p, 40, d).curve(d)
        assert np.array_equal(G[1:], np.minimum(np.arange(1, 41), d + 1))
        # the depth limit binds: extra nodes would be worthless, so the tree stays minimal
        assert best_tree(p, 40, d)[1] == chain_tree(d + 1)
        assert best_first_tree(p, 40, d) == (d + 1, chain_tree(d + 1))


@pytest.mark.parametrize("seed", [6, 7])
def test_dp_beats_paper_baselines(seed):
    rng = np.random.default_rng(seed)
    vectors = [np.array(DEFAULT_ACCEPTANCE), np.sort(rng.random(8))[::-1] * 0.9, rng.random(8) * 0.9]
    for p in vectors:
        G = best_trees(p, 121, 120).curve(120)
        for n in range(1, 122):
            assert G[n] >= expected_tokens(chain_tree(n), p) - 1e-12
        for k in range(1, 9):
            for l in range(0, 120 // k + 1):
                assert G[1 + k * l] >= expected_tokens(k_sequences_tree(k, l), p) - 1e-12
        # and strictly better than both where branching pays: p[2] > 0 makes a second child worth it
        assert G[64] > max(expected_tokens(chain_tree(64), p), expected_tokens(k_sequences_tree(9, 7), p))


# --- best-first ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [8, 9, 10])
def test_best_first_matches_dp(seed):
    rng = np.random.default_rng(seed)
    vectors = [
        np.sort(rng.random(10))[::-1].copy(),
        np.array(DEFAULT_ACCEPTANCE),
        np.array([0.6, 0.6, 0.3, 0.3, 0.0, 0.0]),   # ties and trailing zeros
        np.array([0.95]),
    ]
    for p in vectors:
        table = best_trees(p, 200, 40)
        for d in (1, 3, 8, 40):
            G = best_first_growth_curve(p, 200, d)
            np.testing.assert_allclose(G, table.curve(d), rtol=1e-12, atol=1e-12)
            for n in (1, 2, 17, 200):
                value, tree = best_first_tree(p, n, d)
                _assert_conventions(tree, n, d)
                assert value == expected_tokens(tree, p)
                assert value == pytest.approx(table.value(n, d), rel=1e-12)


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [[], [[0.5]], [-0.1], [1.5], [0.5, float("nan")]])
def test_bad_acceptance_vector(p):
    with pytest.raises(ValueError, match="acceptance vector"):
        best_tree(p, 4, 2)


def test_bad_sizes_and_trees():
    with pytest.raises(ValueError, match="n must be"):
        best_tree([0.5], 0, 2)
    with pytest.raises(ValueError, match="d must be"):
        best_tree([0.5], 3, -1)
    with pytest.raises(ValueError, match="N must be"):
        best_trees([0.5], 0, 2)
    with pytest.raises(ValueError, match="n must be"):
        best_tree([0.5], True, 2)
    with pytest.raises(ValueError, match="non-increasing"):
        best_first_tree([0.2, 0.5], 4, 2)
    with pytest.raises(ValueError, match="parents\\[0\\] == -1"):
        expected_tokens([0, 0], [0.5])
    with pytest.raises(ValueError, match="smaller index"):
        expected_tokens([-1, 1], [0.5])
    with pytest.raises(ValueError, match="breadth-first"):
        expected_tokens([-1, 0, 1, 0], [0.5])
    table = best_trees([0.5], 10, 3)
    with pytest.raises(ValueError, match="exceeds"):
        table.tree(11, 3)
    with pytest.raises(ValueError, match="exceeds"):
        table.tree(5, 4)
