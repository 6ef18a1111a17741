"""tools/bench_cpu.py: the small mode end to end (a subprocess), the Markdown writer, the tree and run helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_tool

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "bench_cpu.py"


bench = load_tool("bench_cpu")


# --- the script, small mode


def _section(out: str, title_start: str) -> list[str]:
    """The lines of the table whose title starts with `title_start` (up to the next blank line)."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"== {title_start}")]
    assert len(starts) == 1, f"expected one table '{title_start}', got {len(starts)}:\n{out}"
    body = []
    for line in lines[starts[0] + 1:]:
        if not line.strip():
            break
        body.append(line)
    return body


def _rows(table: list[str]) -> list[list[str]]:
    """Data rows (after the header and its dashes; before the indented notes), split on 2+ spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in table[2:] if not line.startswith("   ")]


@pytest.mark.slow
def test_small_mode_prints_every_section_and_leaves_benchmarks_md_alone():
    md = REPO / "BENCHMARKS.md"
    before = md.read_bytes() if md.exists() else None
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--no-write", "--threads", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # BENCHMARKS.md untouched under --no-write (neither created nor appended to).
    assert (md.read_bytes() if md.exists() else None) == before

    base = _rows(_section(out, "Baselines on small"))
    methods = {(r[0], r[1]) for r in base}
    assert methods == {(m, t) for m in ("HF generate", "HF assisted", "ours plain", "ours sequoia") for t in ("0", "0.6")}
    for r in base:
        assert r[3].endswith("x") and r[5] != "nan", r
        if r[1] == "0":  # greedy: every method gives exactly transformers' greedy tokens
            assert r[-1] == bench.CHECK, r
    hf = next(r for r in base if r[:2] == ["HF generate", "0"])
    assert hf[3] == "1.00x" and hf[5] == "1.00", hf  # greedy generate: one token per target forward

    trees = _rows(_section(out, "Trees on small"))
    names = [r[0] for r in trees if r[1] == "0"]
    assert names[:3] == ["plain", "sequoia", "chain 16"] and names[3].endswith("sequences"), names
    k, l = (int(x) for x in names[3].split(" sequences")[0].split(" x "))
    assert k * l + 1 == 16
    assert all(r[-1] == bench.CHECK for r in trees if r[1] == "0")  # trees are lossless at T = 0

    stream = _rows(_section(out, "Streaming on small"))
    assert [r[0] for r in stream] == ["resident", "streamed"]
    assert float(stream[1][5]) > 0  # the streamed engine reports its sweeps' GB/s

    table = _section(out, "Plan check on small")
    plan = _rows(table)
    assert [r[0] for r in plan][:2] == ["tokens/step", "s/token"], plan  # a plan was made and checked
    if any(" 1 nodes, depth 0" in line for line in table):  # quick profiles are noisy: plain decoding won
        assert any("no speed reference: the plan had no calibration run" in line for line in table), table
    else:  # the usual case (given acceptance 0.97): a tree, calibrated with its speed reference
        assert [r[0] for r in plan][2:4] == ["plain s/token (speed reference)", "s/token at the plan's speed"], plan
        assert float(plan[2][2]) > 0 and float(plan[3][2]) > 0

    batch = _rows(_section(out, "Batching on small"))
    assert [r[0] for r in batch] == ["1", "2", "4"]
    sweeps_per_token = [float(r[4]) for r in batch]
    assert sweeps_per_token == sorted(sweeps_per_token, reverse=True) and sweeps_per_token[-1] < sweeps_per_token[0]
    assert "machine: " in out and "command: python tools/bench_cpu.py --small --no-write" in out


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--sections", "baselines,nope"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


# --- the Markdown writer


def test_append_report_creates_the_file_then_appends_dated_sections(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    t = bench.Table("Speed | on x", ["method", "tokens/s"], [["ours", "12.5"], ["HF|gen", "10"]], ["a note"])
    bench.append_report(path, [t], machine="CPU X, 2 threads", command="python tools/bench_cpu.py --small",
                        date="2030-01-02 03:04")
    first = path.read_text()
    assert first.startswith("# Benchmarks\n")
    assert "## CPU benchmarks, 2030-01-02 03:04" in first
    assert "Machine: CPU X, 2 threads" in first and "Command: `python tools/bench_cpu.py --small`" in first
    lines = first.splitlines()
    i = lines.index("### Speed | on x")  # a heading: pipes need no escape there
    assert lines[i + 2:i + 6] == ["| method | tokens/s |", "|:---|---:|", "| ours | 12.5 |", "| HF\\|gen | 10 |"]
    assert "- a note" in first

    bench.append_report(path, [t], machine="CPU Y", command="cmd 2", date="2030-01-03 00:00")
    second = path.read_text()
    assert second.startswith(first)  # appended, nothing rewritten
    assert second.count("# Benchmarks\n") == 1 and second.count("## CPU benchmarks, ") == 2
    assert second.index("2030-01-02") < second.index("2030-01-03")


def test_append_report_keeps_an_existing_file(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Our numbers\n\nGPU table here")  # no trailing newline
    bench.append_report(path, [bench.Table("T", ["a"], [["1"]])], machine="m", command="c", date="d")
    text = path.read_text()
    assert text.startswith("# Our numbers\n\nGPU table here\n\n## CPU benchmarks, d")
    assert "# Benchmarks" not in text


def test_text_table_is_aligned():
    t = bench.Table("title", ["name", "x"], [["a", "1"], ["longer", "22.5"]], ["n"])
    lines = bench.format_text(t).splitlines()
    assert lines[0] == "== title"
    assert len({len(line) for line in lines[1:5]}) == 1  # header, dashes and rows share one width
    assert lines[3].startswith("a ") and lines[3].endswith("   1")
    assert lines[-1] == "   n"


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


def test_interleaved_warms_up_then_rotates_the_order():
    calls = []

    def method(name):
        def run(r):
            calls.append((name, r))
            return bench.Run([[1, 2]], 1.0, 2)
        return run

    runs = bench.interleaved({"A": method("A"), "B": method("B"), "C": method("C")}, repeats=3)
    assert calls[:3] == [("A", -1), ("B", -1), ("C", -1)]
    assert [c[0] for c in calls[3:]] == list("ABC" "BCA" "CAB")
    assert {k: len(v) for k, v in runs.items()} == {"A": 3, "B": 3, "C": 3}


def test_summary_and_greedy_check():
    runs = [bench.Run([[1, 2, 3], [4]], 2.0, 2, 0.1, 0.5, 0.02), bench.Run([[1, 2, 3], [4]], 1.0, 2, 0.1, 0.3, 0.02)]
    s = bench.summarise(runs)
    assert s.tokens_per_s == pytest.approx(3.0)  # median of 2 and 4 tokens/s
    assert s.tokens_per_step == pytest.approx(2.0)
    assert s.verify_ms == "200"  # 0.8 s over 4 steps
    assert bench.greedy_check(runs, runs) == bench.CHECK
    other = [bench.Run([[1, 2, 3], [5]], 1.0, 2)]
    assert bench.greedy_check(other, runs) == f"{bench.CROSS} 1/2 differ"


def test_planned_tree_falls_back_to_best_trees_then_follows_a_plan(tmp_path):
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_trees

    from offload_runtime.model.config import ModelArgs

    pair = bench.build_random_pair(tmp_path, ModelArgs(**bench.SMALL_ARGS), "p", "test pair")
    choice = bench.planned_tree(pair, 16, 6)
    assert choice.plan is None and "no plan" in choice.source and "default acceptance" in choice.source
    assert choice.parents == best_trees(DEFAULT_ACCEPTANCE, 16, 6).tree(16, 6)

    bench.make_quick_plan(pair, threads=1)
    choice = bench.planned_tree(pair, 16, 6)
    assert choice.plan is not None and choice.source.startswith("the plan ")
    assert choice.parents == list(choice.plan.tree)
    # the comparison trees have the planned tree's size (k x l: the closest size k * l + 1)
    trees = bench.comparison_trees(choice)
    assert len(trees[f"chain {len(choice.parents)}"]) == len(choice.parents)
