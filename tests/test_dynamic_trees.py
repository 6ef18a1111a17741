"""Dynamic trees in the engine: growth rules, greedy output equal to transformers on every test architecture,
batches equal to sequences alone, and the tree options of the API."""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import CONFIGS, make_truncated_draft
from offload_runtime import Engine
from offload_runtime.errors import UsageError
from offload_runtime.model.tree import Tree
from offload_runtime.spec.growth import (
    ConfidenceAcceptance, DraftProbabilities, DynamicTree, PositionalAcceptance, TreeGrowth, predicted_floor,
)
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_first_tree, expected_tokens
from test_batching import MAX_NEW, run_batch
from test_generate import ARCH_CONFIGS, hf_greedy

FAMILIES = ARCH_CONFIGS + ["qwen3-qk-norm"]  # Llama (3 variants), Mistral, Qwen2, Qwen3

# --- growth on its own


def grow_fixed(spec: DynamicTree, top_of, room: int = 1 << 20):
    """Grow with a fixed sorted-probability row per node (top_of(node) -> [R]) and children tokens 10, 11, ..."""
    g = TreeGrowth(spec, 3, room)
    widths = []
    while g.frontier:
        widths.append(len(g.frontier))
        top = np.stack([top_of(u)[: g.max_children] for u in g.frontier])
        k = g.expand(spec.model.estimate(top))
        g.add_children([list(range(10, 10 + kk)) for kk in k])
    return g.finish(), widths


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 64, 300])
@pytest.mark.parametrize("d", [1, 2, 5, 12])
def test_positional_keys_grow_sequoias_best_tree(n, d):
    """With a_u(r) = p[r] for every node, growth is Sequoia's best-first search: the optimal static tree."""
    p = DEFAULT_ACCEPTANCE
    spec = DynamicTree(n, d, acceptance=PositionalAcceptance(tuple(p)))
    grown, _ = grow_fixed(spec, lambda u: np.linspace(0.5, 0.01, 40))
    value, best = best_first_tree(p, n, d)
    assert expected_tokens(grown.tree, p) == pytest.approx(value, rel=1e-12)
    assert len(grown.tree) == len(best)


def closed_and_ordered(grown) -> bool:
    tree = grown.tree
    for u in range(1, len(tree)):  # kept ranks are 1..k at every node: no earlier sibling missing
        if tree.ranks[u] != (tree.children[tree.parents[u]].index(u) + 1):
            return False
    return True


def test_growth_follows_the_drafts_confidence():
    """A confident chain (one token with all the mass) grows deep; a flat node grows wide; budgets hold."""
    rng = np.random.default_rng(0)
    conf = ConfidenceAcceptance((0.5,), ((0.3, 0.2, 0.1, 0.05), (0.98, 0.01, 0.0, 0.0)))
    spec = DynamicTree(16, 10, acceptance=conf)
    peaked = np.array([0.9, 0.05, 0.03, 0.02])
    flat = np.array([0.3, 0.3, 0.2, 0.2])
    deep, _ = grow_fixed(spec, lambda u: peaked)
    wide, _ = grow_fixed(spec, lambda u: flat)
    assert deep.tree.max_depth == 10 and len(wide.tree.children[0]) == 4 and wide.tree.max_depth < 5
    for _ in range(50):  # random confidences: always a valid tree within budget, closed under earlier siblings
        rows = {}
        n, d = int(rng.integers(2, 40)), int(rng.integers(1, 8))
        spec = DynamicTree(n, d, width=int(rng.integers(1, n + 1)), acceptance=conf)
        grown, widths = grow_fixed(spec, lambda u: rows.setdefault(u, -np.sort(-rng.dirichlet(np.ones(6)))))
        assert len(grown.tree) <= n and grown.tree.max_depth <= d and closed_and_ordered(grown)
        assert max(widths) <= max(1, spec.max_width)  # each draft forward runs at most `width` nodes
        assert grown.drawn_index == sorted(grown.drawn_index)


def test_growth_fits_the_room_left_in_the_context():
    spec = DynamicTree(64, 8)
    for room in (1, 2, 9, 30):
        g = TreeGrowth(spec, 3, room)
        while g.frontier:
            k = g.expand(np.full((len(g.frontier), g.max_children), 0.5) ** np.arange(1, g.max_children + 1))
            g.add_children([list(range(10, 10 + kk)) for kk in k])
        assert len(g.parents) <= room  # every drawn node has its own slot in the draft cache


def test_confidence_acceptance_fit():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 4000)
    # rank 1 is accepted with probability conf, else rank 2 half the time
    u = rng.uniform(0, 1, conf.size)
    ranks = np.where(u < conf, 1, np.where(u < conf + (1 - conf) / 2, 2, 0))
    model = ConfidenceAcceptance.from_counts(conf, ranks, width=3, bins=4)
    assert len(model.table) == 4 and model.table[0][0] < 0.25 < 0.75 < model.table[-1][0]
    assert np.allclose(model.marginal, [np.mean(ranks == 1), np.mean(ranks == 2), 0.0], atol=0.02)
    a = model.estimate(np.array([[0.1, 0.05, 0.0], [0.95, 0.01, 0.01]]))
    assert a[0, 0] < 0.3 and a[1, 0] > 0.8 and a[0, 2] == 0.0  # no mass left at rank 3 of row 0: never drawn
    assert ConfidenceAcceptance.from_dict(model.to_dict()) == model
    assert 0 < predicted_floor(model.marginal, 8, 4) < 1 and predicted_floor(model.marginal, 1, 4) == 0.0


# --- the engine


@pytest.fixture(scope="module")
def drafts(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    return {name: make_truncated_draft(checkpoints[name], root / name, name) for name in CONFIGS}


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_with_dynamic_trees_equals_transformers(checkpoints, drafts, name):
    vocab = CONFIGS[name]["vocab_size"]
    ids = np.random.default_rng(4).integers(3, vocab, 11).tolist()
    expected = hf_greedy(checkpoints[name], ids, 64)
    for spec in (DynamicTree(12, 6), DynamicTree(24, 10, width=4, acceptance=PositionalAcceptance((0.7, 0.2)))):
        engine = Engine.from_pretrained(checkpoints[name], dtype="float64", draft=str(drafts[name]), tree=spec)
        result = engine.generate(ids, max_new_tokens=64, temperature=0, ignore_eos=True)[0]
        assert result.token_ids == expected
        assert result.stats.tokens_per_step > 1.1  # the draft's guesses were accepted: the trees mattered
        assert max(result.stats.tree_sizes) <= spec.size


SPEC = DynamicTree(10, 5)


@pytest.fixture(scope="module")
def alone_dynamic(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=SPEC)
    return {greedy: run_batch(engine, greedy)[0] for greedy in (True, False)}


@pytest.mark.parametrize("greedy, offload", [(True, False), (False, False), (True, True)])
def test_dynamic_batch_equals_each_prompt_alone(tiny_pair, alone_dynamic, greedy, offload):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=SPEC, batch_size=4,
                                    offload=offload, resident_layers=1 if offload else None)
    got, order = run_batch(engine, greedy=greedy)
    assert got == alone_dynamic[greedy]
    assert [len(t) for t in got] == MAX_NEW and order != sorted(order)


def test_greedy_dynamic_equals_plain_near_the_end_of_the_context(tiny_pair):
    """Growth shrinks to the room left in the window: a prompt close to max_seq_len still decodes exactly."""
    target, draft = tiny_pair
    ids = list(range(3, 50))
    plain = Engine.from_pretrained(target, draft=False, dtype="float64", max_seq_len=64)
    grown = Engine.from_pretrained(target, draft=str(draft), dtype="float64", max_seq_len=64,
                                   tree=DynamicTree(40, 12))
    a = plain.generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True)[0]
    b = grown.generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids and b.finish_reason == a.finish_reason


def test_tree_options(tiny_pair):
    target, draft = tiny_pair
    dyn = Engine.from_pretrained(target, draft=str(draft), tree="dynamic", tree_size=8, tree_depth=4, plan=None)
    params = dyn.sampling_params(temperature=0)
    assert dyn.tree_for(params) == DynamicTree(8, 4)
    assert isinstance(dyn.tree_for(params).model, DraftProbabilities)  # no plan: the draft's own probabilities
    out = dyn.generate([5, 6, 7], max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    assert max(out.stats.tree_sizes) <= 8 and out.stats.root_confidence
    static = dyn.tree_for(params, "static")  # per call: the best static tree of the same budget
    assert isinstance(static, Tree) and len(static) == 8 and static.max_depth <= 4
    plain = dyn.generate([5, 6, 7], max_new_tokens=12, temperature=0, ignore_eos=True, tree="static")[0]
    assert plain.token_ids == out.token_ids and set(plain.stats.tree_sizes) <= {1, 8}
    auto = Engine.from_pretrained(target, draft=str(draft), plan=None)
    assert isinstance(auto.tree_for(params), Tree)  # no plan: Sequoia's default tree
    bad = [dict(tree="bushy"), dict(tree="dynamic", tree_size=0), dict(tree_depth=True),
           dict(tree=[-1, 0], tree_size=4), dict(tree=[-1, 1])]
    for options in bad:
        with pytest.raises(UsageError):
            Engine.from_pretrained(target, draft=str(draft), plan=None, **options)


def test_positional_growth_drafts_exactly_like_the_static_tree(tiny_pair):
    """Growth keyed by a positional vector is Sequoia's best-first tree, so the whole run must match the static
    tree's step for step: the same accepted paths, which needs the grown rows' draft cache kept right (a draft
    K/V left at the wrong slot changes the draft's next guesses, though never the greedy output)."""
    target, draft = tiny_pair
    p = (0.6, 0.2, 0.1, 0.05)
    n, d = 14, 6
    prompts = [[5, 9, 14], list(range(3, 30)), [40, 41, 42, 43]]
    runs = []
    for tree in (best_first_tree(p, n, d)[1], DynamicTree(n, d, acceptance=PositionalAcceptance(p))):
        engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=tree, batch_size=2)
        out = engine.generate(prompts, max_new_tokens=30, temperature=0, ignore_eos=True)
        runs.append([(r.token_ids, r.stats.accepted_per_step, r.stats.accepted_ranks) for r in out])
    assert runs[0] == runs[1]
    assert sum(sum(a) for _, a, _ in runs[0]) > 20  # paths were accepted, several nodes deep


def test_command_line_tree_flags(tiny_pair):
    from offload_runtime.chat import parse_args
    from offload_runtime.cli import load_engine
    from test_cli import one_line_error, run

    target, draft = tiny_pair
    common = ["--model", str(target), "--draft", str(draft), "--plan", "none", "--device", "cpu"]
    engine = load_engine(parse_args(common + ["--tree", "dynamic", "--tree-size", "8", "--tree-depth", "3"]))
    assert engine.tree_for(engine.sampling_params(temperature=0)) == DynamicTree(8, 3)
    engine = load_engine(parse_args(common + ["--tree=-1,0,0,1"]))
    assert engine.tree_for(engine.sampling_params(temperature=0)) == Tree([-1, 0, 0, 1])
    for flags, pattern in ((["--tree", "bushy"], "tree must be one of"), (["--tree=-1,x"], "parent array"),
                           (["--tree", "dynamic", "--tree-size", "0"], "tree_size")):
        with pytest.raises(UsageError, match=pattern):
            load_engine(parse_args(common + flags))
    one_line_error(run("offload_runtime.chat", *common, "--tree", "bushy"), 2, "tree must be one of")


@pytest.mark.slow
def test_ablations_dynamic_experiment_returns_every_family(tmp_path):
    """tools/ablations.py --experiments dynamic in its small mode: each size has the three families and the plain
    baseline measured on the same prompts, the keys table its three keys, and the section its claims."""
    import torch
    from helpers import load_tool

    abl = load_tool("ablations")
    threads = torch.get_num_threads()
    try:
        out = abl.run(["--small", "--no-write", "--experiments", "dynamic", "--plots-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    res = out.results
    assert set(res.dynamic) == {0.0, 0.6} and not res.sizes and not res.settings
    for t, rows in res.dynamic.items():
        assert [r.n for r in rows] == [4, 16] and res.acceptance[(t, 1.0)].confidence["table"]
        for r in rows:
            assert set(r.measured) == {"dynamic", "dp", "kseq", "plain"}
            assert r.measured["plain"].mean == 1.0 and r.speed("plain") == 1.0
            for fam in ("dynamic", "dp", "kseq"):
                m = r.measured[fam]
                assert 1 <= m.mean <= r.n and m.tokens_per_s > 0 and len(m.seqs) == r.prompts
            assert r.measured["dynamic"].nodes <= r.n and r.measured["dynamic"].draft_nodes > 0
            assert math.isfinite(r.gain()[0])
    assert [(k.temperature, k.n) for k in res.keys] == [(0.0, 4), (0.6, 4)]
    assert all(set(k.measured) == {"confidence", "draft", "positional"} for k in res.keys)
    titles = [t.title for t in out.tables]
    assert sum(t.startswith(abl.DYNAMIC_TITLE) for t in titles) == 2 and any(t.startswith(abl.KEYS_TITLE)
                                                                               for t in titles)
    assert sum(c.startswith(("greedy (T = 0): dynamic", "T = 0.6, top-p 1: dynamic")) for c in out.claims) == 2
    section = abl.markdown_section(res, out.tables, machine="M", command=out.command, minutes=1.0, intro=[],
                                   images=out.images, md_path=tmp_path / "B.md")
    assert "Dynamic trees against Sequoia's static tree" in section and "The paper's claims" not in section


def test_one_draft_forward_per_level_for_the_whole_batch(tiny_pair):
    """Every row grows its own tree, yet a step runs at most `depth` draft forwards, whatever the batch size."""
    target, draft = tiny_pair
    spec = DynamicTree(12, 4)
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", tree=spec, batch_size=4)
    forwards, per_step = [0], []
    real_forward, real_step = engine.draft.forward, engine.decoder.step

    def counting_forward(*args, **kwargs):
        forwards[0] += 1
        return real_forward(*args, **kwargs)

    def counting_step(rows):
        forwards[0] = 0
        real_step(rows)
        per_step.append(forwards[0])

    engine.draft.forward, engine.decoder.step = counting_forward, counting_step
    prompts = [[5, 9, 14], [7, 8], [40, 41, 42], [11, 3, 11]]
    out = engine.generate(prompts, max_new_tokens=20, temperature=0.9, seed=1, ignore_eos=True)
    assert len({tuple(r.stats.tree_sizes) for r in out}) > 1  # the rows grew trees of their own
    # Four rows of trees several levels deep: one forward per row and level would pass the depth at once.
    assert 2 <= max(per_step) <= spec.depth and len(per_step) < sum(r.stats.steps for r in out)
