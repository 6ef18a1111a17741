"""tools/bench_disk.py in its --small mode: every method runs in its own process on a tiny random Llama whose
layers all come from disk, and the figures it returns hold together."""
from __future__ import annotations

import math

import torch

from helpers import load_tool

bench = load_tool("bench_disk")


def test_small_run_returns_consistent_figures(tmp_path):
    result = bench.run(["--small", "--workdir", str(tmp_path)])
    assert list(result.runs) == ["plain", "sequoia-4", "accelerate"]
    plain, spec, acc = (result.runs[m] for m in ("plain", "sequoia-4", "accelerate"))
    # The same greedy tokens from our plain decoding, our Sequoia decoding and transformers with Accelerate.
    assert len(plain["tokens"]) == 2 and spec["tokens"] == plain["tokens"] == acc["tokens"]
    args = bench.model_args(0, small=True)
    per_file = bench.disk.padded_bytes(bench.layer_bytes(args, torch.float32))
    assert plain["placement"] == {"host": 0, "disk": 8} and result.disk_bytes_per_sweep == 8 * per_file
    assert plain["sweeps"] and all(s["disk_bytes"] == 8 * per_file for s in plain["sweeps"])
    assert acc["placement"].get("disk", 0) > 0  # Accelerate too keeps most of the model on disk
    assert len(result.bandwidth) == 2 and all(b.bytes_per_s > 0 for b in result.bandwidth)
    assert set(result.efficiency) == {"plain", "sequoia-4"}
    assert math.isfinite(result.efficiency["plain"]) and result.efficiency["plain"] > 0
    # Efficiency is taken over the sweeps after the first; a tree may have decoded both tokens in fewer.
    assert len(spec["sweeps"]) < 2 or math.isfinite(result.efficiency["sequoia-4"])
    assert [t.title.split(":")[0] for t in result.tables] == ["Disk tier", "Disk tier"]
    assert not any(tmp_path.iterdir())  # the GB-sized files of a real run are deleted afterwards
