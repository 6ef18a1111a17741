"""Time the tree search at planner scale: python tools/bench_tree_search.py

Prints the DP time for N = 2048, depth <= 32, W = 32 (one run gives G(n, l) for all n, l and every
optimal tree), for a non-increasing and an unsorted vector, and the best-first time. No assertions.
"""
from __future__ import annotations

import time

import harness  # noqa: F401  (this checkout first on sys.path)
import numpy as np

from offload_runtime.spec.tree_search import best_first_growth_curve, best_first_tree, best_trees, expected_tokens

N, D, W = 2048, 32, 32


def _timed(fn, *args, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    rng = np.random.default_rng(0)
    # a first child taking most of the mass, a decaying tail over the other 31 ranks (sum 1)
    falling = np.concatenate([[0.8], 0.2 * np.sort(rng.dirichlet(np.ones(W - 1)))[::-1]])
    vectors = {
        "non-increasing": falling,
        "unsorted": rng.permutation(falling),
        "increasing (worst case)": np.sort(falling),
    }
    print(f"N = {N}, d <= {D}, W = {W}  (best of 3 runs)")
    for name, p in vectors.items():
        secs, table = _timed(best_trees, p, N, D)
        t_tree, tree = _timed(table.tree, N, D)
        print(f"DP {name:>24}: {secs:6.2f} s   G({N}, {D}) = {table.value(N, D):.4f}   "
              f"levels computed {table.values.shape[0] - 1}   tree backtrack {t_tree * 1e3:.1f} ms "
              f"({len(tree)} nodes, value {expected_tokens(tree, p):.4f})")
    p = vectors["non-increasing"]
    secs, G = _timed(best_first_growth_curve, p, N, D)
    print(f"best-first growth curve: {secs * 1e3:6.1f} ms  G({N}, {D}) = {G[N]:.4f}")
    secs, (value, _) = _timed(best_first_tree, p, N, D)
    print(f"best-first tree:         {secs * 1e3:6.1f} ms  value = {value:.4f}")


if __name__ == "__main__":
    main()
