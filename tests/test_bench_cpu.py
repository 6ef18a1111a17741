"""tools/bench_cpu.py: the small mode end to end (its returned tables), --no-write, the shared table writer
and BENCHMARKS.md appender (tools/report.py), the tree and run helpers (tools/harness.py)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from helpers import load_tool

bench = load_tool("bench_cpu")
h = load_tool("harness")
report = load_tool("report")


@pytest.fixture
def keep_threads():
    """The tools set torch's thread count for their run; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- the script, small mode


@pytest.mark.slow
def test_small_mode_measures_every_section(keep_threads):
    out = bench.run(["--small", "--no-write", "--threads", "1"])

    base = out.table("Baselines on small")
    assert {(r["method"], r["T"]) for r in base.rows} == {
        (m, t) for m in ("HF generate", "HF assisted", "ours plain", "ours sequoia") for t in (0.0, 0.6)}
    for r in base.rows:
        assert r["vs_hf"] > 0 and r["vs_assisted"] > 0 and not math.isnan(r["tokens_per_step"]), r
        if r["T"] == 0:  # greedy: every method gives exactly transformers' greedy tokens
            assert r["same"].ok and r["same"].total == 2, r
    hf = base.row(method="HF generate", T=0.0)
    assert hf["vs_hf"] == 1.0 and hf["tokens_per_step"] == 1.0  # greedy generate: one token per target forward

    trees = out.table("Trees on small")
    greedy = [r for r in trees.rows if r["T"] == 0]
    names = [r["tree"] for r in greedy]
    assert names[:3] == ["plain", "sequoia", "chain 16"] and names[3].endswith("sequences"), names
    k, l = (int(x) for x in names[3].split(" sequences")[0].split(" x "))
    assert k * l + 1 == 16 and greedy[3]["nodes"] == 16
    # grown trees with the planned tree's budget, no static expectation
    assert names[4:] == ["dynamic"] and greedy[4]["nodes"] == 16 and greedy[4]["expected"] is None
    assert all(r["same"].ok for r in greedy)  # trees are lossless at T = 0
    assert all(r["tokens_per_step"] >= 1 for r in trees.rows)

    stream = out.table("Streaming on small")
    assert stream.column("target") == ["resident", "streamed"]
    assert stream.rows[0]["gbps"] is None and stream.rows[1]["gbps"] > 0  # only the streamed engine has sweeps
    assert stream.rows[1]["same"].ok

    plan = out.table("Plan check on small")
    keys = plan.column("key")
    assert keys[:2] == ["tokens_per_step", "s_per_token"], keys  # a plan was made and checked
    if "1 nodes, depth 0" in plan.notes[0]:  # quick profiles are noisy: plain decoding won
        assert any("no speed reference: the plan had no calibration run" in n for n in plan.notes), plan.notes
    else:  # the usual case (given acceptance 0.97): a tree, calibrated with its speed reference
        assert keys[2:4] == ["reference", "s_per_token_adjusted"], keys
        assert plan.rows[2]["measured"] > 0 and plan.rows[3]["measured"] > 0
    assert all(r["measured"] > 0 for r in plan.rows if r["key"] != "draft_s")

    batch = out.table("Batching on small")
    assert batch.column("B") == [1, 2, 4]
    per_token = batch.column("sweeps_per_token")
    assert per_token == sorted(per_token, reverse=True) and per_token[-1] < per_token[0]
    assert out.machine and out.command == "python tools/bench_cpu.py --small --no-write --threads 1"


def test_no_write_leaves_the_markdown_alone_and_writing_appends(tmp_path, monkeypatch, capsys):
    table = report.Table("T", [report.Column("a", "a")], [{"a": 1}])
    monkeypatch.setattr(bench, "run", lambda argv: bench.Report([table], "machine M", "python tools/bench_cpu.py"))
    md = tmp_path / "B.md"
    assert bench.main(["--no-write", "--output", str(md)]) == 0
    assert not md.exists() and "== T" in capsys.readouterr().out
    assert bench.main(["--output", str(md)]) == 0
    text = md.read_text()
    assert "## CPU benchmarks, " in text and "Command: `python tools/bench_cpu.py`" in text and "| 1 |" in text


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--sections", "baselines,nope"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


# --- the table writers and the BENCHMARKS.md appender (tools/report.py)


def _table():
    return report.Table("Speed | on x", [report.Column("method", "method"), report.Column("tps", "tokens/s", ".3g")],
                        [{"method": "ours", "tps": 12.5}, {"method": "HF|gen", "tps": 10.0}], ["a note"])


def test_section_is_created_then_appended_with_dated_headings(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    t = _table()
    report.append(path, report.section("CPU benchmarks", machine="CPU X, 2 threads", blocks=[t],
                                       command="`python tools/bench_cpu.py --small`", date="2030-01-02 03:04"))
    first = path.read_text()
    assert first.startswith("# Benchmarks\n")
    assert "## CPU benchmarks, 2030-01-02 03:04" in first
    assert "Machine: CPU X, 2 threads" in first and "Command: `python tools/bench_cpu.py --small`" in first
    lines = first.splitlines()
    i = lines.index("### Speed | on x")  # a heading: pipes need no escape there
    assert lines[i + 2:i + 6] == ["| method | tokens/s |", "|:---|---:|", "| ours | 12.5 |", "| HF\\|gen | 10 |"]
    assert "- a note" in first

    report.append(path, report.section("CPU benchmarks", machine="CPU Y", command="cmd 2", blocks=[t],
                                       date="2030-01-03 00:00"))
    second = path.read_text()
    assert second.startswith(first)  # appended, nothing rewritten
    assert second.count("# Benchmarks\n") == 1 and second.count("## CPU benchmarks, ") == 2
    assert second.index("2030-01-02") < second.index("2030-01-03")


def test_append_keeps_an_existing_file(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Our numbers\n\nGPU table here")  # no trailing newline
    report.append(path, report.section("CPU benchmarks", machine="m", command="c", date="d",
                                       blocks=[report.Table("T", [report.Column("a", "a")], [{"a": "1"}])]))
    text = path.read_text()
    assert text.startswith("# Our numbers\n\nGPU table here\n\n## CPU benchmarks, d")
    assert "# Benchmarks" not in text


def test_text_table_is_aligned_and_cells_format_their_values():
    t = report.Table("title", [report.Column("name", "name"), report.Column("x", "x", ".3g"),
                               report.Column("r", "vs", report.times)],
                     [{"name": "a", "x": 1.0, "r": float("nan")}, {"name": "longer", "x": 22.5, "r": 1.5}], ["n"])
    lines = report.to_text(t).splitlines()
    assert lines[0] == "== title"
    assert len({len(line) for line in lines[1:5]}) == 1  # header, dashes and rows share one width
    assert lines[3].startswith("a ") and lines[3].endswith("   1      -")  # NaN prints as "-"
    assert lines[4].endswith("22.5  1.50x") and lines[-1] == "   n"
    assert t.column("x") == [1.0, 22.5] and t.row(name="longer")["r"] == 1.5


# --- helpers


@pytest.mark.parametrize("n", [5, 7, 10, 16, 17, 32, 64])
def test_kxl_shape_is_closest_in_size(n):
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, expected_tokens, k_sequences_tree

    k, l = bench.kxl_shape(n, DEFAULT_ACCEPTANCE)
    assert k >= 2 and l >= 2
    best_gap = min(abs(a * b + 1 - n) for a in range(2, n) for b in range(2, n))
    assert abs(k * l + 1 - n) == best_gap
    # among the shapes of that size, the one with the most expected tokens
    ties = [(a, b) for a in range(2, n) for b in range(2, n) if abs(a * b + 1 - n) == best_gap]
    assert expected_tokens(k_sequences_tree(k, l), DEFAULT_ACCEPTANCE) == max(
        expected_tokens(k_sequences_tree(a, b), DEFAULT_ACCEPTANCE) for a, b in ties)


def _run(tokens, seconds, steps, draft_s=0.0, sweep_s=0.0, host_s=0.0):
    return h.Run(tokens, seconds, h.CallStats(steps=steps, draft_s=draft_s, sweep_s=sweep_s, host_s=host_s))


def test_interleaved_warms_up_then_rotates_the_order():
    calls = []

    def method(name):
        def run(r):
            calls.append((name, r))
            return _run([[1, 2]], 1.0, 2)
        return run

    runs = h.interleaved({"A": method("A"), "B": method("B"), "C": method("C")}, repeats=3)
    assert calls[:3] == [("A", -1), ("B", -1), ("C", -1)]
    assert [c[0] for c in calls[3:]] == list("ABC" "BCA" "CAB")
    assert {k: len(v) for k, v in runs.items()} == {"A": 3, "B": 3, "C": 3}


def test_summary_and_greedy_check():
    runs = [_run([[1, 2, 3], [4]], 2.0, 2, 0.1, 0.5, 0.02), _run([[1, 2, 3], [4]], 1.0, 2, 0.1, 0.3, 0.02)]
    s = h.summarise(runs)
    assert s.tokens_per_s == pytest.approx(3.0)  # median of 2 and 4 tokens/s
    assert s.tokens_per_step == pytest.approx(2.0)
    assert s.sweep_ms == pytest.approx(200)  # 0.8 s over 4 steps
    assert s.draft_ms == pytest.approx(50) and s.host_ms == pytest.approx(10)
    assert h.same_tokens(runs, runs).ok and str(h.same_tokens(runs, runs)) == report.CHECK
    other = h.same_tokens([_run([[1, 2, 3], [5]], 1.0, 2)], runs)
    assert (other.differ, other.total) == (1, 2) and str(other) == f"{report.CROSS} 1/2 differ"


def test_engine_runs_are_timed_per_call_and_give_each_prompt_its_seed(tiny_pair):
    """run_engine goes through the public API only: the call's CallStats, not the decoder's running totals."""
    pair = h.Pair("tiny", tiny_pair[0], tiny_pair[1], "test pair")
    engine = h.load_engine(pair, draft=True, max_seq_len=64)
    prompts = [[5, 6, 7], [8, 9]]
    first = h.run_engine(engine, prompts, tree=[-1, 0, 0, 1], tokens=6, temperature=0.8, seed=3)
    again = h.run_engine(engine, prompts, tree=[-1, 0, 0, 1], tokens=6, temperature=0.8, seed=3)
    assert first.tokens == again.tokens and [len(t) for t in first.tokens] == [6, 6]
    assert 0 < first.stats.steps == again.stats.steps <= 12 and first.stats.time_s > 0  # per call, not running
    alone = h.run_engine(engine, prompts[1:], tree=[-1, 0, 0, 1], tokens=6, temperature=0.8, seed=4)
    assert alone.tokens[0] == first.tokens[1]  # prompt i uses seed + i
    stopped = h.run_engine(engine, prompts, tree=[-1, 0, 0, 1], tokens=20, temperature=0.0, stop_at=5)
    assert all(r.finish_reason == "stop" and 5 <= len(r.token_ids) < 5 + 3 for r in stopped.results)


def test_random_pair_draft_is_a_noised_copy_of_the_targets_first_layers(tmp_path):
    from safetensors.torch import load_file

    pair = h.random_pair(tmp_path, h.SMALL_ARGS, "p", "test pair")
    target, draft = load_file(pair.target / "model.safetensors"), load_file(pair.draft / "model.safetensors")
    assert {k for k in draft if ".layers." in k} == {k for k in target if ".layers.0." in k or ".layers.1." in k}
    name = "model.layers.1.mlp.up_proj.weight"
    rel = float((draft[name] - target[name]).std() / target[name].std())
    assert 0.03 < rel < 0.07  # noise 0.05 x the tensor's std
    assert torch.equal(draft["model.norm.weight"], target["model.norm.weight"])  # ones stay ones
    # transformers reads the very weights the runtime's random source holds
    hf = h.hf_model(h.RandomWeights(h.SMALL_ARGS, 0))
    assert torch.equal(hf.model.embed_tokens.weight, target["model.embed_tokens.weight"])


def test_planned_tree_falls_back_to_best_trees_then_follows_a_plan(tmp_path, keep_threads, monkeypatch):
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_trees

    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(tmp_path / "home"))
    pair = h.random_pair(tmp_path, h.SMALL_ARGS, "p", "test pair")
    choice = bench.planned_tree(pair, 0.0, 16, 6)
    assert choice.plan is None and "no plan" in choice.source and "default acceptance" in choice.source
    assert choice.parents == best_trees(DEFAULT_ACCEPTANCE, 16, 6).tree(16, 6)

    bench.make_quick_plan(pair, threads=1)
    choice = bench.planned_tree(pair, 0.0, 16, 6)
    assert choice.plan is not None and choice.source.startswith("the plan ")
    assert choice.parents == list(choice.plan.tree)
    assert bench.planned_tree(pair, 0.6, 16, 6).plan is None  # a greedy plan does not serve sampled runs
    # the comparison trees have the planned tree's size (k x l: the closest size k * l + 1)
    trees = bench.comparison_trees(choice)
    assert len(trees[f"chain {len(choice.parents)}"]) == len(choice.parents)


def test_an_output_a_tool_cannot_write_is_refused_before_it_runs(tmp_path):
    assert h.output_file(str(tmp_path / "new.md")) == tmp_path / "new.md"
    for bad, why in ((tmp_path / "no" / "x.md", "does not exist; create it first"), (tmp_path, "not a regular file")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            h.output_file(str(bad))
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--small", "--output", str(tmp_path / "no" / "x.md")])
    assert e.value.code == 2
    assert not (tmp_path / "no").exists()


def test_a_work_directory_that_cannot_be_written_is_refused_before_a_run(tmp_path, capsys):
    assert h.work_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be used as a work directory"):
        h.work_dir(str(blocker / "sub"))
    with pytest.raises(SystemExit) as e:  # a path under a file: refused as root too, unlike a read-only directory
        bench.parse_args(["--small", "--workdir", str(blocker / "sub")])
    assert e.value.code == 2 and "cannot be used as a work directory" in capsys.readouterr().err
