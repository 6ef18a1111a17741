"""tools/ablations.py: the small mode end to end (its returned results), --no-write, the estimators, the k-sequence baseline, the
Markdown section and the plots (with and without matplotlib)."""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_tool

PM = "\u00b1"


abl = load_tool("ablations")
report = load_tool("report")
h = load_tool("harness")


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# --- the script, small mode


@pytest.mark.slow
def test_small_mode_measures_every_table_and_writes_plots(tmp_path):
    threads = torch.get_num_threads()
    try:
        out = abl.run(["--small", "--no-write", "--plots-dir", str(tmp_path / "plots")])
    finally:
        torch.set_num_threads(threads)
    res = out.results

    assert set(res.acceptance) == {(0.0, 1.0), (0.6, 1.0), (1.2, 1.0), (1.0, 0.8), (1.0, 0.9)}
    for a in res.acceptance.values():
        assert a.steps > 0 and 0 <= sum(a.p) <= 1 + 1e-9, a  # p[k] are shares of disjoint events

    for t in (0.6, 0.0):
        rows = res.sizes[t]
        assert [r.n for r in rows] == [1, 4, 16]
        one = rows[0].measured
        # One node: plain decoding, exactly one token per step for every family, and every family is that tree.
        assert one["dp"] is one["kseq"] is one["chain"] and (one["dp"].mean, one["dp"].se) == (1.0, 0.0)
        for r in rows:
            for m in r.measured.values():
                assert 1 <= m.mean <= r.n and m.se >= 0, r  # a step emits 1 .. n tokens
            assert r.predicted["dp"] >= max(r.predicted["kseq"], r.predicted["chain"]) - 1e-9, r  # the DP's best
    sizes = [t for t in out.tables if t.title.startswith("Tokens per step vs tree size on small")]
    assert len(sizes) == 2 and all(t.rows[0]["gain"] == "same tree" for t in sizes)
    greedy = next(t for t in sizes if "greedy" in t.title)
    assert abl.greedy_mismatches(res.sizes[0.0]) == []  # greedy is lossless: every tree gave plain decoding's tokens
    assert any(n.startswith("lossless check: every tree's first") for n in greedy.notes), greedy.notes

    assert [(r.temperature, r.top_p) for r in res.settings] == [(0.0, 1.0), (0.6, 1.0), (1.2, 1.0), (1.0, 0.8),
                                                                 (1.0, 0.9)]
    methods = next(t for t in out.tables if t.title.startswith("Tokens per step vs temperature on small"))
    first = methods.rows[0]  # T = 0: all greedy, measured once
    assert first["sequoia"] is first["specinfer"] is first["topk"]
    assert first["vs_specinfer"] is None and first["vs_topk"] is None
    for r in methods.rows[1:]:
        for key in ("vs_specinfer", "vs_topk"):
            gain, se = r[key]
            assert math.isfinite(gain) and se >= 0, r
            assert re.fullmatch(r"[+-]\d+\.\d% ± \d+\.\d", abl.fmt_gain(r[key])), r

    assert out.command.startswith("python tools/ablations.py --small --no-write --plots-dir")
    assert any(s.startswith("Sequoia vs SpecInfer: largest gain") for s in out.claims)
    if _has_matplotlib():
        assert set(out.images) == {abl.TREE_PNG, abl.TEMPERATURE_PNG}
        for png in (abl.TREE_PNG, abl.TEMPERATURE_PNG):
            assert (tmp_path / "plots" / png).stat().st_size > 5000, png
    else:
        assert out.images == {} and "plots skipped: matplotlib is not installed" in out.notice


def test_no_write_leaves_the_markdown_alone(tmp_path, monkeypatch, capsys):
    res = _fake_results()
    fake = abl.Outcome(res, [abl.acceptance_table(res, 3)], ["a claim"], "machine M", "python tools/ablations.py",
                       0.5, ["intro"], {}, None)
    monkeypatch.setattr(abl, "run", lambda argv: fake)
    md = tmp_path / "B.md"
    assert abl.main(["--no-write", "--output", str(md)]) == 0
    assert not md.exists() and "- a claim" in capsys.readouterr().out
    assert abl.main(["--output", str(md)]) == 0
    assert "## Sequoia ablations on the fake pair" in md.read_text()


def test_usage_errors(capsys):
    for argv in (["--experiments", "nope"], ["--model", "x"], ["--prompts", "1"], ["--top-ps", "1.5"],
                 ["--sizes", "0,4"]):
        with pytest.raises(SystemExit) as e:
            abl.parse_args(argv)
        assert e.value.code == 2, argv
    assert "--experiments" in capsys.readouterr().err


def test_a_flag_of_an_experiment_that_does_not_run_is_refused_not_ignored(capsys, tmp_path):
    for argv, flag in ((["--group-size", "64"], "--group-size"),
                       (["--experiments", "sizes", "--top-ps", "0.9"], "--top-ps"),
                       (["--experiments", "methods", "--dynamic-depth", "4"], "--dynamic-depth")):
        with pytest.raises(SystemExit) as e:
            abl.parse_args(argv)
        assert e.value.code == 2 and f"{flag} sets --experiments" in capsys.readouterr().err, argv
    assert abl.parse_args(["--experiments", "drafts", "--group-size", "64"]).group_size == 64
    assert abl.parse_args(["--experiments", "drafts", "--dynamic-depth", "4"]).dynamic_depth == 4
    with pytest.raises(SystemExit):
        abl.parse_args(["--prompts-from", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_token_id_prompts_from_a_file_serve_a_model_without_a_tokenizer(tmp_path):
    from offload_runtime.errors import UsageError

    pair = h.small_pair(tmp_path)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"prompt": [1, 2, 3]}\n{"prompt": [4, 5]}\n')
    prompts, source = abl.load_prompts(str(ids), pair, 2, 8, print)
    assert prompts == [[1, 2, 3], [4, 5]] and source == f"2 prompts from {ids}"
    text = tmp_path / "text.jsonl"
    text.write_text('{"prompt": "words"}\n')
    with pytest.raises(UsageError, match="no tokenizer to encode it"):
        abl.load_prompts(str(text), pair, 1, 8, print)
    ids.write_text('{"prompt": [1, 999999]}\n')
    with pytest.raises(UsageError, match="outside the target's vocabulary"):
        abl.load_prompts(str(ids), pair, 1, 8, print)


# --- estimators


def _simulate(rng: np.random.Generator, n_seq: int, shift: float = 0.0) -> tuple[list, list, list]:
    """Two paired measurements of n_seq sequences, and a's tokens per step: each sequence has its own acceptance
    level (shared by the pair, so steps within a sequence are correlated), 5..15 steps, tokens per step
    1 + Binomial(6, level)."""
    a, b, steps_a = [], [], []
    for _ in range(n_seq):
        level = rng.beta(4, 4)
        for out, q in ((a, level), (b, min(1.0, level + shift))):
            steps = int(rng.integers(5, 16))
            tokens = 1 + rng.binomial(6, q, size=steps)
            out.append((int(tokens.sum()), steps))
            if out is a:
                steps_a.extend(tokens.tolist())
    return a, b, steps_a


def test_standard_errors_match_the_spread_over_repeated_experiments():
    # 400 simulated experiments of 24 sequences. The spread of 400 estimates has a relative standard error of
    # about 1/sqrt(2 * 400) = 3.5%, so +-15% on the ratio (mean SE / observed spread) is > 4 of those errors
    # from 1. A per-step SE that ignores the within-sequence correlation comes out about half as large.
    rng = np.random.default_rng(7)
    R, R_se, G, G_se, naive = [], [], [], [], []
    for _ in range(400):
        a, b, steps_a = _simulate(rng, 24, shift=0.1)
        r, se = abl.ratio_estimate(a)
        g, gse = abl.relative_gain(b, a)
        R.append(r), R_se.append(se), G.append(g), G_se.append(gse)
        naive.append(np.std(steps_a, ddof=1) / np.sqrt(len(steps_a)))  # pretends steps are independent
    assert 0.85 < np.mean(R_se) / np.std(R) < 1.15, (np.mean(R_se), np.std(R))
    assert 0.85 < np.mean(G_se) / np.std(G) < 1.15, (np.mean(G_se), np.std(G))
    assert np.mean(naive) / np.std(R) < 0.7  # the correlation is strong enough for the test to mean something
    assert np.mean(G) > 0.05  # b accepts more: the gain is visible


def test_ratio_and_gain_by_hand():
    r, se = abl.ratio_estimate([(10, 5), (30, 10)])
    assert r == pytest.approx(40 / 15)
    # influences (x - r n) / mean(n): (10 - 40/3) / 7.5 and (30 - 80/3) / 7.5 = -4/9 and +4/9
    assert se == pytest.approx(np.std([-4 / 9, 4 / 9], ddof=1) / np.sqrt(2))
    assert np.isnan(abl.ratio_estimate([(7, 3)])[1])
    g, gse = abl.relative_gain([(20, 5), (60, 10)], [(10, 5), (30, 10)])
    assert g == pytest.approx(1.0) and gse == pytest.approx(0.0, abs=1e-12)  # exactly twice, sequence by sequence


# --- the k-sequence baseline and the tree families


@pytest.mark.parametrize("p", [[0.7, 0.1, 0.05], [0.9, 0.05, 0.03, 0.01], [0.3, 0.2, 0.15, 0.1, 0.1, 0.05],
                               [0.5, 0.0, 0.3], [1.0]])
def test_best_k_sequences_is_the_best_that_fits(p):
    from offload_runtime.spec.tree_search import expected_tokens, k_sequences_tree

    for n in (2, 3, 5, 8, 17, 40):
        k, l = abl.best_k_sequences(n, p)
        assert 1 + k * l <= n and (k >= 2 or n == 2), (n, k, l)
        best = max(expected_tokens(k_sequences_tree(kk, ll), p)
                   for kk in range(2 if n >= 3 else 1, n) for ll in range(1, n) if 1 + kk * ll <= n)
        assert expected_tokens(k_sequences_tree(k, l), p) == pytest.approx(best, rel=1e-12), (n, k, l)


def test_family_trees_fit_the_size():
    from offload_runtime.model.tree import Tree
    from offload_runtime.spec.tree_search import best_trees

    p = [0.6, 0.15, 0.08, 0.04]
    table = best_trees(p, 64, 6)
    for n in (1, 2, 3, 16, 64):
        trees = abl.family_trees(n, p, table, 6)
        for fam, (parents, _) in trees.items():
            Tree(parents)
            assert len(parents) <= n, (fam, n)
        assert len(trees["chain"][0]) == n and Tree(trees["dp"][0]).max_depth <= 6


def test_fewer_prompts_only_above_the_threshold():
    cfg = abl.Settings(sizes=[1], size_temperatures=[0], temperatures=[0], top_ps=[], top_p_temperature=1,
                       prompts=32, min_prompts=12, full_prompts_until=64, tokens=8, batch=4, width=8, max_depth=4,
                       method_tree_size=8, acceptance_tokens=8, prompt_len=8)
    assert [cfg.prompts_for(n) for n in (1, 64, 128, 256, 512)] == [32, 32, 16, 12, 12]


# --- prompts


def test_heldout_prompts_are_first_verses_of_held_out_chapters(tmp_path):
    from offload_runtime.errors import UsageError

    with pytest.raises(UsageError, match="train_demo_pair"):
        abl.heldout_texts(tmp_path / "missing.txt")
    dump = tmp_path / "kjv.txt"
    dump.write_text("".join(f"Ge{c}:{v} chapter {c} verse {v}\n" for c in range(1, 41) for v in (1, 2)),
                    encoding="ascii")
    # every 20th chapter from index 10: chapters 11 and 31 (1-based)
    assert abl.heldout_texts(dump) == ["chapter 11 verse 1", "chapter 31 verse 1"]


def test_builtin_prompts_are_distinct(tiny_pair):
    from planner.acceptance import BUILTIN_PROMPTS

    pair = abl.Pair("tiny", tiny_pair[0], tiny_pair[1], "test pair")
    notes = []
    prompts, source = abl.load_prompts("builtin", pair, len(BUILTIN_PROMPTS) + 8, 8, notes.append)
    assert len(prompts) == len(BUILTIN_PROMPTS) and "built-in" in source
    assert notes and "distinct" in notes[0]


# --- results in words, in Markdown and in plots (synthetic numbers)


def _measured(mean: float, n_seq: int = 6, steps: int = 10, seconds: float = 1.0):
    # sequences alternate between mean - 0.5 and mean + 0.5 tokens per step
    seqs = [(round((mean + (0.5 if j % 2 else -0.5)) * steps), steps) for j in range(n_seq)]
    return abl.Measured(seqs, seconds, [[1, 2, 3]] * n_seq)


def _fake_results() -> "abl.Results":
    pair = abl.Pair("fake", Path("/x/t"), Path("/x/d"), "a fake pair")
    res = abl.Results(pair, "test prompts")
    for t in (0.6, 0.0):
        res.acceptance[(t, 1.0)] = abl.Acceptance([0.7, 0.1, 0.05], 100, 1.0)
        rows = []
        for n in (1, 4, 16, 64):
            same = _measured(1.0)
            m = {"dp": same, "kseq": same, "chain": same} if n == 1 else \
                {"dp": _measured(1 + 0.6 * np.log2(n)), "kseq": _measured(1 + 0.5 * np.log2(n)),
                 "chain": _measured(2.5)}
            rows.append(abl.Row(t, n, m, prompts=6, labels={"dp": f"{n} nodes", "kseq": "2 x 1", "chain": f"{n} nodes"},
                                predicted={f: x.mean * 1.02 for f, x in m.items()}))
        res.sizes[t] = rows
    res.method_tree = [-1, 0, 0, 1]
    res.method_tree_source = "a fixed 4-node tree"
    for t, q in ((0.0, 1.0), (0.6, 1.0), (1.2, 1.0), (1.0, 1.0), (1.0, 0.8)):
        seq = _measured(3.0)
        m = {"sequoia": seq, "specinfer": seq, "topk": seq} if t == 0 else \
            {"sequoia": seq, "specinfer": _measured(2.0), "topk": _measured(3.0 - t)}
        res.settings.append(abl.Row(t, 4, m, top_p=q, prompts=6, predicted={"sequoia": 3.1}))
    return res


def _cfg():
    return abl.Settings(sizes=[1, 4, 16, 64], size_temperatures=[0.6, 0.0], temperatures=[0, 0.6, 1.0, 1.2],
                        top_ps=[0.8], top_p_temperature=1.0, prompts=6, min_prompts=6, full_prompts_until=64,
                        tokens=30, batch=4, width=3, max_depth=4, method_tree_size=4, acceptance_tokens=8,
                        prompt_len=8)


def test_claims_quote_the_measured_gains():
    res = _fake_results()
    claims = abl.tree_claims(res)
    assert len(claims) == 2 and claims[0].startswith("T=0.6: at size 64") and claims[1].startswith("greedy")
    g, se = abl.relative_gain(res.sizes[0.6][-1].measured["dp"].seqs, res.sizes[0.6][-1].measured["kseq"].seqs)
    assert f"DP {g * 100:+.1f}% {PM} {se * 100:.1f} over k sequences" in claims[0]
    assert "(paper: up to +33%" in claims[0]
    words = abl.method_claims(res)
    assert "largest gain +50.0%" in words[0] and "(paper: up to +65%)" in words[0]
    assert "(paper: up to +27%)" in words[1] and "at T=1.2" in words[1]


def test_greedy_mismatch_is_reported():
    res = _fake_results()
    rows = res.sizes[0.0]
    assert abl.greedy_mismatches(rows) == []
    rows[2].measured["kseq"].outputs[0] = [9, 9, 9]
    assert abl.greedy_mismatches(rows) == ["n=16 kseq: 1/6"]
    assert "FAILED" in abl.size_table(res, 0.0, _cfg()).notes[-1]


def test_markdown_section_links_the_plots_and_appends(tmp_path):
    res = _fake_results()
    cfg = _cfg()
    tables = [abl.acceptance_table(res, 3), abl.size_table(res, 0.6, cfg), abl.size_table(res, 0.0, cfg),
              abl.method_table(res, cfg)]
    md = tmp_path / "BENCHMARKS.md"
    images = {abl.TREE_PNG: tmp_path / abl.TREE_PNG, abl.TEMPERATURE_PNG: tmp_path / abl.TEMPERATURE_PNG}
    text = abl.markdown_section(res, tables, machine="CPU X", command="python tools/ablations.py", minutes=1.5,
                                intro=["an intro line"], images=images, md_path=md, date="2030-01-02 03:04")
    lines = text.splitlines()
    assert lines[0] == "## Sequoia ablations on the fake pair, 2030-01-02 03:04"
    assert "Command: `python tools/ablations.py` (1.5 min)" in lines and "- an intro line" in lines
    tree_img = lines.index(f"![tokens per step vs tree size]({abl.TREE_PNG})")
    temp_img = lines.index(f"![tokens per step vs temperature]({abl.TEMPERATURE_PNG})")
    greedy_title = next(i for i, line in enumerate(lines) if line.startswith("### Tokens per step vs tree size") and
                        "greedy" in line)
    method_title = next(i for i, line in enumerate(lines) if line.startswith("### Tokens per step vs temperature"))
    assert greedy_title < tree_img < method_title < temp_img  # each plot after the last table it draws
    assert "**Where we differ from the paper, and why.**" in text
    report.append(md, text)
    first = md.read_text()
    assert first.startswith("# Benchmarks\n") and text in first
    report.append(md, text)
    assert md.read_text().startswith(first) and md.read_text().count("## Sequoia ablations") == 2


def test_plots_are_written_or_skipped_with_a_notice(tmp_path, monkeypatch):
    res = _fake_results()
    if _has_matplotlib():
        images, notice = abl.write_plots(res, tmp_path / "a")
        assert notice is None and set(images) == {abl.TREE_PNG, abl.TEMPERATURE_PNG}
        assert all(p.stat().st_size > 5000 for p in images.values())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    images, notice = abl.write_plots(res, tmp_path / "b")
    assert images == {} and "pip install" in notice and not (tmp_path / "b").exists()


def test_drafts_experiment_compares_the_trained_draft_with_self_drafts():
    threads = torch.get_num_threads()
    try:
        out = abl.run(["--small", "--no-write", "--experiments", "drafts"])
    finally:
        torch.set_num_threads(threads)
    rows = out.results.drafts
    assert [(r.temperature, r.draft) for r in rows] == [(t, d) for t in (0.0, 0.6)
                                                        for d in ("trained", "self-int4", "self-int8")]
    for r in rows:
        assert 1 <= r.measured["static"].mean <= r.n and r.measured["plain"].mean == 1.0, r
    # Greedy is lossless whatever drafts: every draft's tokens are plain decoding's.
    greedy = [r for r in rows if r.temperature == 0.0]
    assert all(r.measured[k].outputs == greedy[0].measured["plain"].outputs for r in greedy for k in ("static", "dynamic"))
    # The int8 copy of the small target agrees with it more than its noised 2-layer draft does.
    assert greedy[2].measured["static"].mean > greedy[0].measured["static"].mean
    table = next(t for t in out.tables if t.title.startswith(abl.DRAFTS_TITLE))
    assert [row["draft"] for row in table.rows] == [r.draft for r in rows]
    assert any("self-int4 gives" in c for c in out.claims)
