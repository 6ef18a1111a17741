"""Tests for offload_runtime.verify: agreement with a loop-based reference, saturated cases,
determinism, and statistical losslessness (the emitted tokens follow the target exactly)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import offload_runtime.spec.verify as verify_module
from offload_runtime.spec.sampling import gumbel_top_k, make_generator, warp_probs
from offload_runtime.spec.methods import METHODS, verify
from offload_runtime.spec.verify import VerifyResult, verify_greedy, verify_sequoia, verify_specinfer
from helpers import ALPHA, chi_square_pvalue

F64 = torch.float64


# --- drawing children the three ways a draft can


def draw_without_replacement(q_rows: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    return gumbel_top_k(q_rows, k, gen)


def draw_with_replacement(q_rows: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(q_rows, k, replacement=True, generator=gen)


def draw_top_k(q_rows: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    top = torch.topk(q_rows, min(k, q_rows.shape[-1]), dim=-1)
    return top.indices.masked_fill(top.values == 0, -1)  # capped by the support, like gumbel_top_k


Drawer = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
DRAWER_OF: dict[str, Drawer] = {
    "sequoia": draw_without_replacement,
    "specinfer": draw_with_replacement,
    "topk": draw_top_k,
}


# --- reference verifier: a plain-Python transcription of the algorithms


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]


def reference_verify(
    method: str,
    parents: list[int],
    tokens: list[int],
    p_rows: list[list[float]],
    q_rows: list[list[float]],
    uniforms: list[float],
) -> tuple[list[int], int]:
    """uniforms[c] decides child c, uniforms[0] draws the bonus (the documented draw order)."""
    vocab = len(p_rows[0])
    node, path = 0, []
    while True:
        P = _normalised(p_rows[node])
        Q = _normalised(q_rows[node])
        accepted = None
        for child in [c for c in range(len(parents)) if parents[c] == node and tokens[c] >= 0]:
            x = tokens[child]
            if method == "topk":
                Q = [1.0 if t == x else 0.0 for t in range(vocab)]
            if uniforms[child] < P[x] / Q[x]:
                accepted = child
                break
            residual = [max(p - q, 0.0) for p, q in zip(P, Q)]
            if sum(residual) > 0:
                P = _normalised(residual)
            if method == "sequoia":
                Q[x] = 0.0
                if sum(Q) > 0:
                    Q = _normalised(Q)
        if accepted is None:
            threshold, cumulative = uniforms[0] * sum(P), 0.0
            for token, p in enumerate(P):
                cumulative += p
                if cumulative > threshold:
                    return path, token
            return path, max(t for t in range(vocab) if P[t] > 0)
        path.append(accepted)
        node = accepted


def reference_greedy(parents: list[int], tokens: list[int], argmax: list[int]) -> tuple[list[int], int]:
    node, path = 0, []
    while True:
        matching = [c for c in range(len(parents)) if parents[c] == node and tokens[c] == argmax[node]]
        if not matching:
            return path, argmax[node]
        node = matching[0]
        path.append(node)


# --- random trees for the agreement tests


def random_case(seed: int, method: str) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """A random BFS tree (depth <= 3, <= 16 nodes) whose children are drawn as `method` expects.

    Rows mix smooth, saturated (temperature 0.05), top-p-truncated and P == Q cases; some nodes are
    absent (token -1, last among their siblings, as the drafter pads) and still have children.
    """
    gen = make_generator(seed)

    def randint(high: int) -> int:
        return int(torch.randint(high, (), generator=gen))

    vocab = 2 + randint(7)
    dtype = (torch.float32, F64)[randint(2)]
    temperature = (0.05, 0.5, 1.0, 2.0)[randint(4)]
    top_p = (0.6, 1.0)[randint(2)]

    def random_row() -> torch.Tensor:
        return warp_probs(torch.randn(vocab, generator=gen, dtype=F64) * 2, temperature, top_p).to(dtype)

    parents, tokens, depth = [-1], [randint(vocab)], [0]
    p_rows: list[torch.Tensor] = []
    q_rows: list[torch.Tensor] = []
    node = 0
    while node < len(parents):  # children are appended after every earlier node's: BFS order
        p_rows.append(random_row())
        q_rows.append(p_rows[-1].clone() if randint(5) == 0 else random_row())
        if depth[node] < 3 and len(parents) < 12:
            drawn = DRAWER_OF[method](q_rows[-1].to(F64)[None], 1 + randint(4), gen)[0]
            absent = [-1] if randint(4) == 0 else []  # the drafter's padding: a node that is not there
            for x in drawn[drawn >= 0].tolist() + absent:
                parents.append(node)
                tokens.append(x)
                depth.append(depth[node] + 1)
        node += 1
    return parents, tokens, torch.stack(p_rows), torch.stack(q_rows)


@pytest.mark.parametrize("method", ["sequoia", "specinfer", "topk"])
def test_agrees_with_reference_on_random_trees(method: str) -> None:
    depths_seen = set()
    for seed in range(300):
        parents, tokens, p_rows, q_rows = random_case(seed, method)
        got = verify(method, parents, tokens, p_rows, q_rows, make_generator(seed))
        uniforms = torch.rand(len(parents), generator=make_generator(seed), dtype=F64).tolist()
        expected = reference_verify(method, parents, tokens, p_rows.tolist(), q_rows.tolist(), uniforms)
        assert (got.path, got.bonus_token) == expected, f"seed {seed}"
        assert float(p_rows[got.path[-1] if got.path else 0, got.bonus_token]) > 0
        depths_seen.add(len(got.path))
    assert depths_seen >= {0, 1, 2}, "the random cases should exercise rejections and deep acceptances"


def test_greedy_is_the_longest_argmax_path() -> None:
    for seed in range(200):
        gen = make_generator(seed)
        vocab = 2 + int(torch.randint(3, (), generator=gen))  # tiny V: many matches, some duplicates
        n = 1 + int(torch.randint(20, (), generator=gen))
        parents = [-1] + [int(torch.randint(i, (), generator=gen)) for i in range(1, n)]
        order = [0]  # renumber breadth-first: children grouped by parent, parents in index order
        for u in order:
            order.extend(c for c in range(1, n) if parents[c] == u)
        new_index = {old: new for new, old in enumerate(order)}
        parents = [-1] + [new_index[parents[old]] for old in order[1:]]
        tokens = torch.randint(vocab, (n,), generator=gen).tolist()
        logits = torch.randn(n, vocab, generator=gen)
        argmax = logits.argmax(-1).tolist()
        expected = reference_greedy(parents, tokens, argmax)
        for target in (logits, warp_probs(logits, 0.0, 1.0), torch.tensor(argmax)):
            got = verify_greedy(parents, tokens, target)
            assert (got.path, got.bonus_token) == expected


# --- saturated tables: the outcome is known whatever the uniforms


def test_one_hot_target_gives_the_greedy_path_for_every_sampling_verifier() -> None:
    # P one-hot on a: a child x != a has P[x] = 0 (always rejected) and the residual stays one-hot
    # on a; the child a has ratio >= 1 (always accepted); the bonus is a.
    for method in ("sequoia", "specinfer", "topk"):
        for seed in range(60):
            parents, tokens, _, q_rows = random_case(seed, method)
            logits = torch.randn(len(parents), q_rows.shape[1], generator=make_generator(1000 + seed))
            p_rows = warp_probs(logits, 0.0, 1.0)
            got = verify(method, parents, tokens, p_rows, q_rows, make_generator(seed))
            assert got == verify_greedy(parents, tokens, p_rows)


def test_chain_with_a_mismatch_stops_there() -> None:
    parents, tokens = [-1, 0, 1, 2], [9, 1, 2, 3]
    p_rows = torch.zeros(4, 10, dtype=F64)
    p_rows[0, 1] = p_rows[1, 2] = p_rows[2, 7] = p_rows[3, 5] = 1.0
    q_rows = torch.full((4, 10), 0.1, dtype=F64)
    q_rows[3] = 0.0  # a leaf's Q is never read (the drafter does not compute it)
    for method in METHODS:
        for seed in range(10):
            got = verify(method, parents, tokens, p_rows, q_rows, make_generator(seed))
            assert got == VerifyResult([1, 2], 7)
    p_rows[2] = 0.0
    p_rows[2, 3] = 1.0  # now the whole chain is accepted and the bonus comes from the leaf's P
    for method in METHODS:
        got = verify(method, parents, tokens, p_rows, q_rows, make_generator(0))
        assert got == VerifyResult([1, 2, 3], 5)


def test_degenerate_draft_point_mass() -> None:
    vocab = 5
    p = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0], dtype=F64)
    q_on_1 = torch.zeros(vocab, dtype=F64)
    q_on_1[1] = 1.0
    # Q = point mass on the child (token 1) where P[1] = 0: always rejected; the residual
    # max(P - Q, 0) is P itself and Sequoia's Q has nothing left (Q[1] was 1).
    parents, tokens = [-1, 0], [4, 1]
    q_rows = torch.stack([q_on_1, q_on_1])
    for method in ("sequoia", "specinfer", "topk"):
        for seed in range(20):
            got = verify(method, parents, tokens, torch.stack([p, p]), q_rows, make_generator(seed))
            u0 = float(torch.rand(2, generator=make_generator(seed), dtype=F64)[0])
            assert got.path == [] and got.bonus_token == (0 if u0 < 0.1 else 2 if u0 < 0.7 else 3)
    # Q = point mass on a child that P fully backs: always accepted
    p_on_1 = q_on_1.clone()
    for seed in range(5):
        got = verify_sequoia(parents, tokens, torch.stack([p_on_1, p]), q_rows, make_generator(seed))
        assert got.path == [1]


def test_sequoia_retries_with_the_renormalised_draft() -> None:
    # Q uniform on {0, 1}, P one-hot on 1, children [0, 1]: child 0 is rejected (P[0] = 0), the
    # residual max(P - Q, 0) = one-hot on 1, Q becomes one-hot on 1, so child 1 has ratio 1.
    parents, tokens = [-1, 0, 0], [3, 0, 1]
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 3, dtype=F64)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3, dtype=F64)
    for seed in range(10):
        assert verify_sequoia(parents, tokens, p, q, make_generator(seed)) == VerifyResult([2], 1)


def test_duplicate_sibling_is_a_drafting_error_for_sequoia() -> None:
    parents, tokens = [-1, 0, 0], [0, 1, 1]
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=F64)
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    with pytest.raises(AssertionError, match="zero draft probability"):
        verify_sequoia(parents, tokens, p, q, make_generator(0))
    # with replacement, a repeated child is legitimate (and here rejected twice)
    assert verify_specinfer(parents, tokens, p, q, make_generator(0)) == VerifyResult([], 0)


# --- determinism, draw order, inputs


def test_seeded_determinism_and_draw_count() -> None:
    parents, tokens, p_rows, q_rows = random_case(3, "sequoia")
    n = len(parents)
    results = set()
    for seed in range(40):
        gen = make_generator(seed)
        first = verify_sequoia(parents, tokens, p_rows, q_rows, gen)
        # exactly n uniforms are consumed, whatever the walk did
        fresh = make_generator(seed)
        torch.rand(n, generator=fresh, dtype=F64)
        assert torch.equal(torch.rand(3, generator=gen, dtype=F64), torch.rand(3, generator=fresh, dtype=F64))
        assert verify_sequoia(parents, tokens, p_rows, q_rows, make_generator(seed)) == first
        results.add((tuple(first.path), first.bonus_token))
    assert len(results) > 1, "different seeds should give different outcomes on a random tree"


def test_only_visited_rows_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = make_generator(4)
    n, vocab = 400, 64
    parents = [-1] + [(i - 1) // 7 for i in range(1, n)]  # a 7-ary tree in BFS order, depth 4
    tokens = torch.randint(vocab, (n,), generator=gen)
    p_rows = torch.softmax(torch.randn(n, vocab, generator=gen), -1)
    q_rows = torch.softmax(torch.randn(n, vocab, generator=gen), -1)
    q_rows[(n - 2) // 7 + 1 :] = 0.0  # leaves: the drafter computes no Q there
    read: list[int] = []
    real_row = verify_module._row

    def counting_row(probs: torch.Tensor, node: int, *model: str) -> torch.Tensor:
        read.append(node)
        return real_row(probs, node, *model)

    monkeypatch.setattr(verify_module, "_row", counting_row)
    for method in ("sequoia", "specinfer", "topk"):
        read.clear()
        result = verify(method, parents, tokens, p_rows, q_rows, make_generator(1))
        visited = [0] + result.path
        assert sorted(set(read)) == sorted(visited) and len(read) <= 2 * len(visited)


def emitted_tokens(result: VerifyResult, tokens: list[int]) -> list[int]:
    """The tokens a step emits: those of the accepted path, then the bonus token."""
    return [tokens[u] for u in result.path] + [result.bonus_token]


def test_input_checks() -> None:
    p = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="unknown verification method"):
        verify("beam", [-1, 0], [0, 1], p, p, make_generator(0))
    with pytest.raises(AssertionError, match="target_probs"):
        verify_sequoia([-1, 0], [0, 1], p[:1], p, make_generator(0))
    with pytest.raises(AssertionError, match="parents"):
        verify_sequoia([-1, 1], [0, 1], p, p, make_generator(0))
    with pytest.raises(AssertionError, match="tokens"):
        verify_sequoia([-1, 0], [0, 3], p, p, make_generator(0))
    with pytest.raises(AssertionError, match="tokens"):
        verify_sequoia([-1, 0], [-1, 1], p, p, make_generator(0))


# --- statistical losslessness

# The "target model" and the draft are Markov tables over V = 6 tokens: P at a node is
# p_table[token of the node], so deeper nodes are consistent with the context. Both are warped
# with the same temperature / top-p. Each trial drafts one tree from the root token ROOT with the
# method's drawer, verifies it, and records the first two emitted tokens; where a step emits only
# one token, a second step (a fresh tree rooted at that token) supplies the second. Lossless means
#   first ~ p_table[ROOT],  (first, second) ~ p_table[ROOT][a] * p_table[a][b].
#
# Sample size: N = 2000 trials. For each configuration the table seed was chosen so that SpecInfer's
# rule applied to children drawn WITHOUT replacement is visibly biased at the root: the exact
# first-token law (computed by enumeration while writing the test) has a chi-square
# non-centrality per sample sum((p_wrong - p)^2 / p) of 1.65, 0.18 and 1.04, i.e. an expected
# statistic of at least ~360 at N = 2000 against a critical value of ~26 (5 dof, ALPHA = 1e-4).
# So the wrong pairing must fail, which the tests assert; a correct verifier fails with
# probability ALPHA per check (the seeds are fixed, so the outcome is reproducible).

VOCAB = 6
ROOT = 0
TRIALS = 2000
# (temperature, top_p, table seed, tree template as a parent array; the root has 3 children)
CONFIGS = [
    pytest.param(0.3, 1.0, 1, [-1, 0, 0, 0, 1, 1, 2], id="T0.3-depth2"),
    pytest.param(1.0, 1.0, 11, [-1, 0, 0, 0, 1, 1, 3, 4, 4, 6], id="T1.0-depth3"),
    pytest.param(1.0, 0.8, 31, [-1, 0, 0, 0, 1, 2, 3], id="T1.0-topp0.8-depth2"),
]


Tables = tuple[torch.Tensor, torch.Tensor]  # (p_table, q_table), each [VOCAB, VOCAB]


def markov_tables(seed: int, temperature: float, top_p: float) -> Tables:
    gen = make_generator(seed)
    target_logits = torch.randn(VOCAB, VOCAB, generator=gen, dtype=F64)
    draft_logits = target_logits + torch.randn(VOCAB, VOCAB, generator=gen, dtype=F64)
    return warp_probs(target_logits, temperature, top_p), warp_probs(draft_logits, temperature, top_p)


def draft_trees(
    template: list[int], roots: torch.Tensor, q_table: torch.Tensor, drawer: Drawer, gen: torch.Generator
) -> torch.Tensor:
    """Token of every template node for every trial, [N, m]; -1 where the draft ran out of support."""
    m = len(template)
    trees = torch.full((roots.numel(), m), -1, dtype=torch.int64)
    trees[:, 0] = roots
    for node in range(m):
        kids = torch.tensor([c for c in range(m) if template[c] == node], dtype=torch.int64)
        alive = torch.nonzero(trees[:, node] >= 0).flatten()
        if kids.numel() and alive.numel():
            trees[alive[:, None], kids[None, :]] = drawer(q_table[trees[alive, node]], kids.numel(), gen)
    return trees


def compact(template: list[int], row: list[int]) -> tuple[list[int], list[int]]:
    """Drop missing nodes (always trailing siblings, with their subtrees); BFS order is kept."""
    keep = [i for i, token in enumerate(row) if token >= 0]
    new_index = {old: new for new, old in enumerate(keep)}
    return [-1] + [new_index[template[i]] for i in keep[1:]], [row[i] for i in keep]


def emitted_per_trial(
    method: str, template: list[int], roots: torch.Tensor, tables: Tables, drawer: Drawer, seed: int
) -> list[list[int]]:
    p_table, q_table = tables
    trees = draft_trees(template, roots, q_table, drawer, make_generator(seed))
    gen = make_generator(seed + 1)
    out = []
    for row in trees.tolist():
        parents, tokens = compact(template, row)
        index = torch.tensor(tokens)
        result = verify(method, parents, tokens, p_table[index], q_table[index], gen)
        out.append(emitted_tokens(result, tokens))
    return out


def first_two_tokens(
    method: str, template: list[int], tables: Tables, drawer: Drawer, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    step1 = emitted_per_trial(method, template, torch.full((TRIALS,), ROOT), tables, drawer, seed)
    first = torch.tensor([e[0] for e in step1])
    short = [t for t, e in enumerate(step1) if len(e) < 2]
    step2 = emitted_per_trial(method, template, first[short], tables, drawer, seed + 2)
    second = torch.tensor([e[1] if len(e) >= 2 else -1 for e in step1])
    second[short] = torch.tensor([e[0] for e in step2], dtype=torch.int64)
    return first, second


def lossless_pvalues(first: torch.Tensor, second: torch.Tensor, p_table: torch.Tensor) -> tuple[float, float]:
    first_law = p_table[ROOT]
    joint_law = first_law[:, None] * p_table
    first_p = chi_square_pvalue(torch.bincount(first, minlength=VOCAB), first_law)
    joint_counts = torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB)
    return first_p, chi_square_pvalue(joint_counts, joint_law)


@pytest.mark.parametrize("temperature, top_p, table_seed, template", CONFIGS)
def test_sequoia_lossless_without_replacement_and_specinfer_is_not(
    temperature: float, top_p: float, table_seed: int, template: list[int]
) -> None:
    tables = markov_tables(table_seed, temperature, top_p)
    first, second = first_two_tokens("sequoia", template, tables, draw_without_replacement, seed=100)
    assert min(lossless_pvalues(first, second, tables[0])) > ALPHA
    # the same children (same drafting seed) verified with SpecInfer's fixed-Q rule
    first, second = first_two_tokens("specinfer", template, tables, draw_without_replacement, seed=100)
    assert max(lossless_pvalues(first, second, tables[0])) < ALPHA


@pytest.mark.parametrize("temperature, top_p, table_seed, template", CONFIGS)
def test_topk_lossless_with_top_k_children_and_specinfer_is_not(
    temperature: float, top_p: float, table_seed: int, template: list[int]
) -> None:
    tables = markov_tables(table_seed, temperature, top_p)
    first, second = first_two_tokens("topk", template, tables, draw_top_k, seed=200)
    assert min(lossless_pvalues(first, second, tables[0])) > ALPHA
    first, second = first_two_tokens("specinfer", template, tables, draw_top_k, seed=200)
    assert max(lossless_pvalues(first, second, tables[0])) < ALPHA


@pytest.mark.parametrize("temperature, top_p, table_seed, template", CONFIGS)
def test_specinfer_lossless_with_replacement(
    temperature: float, top_p: float, table_seed: int, template: list[int]
) -> None:
    tables = markov_tables(table_seed, temperature, top_p)
    first, second = first_two_tokens("specinfer", template, tables, draw_with_replacement, seed=300)
    assert min(lossless_pvalues(first, second, tables[0])) > ALPHA
