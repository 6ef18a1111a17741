"""tools/device_check.py runs its GPU code paths on the CPU (--small), so the one run on a lent GPU works first time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_tool
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device_check.py"


@pytest.fixture(scope="module")
def dc():
    """The script as a module (it is a tool, not part of the package)."""
    return load_tool("device_check")


def run_script(tmp_path: Path, *args: str, out_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out_dir is not None:
        env["OUT"] = str(out_dir)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, str(SCRIPT), "--small", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=150)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device-check")
    # A generous budget: on the CPU every section must run (a skip here would hide a broken code path).
    proc = run_script(tmp, "--output", str(tmp / "report.json"), "--budget-s", "300")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads((tmp / "report.json").read_text())


# --- the small run: every section, the same JSON keys as on the GPU


def test_small_run_runs_every_section(dc, small_run):
    _, report = small_run
    assert report["kind"] == "device_check" and report["mode"] == "small" and report["device"] == "cpu"
    assert report["card"].startswith("cpu") and report["created"] and report["elapsed_s"] > 0
    assert list(report["sections"]) == list(dc.SECTIONS) and set(report["summary"]) == set(dc.SECTIONS)
    for name, entry in report["sections"].items():
        assert entry["status"] == "ok", (name, entry["error"] or entry["reason"], entry["traceback"])
        assert entry["result"] and entry["seconds"] >= 0


def test_gpu_tests_run_through_pytest_and_skip_without_cuda(small_run):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the GPU tests really ran")
    r = small_run[1]["sections"]["gpu_tests"]["result"]
    assert r["command"].split()[:5] == ["-m", "pytest", "-m", "gpu", "tests"] and r["returncode"] == 0
    assert r["tests"] >= 40 and r["skipped"] == r["tests"] and r["all_skipped"]
    assert "CUDA is not available" in r["skip_reason"] and r["failing"] == []


def test_measurements_are_consistent(dc, small_run):
    sec = {k: v["result"] for k, v in small_run[1]["sections"].items()}
    s = dc.small_settings(torch.float16, 0, None)

    bw = sec["h2d_bandwidth"]
    assert bw["pinned_best_Bps"] >= bw["pinned_median_Bps"] > 0 and len(bw["pinned_Bps"]) == s.copy_repeats

    sw = sec["sweep_efficiency"]
    assert [(r["resident"], r["slots"], r["tokens"]) for r in sw["rows"]] == [
        (R, K, n) for R, K in s.sweep_configs for n in s.sweep_tokens]
    for r in sw["rows"]:
        # every streamed layer moved every sweep (more streamed layers than slots in each config)
        assert r["streamed_bytes"] == r["streamed_layers"] * sw["layer_plan"]["layer_bytes"]
        assert r["efficiency"] == pytest.approx(r["streamed_bytes"] / sw["bandwidth_Bps"] / r["sweep_s"])
        assert r["engine_stats"]["sweeps"] == s.sweep_repeats
    assert sw["bitwise_equal_across_configs"] is True and sw["logits_finite"] is True
    assert sw["n_layers"] == s.target.n_layers and not sw["layer_plan"]["reduced"]

    q = {row["format"]: row for row in sec["int4_layers"]["rows"]}
    fp, int4 = q["float16"], q["int4 g32"]
    assert 0.25 < int4["bytes_per_sweep"] / fp["bytes_per_sweep"] < 0.4  # 4-bit packs, scales, zeros; 16-bit norms
    assert {"1 tokens", "4 tokens", "16 tokens"} <= set(q) and all(q[f"{n} tokens"]["dequant_matmul_us"] > 0
                                                                  for n in (1, 4, 16))

    vs = sec["verify_scaling"]
    assert vs["grid"] == list(s.verify_grid) and vs["ratios"][0] == 1.0

    dl = sec["draft_levels"]["drafts"]
    assert set(dl) == set(s.drafts) and all(len(d["seconds"]) == len(d["grid"]) for d in dl.values())

    acc = sec["accelerate_baseline"]
    assert acc["s_per_token"] > 0 and acc["ours_s_per_token"] > 0 and len(acc["token_s"]) == s.hf_tokens
    # accelerate ran the very model we streamed: same weights, same logits (to 16-bit rounding)
    assert acc["logits_vs_ours"]["argmax_equal"]
    assert acc["logits_vs_ours"]["max_abs_diff"] <= 1e-2 * acc["logits_vs_ours"]["scale"]

    pl = sec["planner_predictions"]
    assert pl["acceptance"]["p"] == pytest.approx(list(dc.DEFAULT_ACCEPTANCE)) and pl["acceptance"]["source"] == "default"
    assert len(pl["cards"]) == 2
    for card in pl["cards"]:
        assert "error" not in card, card
        # plain decoding is one of the optimiser's candidates, so its pick is never slower
        assert 0 < card["s_per_token"] <= card["plain_s_per_token"]
        assert card["tokens_per_step"] >= 1
    assert pl["cards"][0]["resident_layers"] == 3 and pl["cards"][1]["resident_layers"] == 1  # the small budgets

    bt = sec["batch_throughput"]
    assert [r["batch"] for r in bt["rows"]] == list(s.batch_sizes)
    assert all(r["new_tokens"] == r["batch"] * s.batch_new_tokens for r in bt["rows"])
    assert bt["sweeps_per_token_falls"]


def test_table_is_printed_last(dc, small_run):
    proc, report = small_run
    table = dc.summary_table(report)
    assert table.title.startswith("device_check small | ") and report["created"] in table.title
    assert table.column("section") == list(dc.SECTIONS) and set(table.column("status")) == {"ok"}
    assert table.column("result") == [report["summary"][name] for name in dc.SECTIONS]
    # the device tool returns only the end of the output: the table's lines come last, as written
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[-(len(dc.SECTIONS) + 3):] == dc.report.to_text(table).splitlines()


def test_out_of_budget_sections_are_skipped_and_out_dir_gets_the_report(dc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(tmp_path, "--budget-s", "0", out_dir=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert not (tmp_path / "device_check.json").exists()  # with $OUT and no --output, only $OUT gets it
    sections = report["sections"]
    assert list(sections) == list(dc.SECTIONS) and sections["environment"]["status"] == "ok"
    for name in dc.SECTIONS[1:]:
        assert sections[name]["status"] == "skipped" and "out of time budget" in sections[name]["reason"], name
        assert report["summary"][name].startswith("skipped: out of time budget")
    assert proc.stdout.rstrip().splitlines()[-1].split()[:2] == ["batch_throughput", "skipped"]


def test_sections_flag_and_bad_arguments(dc, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "r.json"
    assert dc.main(["--small", "--sections", "environment,planner_predictions", "--output", str(out),
                    "--budget-s", "1e6"]) == 0
    sections = json.loads(out.read_text())["sections"]
    assert sections["environment"]["status"] == "ok" and sections["planner_predictions"]["status"] == "ok"
    assert sections["h2d_bandwidth"]["reason"] == "not selected (--sections)"
    # the planner measured its draft's curve itself, since draft_levels did not run
    assert sections["planner_predictions"]["result"]["curves"]["draft_source"] == "measured here"
    with pytest.raises(SystemExit):
        dc.parse_args(["--sections", "environment,warp_drive"])
    with pytest.raises(SystemExit):
        dc.parse_args(["--acceptance", "0.9,0.5"])  # sums past 1


# --- the GPU run's configuration (what the issue asks of it)


def test_full_settings_match_the_issue(dc):
    s = dc.full_settings(torch.float16, 0, None)
    assert s.target == dc.ModelArgs.from_name("llama-2-13b") and s.dtype == torch.float16
    assert s.verify_grid == tuple(2 ** k for k in range(12))  # 1 ... 2048
    assert 1 in s.sweep_tokens and 128 in s.sweep_tokens and {K for _, K in s.sweep_configs} == {2, 3}
    assert min(R for R, _ in s.sweep_configs) == 0 and 2 * 2**30 <= s.copy_bytes <= 4 * 2**30
    assert s.plan_target == dc.ModelArgs.from_name("llama-2-70b") and s.plan_draft_name in s.drafts
    assert max(s.draft_grids["llama-68m"]) == 256 and s.batch_sizes == (1, 2, 4, 8, 16)
    assert s.default_budget_s == 450 and sum(s.need_s.values()) < 0.6 * s.default_budget_s
    json.dumps(dc.jsonable(s.describe()))


def test_llama2_70b_with_7b_draft_fits_the_projected_24gb_card(dc):
    """The planner section's projection must not stop at the residency rule: 70B + a 7B draft on 24 GB."""
    s = dc.full_settings(torch.float16, 0, None)
    grid = s.plan_grid
    curve = lambda f: dc.opt.Curve(tuple(grid), tuple(f(n) for n in grid))  # noqa: E731
    curves = {"layer": curve(lambda n: 4e-3 + 2e-6 * n), "head": curve(lambda n: 1e-4 + 1e-7 * n),
              "host": curve(lambda n: 5e-4 + 2e-6 * n), "draft_level": curve(lambda n: 1.2e-2 + 2e-5 * n)}
    r = dc.predict(s, curves, dc.DEFAULT_ACCEPTANCE, 25e9, int(dc.BUDGET_FRACTION * 24 * 2**30), True)
    assert r["resident_layers"] == 0 and r["max_seq_len"] == 4096
    # 80 layers of 1.71 GB at 25 GB/s: the sweep dominates, and the tree buys several tokens per sweep
    assert r["stream_s"] == pytest.approx(80 * dc.layer_bytes(s.plan_target, torch.float16) / 25e9)
    assert r["plain_s_per_token"] > r["stream_s"] and r["speedup_vs_plain"] > 3


# --- pure helpers


def test_host_ram_plan(dc):
    headroom, globals_, layer, pinned = 1000, 50, 600, 1024
    room_for = lambda k: headroom + 2 * globals_ + k * (layer + pinned)  # noqa: E731
    assert dc.host_layers_that_fit(40, layer, pinned, globals_, room_for(10), headroom) == 10
    assert dc.host_layers_that_fit(40, layer, pinned, globals_, room_for(11) - 1, headroom) == 10
    assert dc.host_layers_that_fit(8, layer, pinned, globals_, room_for(11), headroom) == 8
    assert dc.host_layers_that_fit(8, layer, pinned, globals_, 10, headroom) == 0


def test_sweep_efficiency_and_json(dc, tmp_path):
    assert dc.sweep_efficiency(50e9, 50e9, 1.25) == pytest.approx(0.8)
    assert dc.jsonable({"a": (1, float("nan")), "b": np.float32(0.5), 3: np.int64(7)}) == {
        "a": [1, None], "b": 0.5, "3": 7}
    assert dc.jsonable(float("inf")) is None and dc.jsonable(float("-inf")) is None
    assert dc.jsonable({"t": torch.float16, "p": Path("/x")}) == {"t": "torch.float16", "p": "/x"}
    # the report as written is strict JSON (json.loads rejects the NaN / Infinity that json.dumps would write)
    path = tmp_path / "r.json"
    dc.write_json(path, dc.jsonable({"x": [float("nan"), 1.5, float("inf")]}))
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-finite {c} in the JSON")) == {
        "x": [None, 1.5, None]}


def test_parse_junit(dc, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c"><error message="fixture broke"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_d"><skipped message="no CUDA"/></testcase>'
        '</testsuite></testsuites>')
    r = dc.parse_junit(xml)
    assert (r["tests"], r["passed"], r["failures"], r["errors"], r["skipped"]) == (4, 1, 1, 1, 1)
    assert [f["test"] for f in r["failing"]] == ["tests.test_gpu::test_b", "tests.test_gpu::test_c"]
    assert r["failing"][0]["message"] == "assert 1 == 2" and r["skip_reason"] == "no CUDA"


def test_acceptance_argument(dc, tmp_path):
    assert dc.acceptance_from(None)["p"] == list(dc.DEFAULT_ACCEPTANCE)
    given = dc.acceptance_from("0.6,0.2,0.1")
    assert given["p"] == [0.6, 0.2, 0.1] and given["source"] == "given"
    with pytest.raises(dc.UsageError):
        dc.acceptance_from("0.6,x")
