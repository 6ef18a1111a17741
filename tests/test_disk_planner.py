"""The planner's disk term: the time model of a sweep that reads some layers from the disk store, the search it
drives (exact, larger trees for longer sweeps, the staging depth), the disk profile, and a plan the engine
follows into a disk tier."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from offload_runtime.api.plans import read_plan
from offload_runtime.model.config import ModelArgs
from offload_runtime.residency import fixed_device_bytes
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE
from offload_runtime.weights.disk import padded_bytes
from offload_runtime.weights.layout import layer_bytes
from planner import __main__ as cli
from planner import optimizer as opt
from planner import profile as profile_mod
from test_planner import assert_search_is_exhaustive_top5, random_acceptance

CURVE = opt.Curve((1, 8, 64, 512), (1e-3, 1e-3, 4e-3, 32e-3))  # flat, then linear in the tokens


def disk_model(disk_layers: int, *, prefetch: int = 2, overlap: bool = True) -> opt.TimeModel:
    """8 layers, all streamed: 0.1 s of copies per sweep; each disk layer adds 0.05 s of reads."""
    zero = opt.Curve.constant(0.0)
    return opt.TimeModel(layer=CURVE, head=zero, host=opt.Curve.constant(2e-3), draft_level=opt.Curve.constant(5e-3),
                         n_layers=8, resident=0, layer_bytes=10**6, bandwidth=8 * 10**7, overlap=overlap,
                         disk_layers=disk_layers, disk_bandwidth=2 * 10**7, disk_file_bytes=10**6,
                         prefetch=prefetch if disk_layers else 0)


def test_the_disk_term_of_a_sweep():
    tm = disk_model(6)
    assert tm.stream_s == pytest.approx(0.1) and tm.disk_s == pytest.approx(0.3)
    # With no time between sweeps nothing was read ahead; with plenty, the 2 staging buffers' worth (0.1 s).
    assert tm.t_verify(1, gap_s=0.0) == pytest.approx(0.3)
    assert tm.t_verify(1, gap_s=0.03) == pytest.approx(0.27)
    assert tm.t_verify(1) == pytest.approx(0.2)  # the search's lower bound
    assert tm.t_verify(1024, gap_s=0.0) == pytest.approx(8 * 64e-3)  # compute caught up with the disk
    cpu = disk_model(6, overlap=False)  # copies add to compute on the CPU; the readers run beside both
    assert cpu.t_verify(8, gap_s=0.0) == pytest.approx(max(0.3, 0.1 + 8e-3))
    parts = tm.step_parts([-1, 0, 0, 1])
    gap = parts["draft_s"] + parts["host_s"]
    assert parts["verify_s"] == pytest.approx(0.3 - min(gap, 0.1))
    assert disk_model(0).t_verify(1) == pytest.approx(0.1)


def test_a_longer_sweep_buys_a_larger_tree():
    sizes = [opt.optimize(DEFAULT_ACCEPTANCE, disk_model(d), max_tree=256, max_depth=10).best.n for d in (0, 3, 8)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_branch_and_bound_stays_exact_with_a_disk_tier():
    rng = np.random.default_rng(1)
    for trial in range(4):
        p = random_acceptance(rng)
        grid = (1, 2, 4, 8, 16, 32, 64)
        tm = opt.TimeModel(layer=opt.Curve(grid, tuple(np.cumsum(rng.uniform(0, 3e-3, len(grid))))),
                           head=opt.Curve.constant(1e-3), host=opt.Curve.constant(2e-4),
                           draft_level=opt.Curve(grid, tuple(np.cumsum(rng.uniform(0, 4e-3, len(grid))))),
                           n_layers=6, resident=1, layer_bytes=10**6, bandwidth=10**9, overlap=bool(trial % 2),
                           disk_layers=3 + trial % 2, disk_bandwidth=10**8 * rng.uniform(0.5, 2),
                           disk_file_bytes=10**6, prefetch=1 + trial % 3)
        assert_search_is_exhaustive_top5(p, tm)


def test_disk_profile_and_reader_threads(tmp_path):
    prof = profile_mod.disk_read_bandwidth(tmp_path / "d", profile_mod.Effort.quick(), threads=(1, 2))
    assert prof["threads"] == [1, 2] and all(b > 0 for b in prof["Bps"]) and prof["bytes"] % 4096 == 0
    assert not list((tmp_path / "d").iterdir())  # the scratch file is gone
    assert profile_mod.read_threads_for({"threads": [1, 2, 4, 8], "Bps": [1.0, 1.8, 1.96, 2.0]}) == (4, 1.96)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    yield tmp_path / "home"
    torch.set_num_threads(threads)


QUICK = ["--device", "cpu", "--threads", "1", "--quick", "--acceptance", "0.9,0.05", "--max-seq-len", "64",
         "--max-tree", "32", "--max-depth", "5", "--no-calibrate"]


def test_plan_with_a_host_budget_and_the_engine_following_it(home, tiny_pair, tmp_path, monkeypatch):
    """--host-memory: the plan splits the streamed layers between host and disk, takes the staging depth and the
    reader threads from the search and the disk profile (here a slow disk: 1 MB/s), predicts a longer sweep and
    buys a larger tree with it than with every layer in RAM; an engine loaded without disk options follows it into
    the same disk tier."""
    slow = {"dir": "x", "bytes": 4096, "direct": True, "threads": [1, 2, 4, 8], "Bps": [5e5, 9e5, 1e6, 1e6]}
    monkeypatch.setattr(profile_mod, "disk_read_bandwidth", lambda directory, effort: slow)
    target = shutil.copytree(tiny_pair[0], tmp_path / "target")
    draft = shutil.copytree(tiny_pair[1], tmp_path / "draft")
    targs = ModelArgs.from_file(target)
    per_file = padded_bytes(layer_bytes(targs, torch.float32))
    fixed = fixed_device_bytes(targs, torch.float32, draft_args=ModelArgs.from_file(draft), batch=1, max_seq_len=64,
                               tree_size=32, max_chunk=2048, slots=2, on_cuda=False)
    gpu = sum(fixed.values()) + layer_bytes(targs, torch.float32) // 2  # no room for a resident layer
    common = ["plan", "--model", str(target), "--draft", str(draft), *QUICK, "--offload", "--gpu-memory", str(gpu)]
    assert cli.main([*common, "--output", str(tmp_path / "ram.json")]) == 0
    budget = 3 * layer_bytes(targs, torch.float32) - 1  # one byte short of every streamed layer
    assert cli.main([*common, "--host-memory", str(budget), "--offload-dir", str(tmp_path / "store"),
                     "--output", str(tmp_path / "disk.json")]) == 0
    ram, plan = read_plan(tmp_path / "ram.json"), read_plan(tmp_path / "disk.json")
    st = plan.storage
    assert ram.storage == {} and st["host_memory"] == budget and st["read_threads"] == 4
    assert st["disk_Bps"] == 1e6 and json.loads(open(st["disk_profile"]).read())["kind"] == "disk-profile"
    # One staging buffer keeps 1 layer in RAM and reads 2; two read all 3 (the time between sweeps is far too short
    # to hide a layer's read): the search takes one.
    assert st["prefetch"] == 1 and len(st["disk_layers"]) == 2 and len(st["host_layers"]) == 1
    assert plan.figures["disk_s"] == pytest.approx(2 * per_file / 1e6)
    assert plan.predicted["verify_s"] > 10 * ram.predicted["verify_s"] and plan.n > ram.n
    from offload_runtime import Engine

    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", plan=str(tmp_path / "disk.json"),
                                    offload_dir=tmp_path / "store", max_seq_len=64, quiet=True)
    assert list(engine.residency.disk) == st["disk_layers"] and engine.residency.prefetch == 1
    assert engine.target.layers.disk.depth == 1
    greedy = engine.sampling_params(0.0)
    assert engine.tree_for(greedy, "static") == plan.tree  # and the plan's policy for its regime
    chosen = engine.tree_for(greedy)
    assert chosen == plan.tree if plan.policy == "static" else chosen.size == plan.dynamic["size"]
