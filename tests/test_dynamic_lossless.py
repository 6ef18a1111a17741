"""Dynamic trees stay lossless: Sequoia's verifier on trees grown from the draft's probabilities emits exactly the
target's distribution, and two plausible wrong ways to prune fail the same tests.

Statistical part (Markov tables, as tests/test_verify.py): each trial grows one tree from the root token with
`TreeGrowth` over the draft table Q, verifies it with `verify_sequoia` against the target table P, and records
the first two emitted tokens; the exact law is P[ROOT] and P[ROOT][a] P[a][b]. The wrong variants:
  - drop_first: the root's first child (and its subtree) is pruned while later siblings stay, and the walk tests
    them against the untouched Q (their real law is Q without the dropped child's token);
  - own_q: a node is kept only while its own drawn token has draft probability >= 0.2 (later siblings go with
    it, so the tree stays closed under earlier siblings): the shape then selects on the token being tested,
    EAGLE-2-style reranking by actual draft probabilities.
Both must fail (p < ALPHA), which shows the sample is large enough to see a wrong pruning rule.

End to end (the 12-token pair of tests/test_lossless_end_to_end.py): thousands of seeded engine generations with
dynamic trees fit the enumerated law of the 2nd and 3rd tokens; the same engine with the drop_first pruning
patched into the decoder's growth does not.
"""
from __future__ import annotations

import pytest
import torch

from helpers import ALPHA, chi_square_pvalue
from offload_runtime import Engine
from offload_runtime.model.tree import Tree
from offload_runtime.spec.growth import DraftProbabilities, DynamicTree, GrownTree, TreeGrowth
from offload_runtime.spec.sampling import gumbel_top_k, make_generator
from offload_runtime.spec.verify import verify_sequoia
from test_lossless_end_to_end import PROMPT, SETTINGS, exact_laws, pair, sample_tokens  # noqa: F401 (fixture)
from test_verify import CONFIGS, ROOT, TRIALS, VOCAB, lossless_pvalues, markov_tables

SPEC = DynamicTree(size=7, depth=3, acceptance=DraftProbabilities())
OWN_Q_MIN = 0.2


# --- pruning variants applied to a grown tree (two of them wrong on purpose)


def subtree_closed(tree: Tree, keep: list[bool]) -> tuple[Tree, list[int]]:
    """The tree restricted to `keep` (closed under parent), renumbered breadth-first, and the nodes kept."""
    kept = [u for u in range(len(tree)) if keep[u]]
    index = {old: new for new, old in enumerate(kept)}
    return Tree([-1] + [index[tree.parents[u]] for u in kept[1:]]), kept


def prune(grown: GrownTree, variant: str, q_of) -> tuple[Tree, list[int]]:
    """The tree and tokens the verifier sees: as grown, or pruned by a wrong rule. q_of(node) is Q at a node."""
    tree, tokens = grown.tree, grown.tokens
    if variant == "grown":
        return tree, tokens
    keep = [True] * len(tree)
    for u in range(1, len(tree)):
        parent = tree.parents[u]
        if not keep[parent]:
            keep[u] = False
        elif variant == "drop_first":
            keep[u] = not (parent == 0 and tree.ranks[u] == 1 and len(tree.children[0]) >= 2)
        elif variant == "own_q":
            earlier = [c for c in tree.children[parent] if c < u]
            keep[u] = all(keep[c] for c in earlier) and float(q_of(parent)[tokens[u]]) >= OWN_Q_MIN
        else:
            raise AssertionError(variant)
    pruned, kept = subtree_closed(tree, keep)
    return pruned, [tokens[u] for u in kept]


# --- the statistical test over Markov tables


def grow(spec: DynamicTree, root: int, q_table: torch.Tensor, gen: torch.Generator) -> GrownTree:
    """One tree grown over the draft table (Q at a node is q_table[its token])."""
    g = TreeGrowth(spec, root, room=1 << 20)
    while g.frontier:
        q = q_table[[g.tokens[u] for u in g.frontier]]
        top = torch.sort(q, dim=-1, descending=True).values[:, : g.max_children].numpy()
        k = g.expand(spec.model.estimate(top))
        g.add_children(gumbel_top_k(q, k, gen).tolist() if any(k) else [[] for _ in k])
    return g.finish()


def emitted(variants: tuple[str, ...], roots: torch.Tensor, tables, seed: int) -> dict[str, list[list[int]]]:
    """Each variant's emitted tokens for one step from each root; the variants prune the same grown trees."""
    p_table, q_table = tables
    draw = make_generator(seed)
    walks = {v: make_generator(seed + 1) for v in variants}
    out: dict[str, list[list[int]]] = {v: [] for v in variants}
    for root in roots.tolist():
        grown = grow(SPEC, root, q_table, draw)
        for v in variants:
            tree, tokens = prune(grown, v, lambda u: q_table[grown.tokens[u]])
            index = torch.tensor(tokens)
            result = verify_sequoia(tree, tokens, p_table[index], q_table[index], walks[v])
            out[v].append([tokens[u] for u in result.path] + [result.bonus_token])
    return out


def first_two(variants: tuple[str, ...], tables, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    step1 = emitted(variants, torch.full((TRIALS,), ROOT), tables, seed)
    out = {}
    for v in variants:
        first = torch.tensor([e[0] for e in step1[v]])
        short = [t for t, e in enumerate(step1[v]) if len(e) < 2]
        step2 = emitted((v,), first[short], tables, seed + 2)[v]
        second = torch.tensor([e[1] if len(e) >= 2 else -1 for e in step1[v]])
        second[short] = torch.tensor([e[0] for e in step2], dtype=torch.int64)
        out[v] = (first, second)
    # Deep acceptances happen (the verifier walks past the root's children often), so the test reaches the tree.
    assert sum(len(e) for e in step1[variants[0]]) / TRIALS > 1.2
    return out


def test_growth_adapts_the_shape_to_the_draft() -> None:
    _, q_table = markov_tables(11, 1.0, 1.0)
    gen = make_generator(0)
    shapes = {grow(SPEC, root, q_table, gen).tree.parents for root in range(VOCAB) for _ in range(20)}
    assert len(shapes) >= 10  # the tests below verify trees of many shapes, not one


@pytest.mark.parametrize("temperature, top_p, table_seed, template", CONFIGS)
def test_grown_trees_are_lossless_and_wrong_pruning_is_not(temperature, top_p, table_seed, template) -> None:
    tables = markov_tables(table_seed, temperature, top_p)
    got = first_two(("grown", "drop_first", "own_q"), tables, seed=400)
    assert min(lossless_pvalues(*got["grown"], tables[0])) > ALPHA
    for wrong in ("drop_first", "own_q"):
        assert max(lossless_pvalues(*got[wrong], tables[0])) < ALPHA, wrong


# --- end to end through the engine


class DropFirstChild(TreeGrowth):
    """The wrong pruning, inside the decoder: the root's first child goes, its later siblings stay."""

    def finish(self) -> GrownTree:
        grown = super().finish()
        tree = grown.tree
        if len(tree.children[0]) < 2:
            return grown
        keep = [True] * len(tree)
        for u in range(1, len(tree)):
            keep[u] = keep[tree.parents[u]] and u != tree.children[0][0]
        pruned, kept = subtree_closed(tree, keep)
        return GrownTree(pruned, [grown.tokens[u] for u in kept], [grown.drawn_index[u] for u in kept],
                         [grown.ran[u] for u in kept])


N = 3000


def test_engine_with_dynamic_trees_has_the_targets_distribution(pair, monkeypatch) -> None:  # noqa: F811
    target, draft = pair
    law2, law3 = exact_laws(target)
    spec = DynamicTree(size=9, depth=3, acceptance=DraftProbabilities())
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=spec, batch_size=64)
    toks = sample_tokens(engine, N)
    stats = engine.last_stats
    assert sum(s.tokens_per_step for s in stats) / N > 1.2  # trees were really accepted
    p2 = chi_square_pvalue(torch.bincount(toks[:, 1], minlength=12), law2)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=12), law3)
    assert p2 > ALPHA and p3 > ALPHA, (p2, p3)

    import offload_runtime.decode.decoder as decoder_module

    monkeypatch.setattr(decoder_module, "TreeGrowth", DropFirstChild)
    toks = sample_tokens(engine, N)
    p2 = chi_square_pvalue(torch.bincount(toks[:, 1], minlength=12), law2)
    p3 = chi_square_pvalue(torch.bincount(toks[:, 2], minlength=12), law3)
    assert min(p2, p3) < ALPHA, (p2, p3)
