"""tools/bench_disk.py in its --small mode: every method runs in its own process on a tiny random Llama whose
layers all come from disk, and the figures it returns hold together."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import load_tool

bench = load_tool("bench_disk")


def test_small_run_returns_consistent_figures(tmp_path):
    result = bench.run(["--small", "--workdir", str(tmp_path)])
    assert list(result.runs) == ["plain", "sequoia-4", "dynamic-4", "accelerate"]
    plain, spec, grown, acc = (result.runs[m] for m in ("plain", "sequoia-4", "dynamic-4", "accelerate"))
    # The same greedy tokens from our plain, Sequoia and grown-tree decoding and transformers with Accelerate.
    assert len(plain["tokens"]) == 2 and spec["tokens"] == grown["tokens"] == plain["tokens"] == acc["tokens"]
    args = bench.model_args(0, small=True)
    per_file = bench.disk.padded_bytes(bench.layer_bytes(args, torch.float32))
    assert plain["placement"] == {"host": 0, "disk": 8} and result.disk_bytes_per_sweep == 8 * per_file
    assert plain["sweeps"] and all(s["disk_bytes"] == 8 * per_file for s in plain["sweeps"])
    assert acc["placement"].get("disk", 0) > 0  # Accelerate too keeps most of the model on disk
    assert all(len(r["bandwidth"]) == 2 and min(b["bytes_per_s"] for b in r["bandwidth"]) > 0 for r in (plain, spec))
    assert set(result.efficiency) == set(result.bandwidth) == {"plain", "sequoia-4", "dynamic-4"}
    assert result.bandwidth["plain"] == max(b["bytes_per_s"] for b in plain["bandwidth"])
    assert math.isfinite(result.efficiency["plain"]) and result.efficiency["plain"] > 0
    # Efficiency is taken over the sweeps after the first; a tree may have decoded both tokens in fewer.
    assert len(spec["sweeps"]) < 2 or math.isfinite(result.efficiency["sequoia-4"])
    sweeps, speed = result.tables
    assert sweeps.row(method="plain")["efficiency"] == result.efficiency["plain"]
    assert sweeps.row(method="plain")["disk_gb"] == 8 * per_file / 1e9
    assert speed.row(method="accelerate")["vs_accelerate"] == pytest.approx(1.0)
    for m in ("sequoia-4", "dynamic-4", "accelerate"):
        assert speed.row(method=m)["same"] == bench.report.CHECK, m
    assert not any(tmp_path.iterdir())  # the GB-sized files of a real run are deleted afterwards
