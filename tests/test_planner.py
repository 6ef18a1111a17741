"""Planner: the optimiser on synthetic time curves with known optima, residency and batch choice, and the
profile -> acceptance -> plan path end to end on the CPU with tiny checkpoints (plan files, staleness,
find_plan's messages, the command line's one-line errors)."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offload_runtime.model.config import ModelArgs
from offload_runtime.errors import ResourceError, UsageError
from offload_runtime.residency import Residency, fixed_device_bytes
from planner import __main__ as cli
from planner import acceptance as acc
from offload_runtime.api.machine import machine_fingerprint
from offload_runtime.model.tree import Tree
from offload_runtime.api.plans import Plan, find_plan, load_plan, model_fingerprint, read_plan, save_plan
from offload_runtime.weights.layout import layer_bytes
from planner import optimizer as opt
from planner import profile as profile_mod
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_trees

REPO = Path(__file__).resolve().parents[1]


# --- synthetic time models ----------------------------------------------------------------------

def model(layer: opt.Curve, *, draft_s: float = 0.0, stream_s: float = 0.0, n_layers: int = 1,
          overhead_s: float = 0.0, overlap: bool = True) -> opt.TimeModel:
    """Only T_layer (and optionally a constant draft level time and a stream time) costs anything."""
    zero = opt.Curve.constant(0.0)
    return opt.TimeModel(layer=layer, head=zero, host=zero, draft_level=opt.Curve.constant(draft_s),
                         n_layers=n_layers, resident=0 if stream_s else n_layers, layer_bytes=1000,
                         bandwidth=n_layers * 1000 / stream_s if stream_s else 1.0, overlap=overlap,
                         overhead_s=overhead_s)


P3 = (0.6, 0.2, 0.1)  # non-increasing, so G(n) is concave in n (best-first adds ever smaller products)


def test_curve_interpolates_and_extrapolates():
    c = opt.Curve((1, 4, 8), (1.0, 1.0, 3.0))
    assert c(0.5) == 1.0 and c(2) == 1.0 and c(6) == pytest.approx(2.0) and c(16) == pytest.approx(7.0)
    assert np.allclose(c(np.array([1, 4, 6])), [1.0, 1.0, 2.0])
    assert opt.suffix_min([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 1.0, 2.0, 4.0, 4.0)


def test_internal_per_level_counts_the_nodes_each_draft_forward_runs():
    assert list(Tree([-1]).internal_per_level) == []
    assert list(Tree([-1, 0, 0, 1, 1, 2, 3]).internal_per_level) == [1, 2, 1]


def test_flat_then_linear_picks_the_knee():
    """T(n) = s for n <= n0, c n beyond (s = c n0), draft free. Up to n0 a larger tree is free, so the best is n0;
    past n0, G(n)/T(n) = G(n)/(c n) falls because G is concave with G(0) = 0. So n* = n0 at the deepest useful depth."""
    N, D, n0, c = 128, 8, 24, 1e-3
    table = best_trees(P3, N, D)
    G = table.curve(D)
    assert G[n0] > G[n0 - 1] + 1e-9, "n0 must be a size where the optimal tree really grows"
    tm = model(opt.Curve((1, n0, 4096), (c * n0, c * n0, c * 4096)))
    best = opt.optimize(P3, tm, max_tree=N, max_depth=D).best
    assert best.n == n0
    assert best.tokens_per_step == pytest.approx(G[n0])
    assert best.s_per_token == pytest.approx(c * n0 / G[n0])


def test_flat_compute_below_stream_time_same_knee():
    """The same knee reached through streaming: T_verify = max(stream, L T_layer(n)), L T_layer linear."""
    N, D, L, c = 96, 8, 4, 1e-4
    n0 = 40
    tm = model(opt.Curve((1, 4096), (c, c * 4096)), stream_s=L * c * n0, n_layers=L)
    assert tm.t_verify(n0) == pytest.approx(L * c * n0) and tm.t_verify(n0 // 2) == pytest.approx(L * c * n0)
    best = opt.optimize(P3, tm, max_tree=N, max_depth=D).best
    G = best_trees(P3, N, D).curve(D)
    assert G[n0] > G[n0 - 1] + 1e-9
    assert best.n == n0


def test_linear_from_the_start_means_no_tree():
    """T(n) = c n: G(n)/n is largest at n = 1 (G(1) = 1 and every added node is worth less than one token)."""
    tm = model(opt.Curve((1, 4096), (1e-3, 4.096)))
    best = opt.optimize(DEFAULT_ACCEPTANCE, tm, max_tree=64, max_depth=8).best
    assert (best.n, best.depth, best.tokens_per_step) == (1, 0, 1.0)


def test_linear_with_fixed_cost_matches_the_closed_form_chain():
    """p = (a,) allows only chains: G(n) = (1 - a^n) / (1 - a). With T(n) = o + c n the optimum is the argmax of
    that closed form over n, found here by direct enumeration (no DP involved)."""
    a, o, c, N = 0.8, 10e-3, 1e-3, 64
    tm = model(opt.Curve((1, 4096), (c, c * 4096)), overhead_s=o)
    closed = [(1 - a ** n) / (1 - a) / (o + c * n) for n in range(1, N + 1)]
    n_star = int(np.argmax(closed)) + 1
    assert 2 < n_star < N
    best = opt.optimize([a], tm, max_tree=N, max_depth=N).best
    assert (best.n, best.depth) == (n_star, n_star - 1)
    assert best.tokens_per_s == pytest.approx(max(closed))


@pytest.mark.parametrize("expect_max", [True, False])
def test_step_curve_picks_either_side_of_the_step(expect_max):
    """T = t1 up to m tokens, t2 = k t1 beyond, flat on both sides. On each flat part the largest tree wins, so the
    optimum is n = m or n = N, whichever has the larger G/T: a small step is worth crossing, a big one is not."""
    N, D, m, t1 = 96, 10, 32, 1e-2
    G = best_trees(P3, N, D).curve(D)
    r = G[N] / G[m]  # crossing the step pays iff k < r
    assert r > 1.01
    step_factor = (1 + r) / 2 if expect_max else r * 1.05
    tm = model(opt.Curve((1, m, m + 1, 4096), (t1, t1, step_factor * t1, step_factor * t1)))
    best = opt.optimize(P3, tm, max_tree=N, max_depth=D).best
    n_max = int(np.flatnonzero(G >= G[N] - 1e-12)[0])  # the smallest tree reaching G[N]
    assert best.n == (n_max if expect_max else m)


def test_draft_cost_per_level_trades_depth():
    """Chains again (p = (a,)), verification flat at T_v, each draft level t_d: tokens/s = G(d + 1) / (T_v + d t_d)."""
    a, Tv, td, N = 0.9, 50e-3, 4e-3, 64
    tm = model(opt.Curve.constant(Tv), draft_s=td)
    closed = [((1 - a ** (d + 1)) / (1 - a)) / (Tv + d * td) for d in range(0, N)]
    d_star = int(np.argmax(closed))
    assert 1 < d_star < N - 1
    best = opt.optimize([a], tm, max_tree=N, max_depth=N - 1).best
    assert (best.n, best.depth) == (d_star + 1, d_star)
    assert best.draft_s == pytest.approx(d_star * td)


def random_acceptance(rng: np.random.Generator) -> np.ndarray:
    """A random acceptance vector of 4 ranks, decreasing, summing to at most 1."""
    p = np.sort(rng.uniform(0, 1, 4))[::-1] * rng.uniform(0.3, 1.0)
    return p / max(1.0, p.sum())


def assert_search_is_exhaustive_top5(p, tm, N: int = 30, D: int = 6) -> None:
    """The branch-and-bound search's top 5 equal those of every distinct (n, d) tree evaluated exactly, and it
    evaluated fewer trees than that."""
    table = best_trees(p, N, D)
    every = {(-1,): opt.evaluate([-1], 1.0, tm)}  # distinct trees: many (n, d) give the same one
    for d in range(1, D + 1):
        for n in range(2, N + 1):
            tree = table.tree(n, d)
            every[tuple(tree)] = opt.evaluate(tree, table.value(n, d), tm)
    want = sorted(c.tokens_per_s for c in every.values())[::-1][:5]
    got = opt.optimize(p, tm, max_tree=N, max_depth=D, top=5)
    assert [c.tokens_per_s for c in got.ranked] == pytest.approx(want, rel=1e-12)
    assert got.evaluated < len(every)


def test_branch_and_bound_equals_exhaustive_search():
    """Every (n, d) tree evaluated exactly must give the same best throughput and the same top list."""
    rng = np.random.default_rng(0)
    for trial in range(6):
        p = random_acceptance(rng)
        grid = (1, 2, 4, 8, 16, 32, 64)
        level = tuple(np.cumsum(rng.uniform(0, 2e-3, len(grid))))
        layer = tuple(np.cumsum(rng.uniform(0, 3e-3, len(grid))))
        tm = opt.TimeModel(layer=opt.Curve(grid, layer), head=opt.Curve.constant(1e-3),
                           host=opt.Curve.constant(2e-4), draft_level=opt.Curve(grid, level), n_layers=4,
                           resident=trial % 3, layer_bytes=10**6, bandwidth=10**9 * rng.uniform(0.1, 2),
                           overlap=bool(trial % 2))
        assert_search_is_exhaustive_top5(p, tm)


# --- resident layers and batch size -------------------------------------------------------------

TINY = ModelArgs.from_name("tiny")


def _budgets(batch: int = 1, max_seq_len: int = 64, max_tree: int = 32) -> tuple[int, int]:
    fixed = sum(fixed_device_bytes(TINY, torch.float32, draft_args=TINY, batch=batch, max_seq_len=max_seq_len,
                                   tree_size=max_tree, max_chunk=2048, slots=2, on_cuda=False).values())
    return fixed, layer_bytes(TINY, torch.float32)


def test_more_budget_more_resident_layers_and_faster():
    fixed, lb = _budgets()
    counts, times = [], []
    tm = model(opt.Curve((1, 4096), (1e-4, 0.4)), stream_s=0.5, n_layers=TINY.n_layers)
    for extra in (0.5, 1.5, 2.5):
        res = opt.residency(TINY, torch.float32, torch.device("cpu"), draft=TINY, budget_bytes=int(fixed + extra * lb),
                            batch=1, max_seq_len=64, max_tree=32, offload=True)
        counts.append(len(res.resident))
        times.append(opt.optimize(DEFAULT_ACCEPTANCE, tm.with_resident(len(res.resident)), max_tree=32,
                                  max_depth=6).best.s_per_token)
    assert counts == [0, 1, 2]
    assert times[0] > times[1] > times[2]
    with pytest.raises(ResourceError):
        opt.residency(TINY, torch.float32, torch.device("cpu"), draft=TINY, budget_bytes=fixed // 2, batch=1,
                      max_seq_len=64, max_tree=32, offload=True)


def test_batch_choice():
    """Streaming-bound verification (flat) and a free draft: throughput B G / T grows with B, so the largest B that
    fits wins; B past the memory limit is skipped."""
    tm = model(opt.Curve((1, 4096), (1e-6, 4.096e-3)), stream_s=1.0, n_layers=2)

    def fits_up_to(limit):
        def residency_of(B):
            if B > limit:
                raise ResourceError("no room")
            return Residency(True, (), 2, None)
        return residency_of

    best, choices = opt.optimize_batch(DEFAULT_ACCEPTANCE, tm, [1, 2, 4, 8, 16], fits_up_to(8), max_tree=32,
                                       max_depth=6)
    assert best.batch == 8 and [c.batch for c in choices] == [1, 2, 4, 8]
    b1 = choices[0].optimum.best
    assert best.optimum.best.tokens_per_s == pytest.approx(8 * b1.tokens_per_s, rel=1e-6)
    with pytest.raises(ResourceError):
        opt.optimize_batch(DEFAULT_ACCEPTANCE, tm, [1, 2], fits_up_to(0), max_tree=8, max_depth=3)


# --- acceptance counting ------------------------------------------------------------------------

def test_count_ranks_skips_steps_without_a_tree():
    # 6 tokens wanted: steps emit 2, 1, 2 tokens, so the 4th step starts with one left and drafts no tree
    ranks = [(1,), (), (2,), ()]
    counts, none, steps = acc.count_ranks(ranks, [1, 0, 1, 0], max_new_tokens=6, width=3)
    assert (counts, none, steps) == ([1, 1, 0], 1, 3)
    counts, none, steps = acc.count_ranks(ranks, [1, 0, 1, 0], max_new_tokens=7, width=3)
    assert (counts, none, steps) == ([1, 1, 0], 2, 4)
    p, se = acc.estimate([50, 25], 100)
    assert p == [0.5, 0.25] and se == pytest.approx([0.05, math.sqrt(0.25 * 0.75 / 100)])
    with pytest.raises(UsageError):
        acc.estimate([0], 0)


def test_parse_vector_and_prompts(tmp_path):
    assert acc.parse_vector("0.7, 0.1,0.05") == [0.7, 0.1, 0.05]
    for bad in ("0.7,x", "0.9,0.3", "-0.1"):
        with pytest.raises(UsageError):
            acc.parse_vector(bad)
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello"}\n\n{"prompt": [5, 6]}\n')
    assert acc.read_prompts(f) == ["hello", [5, 6]]
    f.write_text('{"prompt": "hello"}\n{"nope": 1}\n')
    with pytest.raises(UsageError, match=":2:"):
        acc.read_prompts(f)
    assert 24 <= len(acc.BUILTIN_PROMPTS) <= 64


def test_resolve_model_falls_back_to_shape_presets(monkeypatch):
    """Without a local checkpoint an alias, its repo id or its chat variant profiles the published shapes."""
    from planner import models as plan_module

    monkeypatch.setattr(plan_module, "local_ref", lambda name: None)  # as on a machine without the weights
    for name in ("llama-2-70b", "meta-llama/Llama-2-70b-hf", "llama-2-70b-chat"):
        ref, args, note = plan_module.resolve_model(name)
        assert ref.identity == "preset:llama-2-70b" and ref.is_preset and args == ModelArgs.from_name("llama-2-70b")
        assert "not available locally" in note
    assert plan_module.resolve_model("tiny")[2] is None
    from offload_runtime.errors import MissingFileError

    with pytest.raises(MissingFileError, match="nothing is downloaded"):
        plan_module.resolve_model("someone/unknown-model")


# --- end to end on the CPU ----------------------------------------------------------------------

CPU = ["--device", "cpu", "--threads", "1"]
QUICK = [*CPU, "--quick"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The planner's store in a temp dir; torch's thread count restored afterwards."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("planner_home")
    mp.setenv("OFFLOAD_RUNTIME_HOME", str(path))
    threads = torch.get_num_threads()
    yield path
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def pair(tiny_pair, tmp_path_factory):
    """A private copy of the tiny pair: staleness tests change its files."""
    root = tmp_path_factory.mktemp("planner_pair")
    return shutil.copytree(tiny_pair[0], root / "target"), shutil.copytree(tiny_pair[1], root / "draft")


ACC_FLAGS = ["--temperature", "0.8", "--width", "4", "--limit", "6", "--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def planned(home, pair):
    target, draft = pair
    # Static only: these tests check Sequoia's side (tests/test_dynamic_plans.py plans both policies).
    assert cli.main(["plan", "--model", str(target), "--draft", str(draft), *QUICK, *ACC_FLAGS,
                     "--max-tree", "48", "--max-depth", "6", "--policy", "static"]) == 0
    plans = list((home / "plans").glob("*.json"))
    assert len(plans) == 1
    return read_plan(plans[0])


def test_profile_command(home, pair, capsys, tmp_path):
    target, draft = pair
    path = tmp_path / "profile.json"
    assert cli.main(["profile", "--model", str(target), "--draft", str(draft), *QUICK, "--grid", "1,3,8",
                     "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer ms" in out and "draft level ms" in out
    prof = profile_mod.read_profile(path)
    assert prof["grid"] == [1, 3, 8] and prof["device"] == "cpu" and prof["dtype"] == "float32"
    for key in ("layer_s", "head_s", "host_s", "draft_level_s"):
        assert len(prof[key]) == 3 and all(t > 0 for t in prof[key])
    assert prof["bandwidth_Bps"] > 1e6 and prof["layer_bytes"] == layer_bytes(ModelArgs.from_file(target),
                                                                                   torch.float32)
    m = prof["machine"]
    assert m["gpu_name"] is None and m["pcie_max_gen"] is None and m["cpu_model"] and m["ram_total"] > 0
    assert m["id"] == machine_fingerprint("cpu")["id"]


def test_profile_of_a_preset_shape(home, capsys):
    assert cli.main(["profile", "--model", "tiny", "--no-draft", *QUICK, "--grid", "1,2"]) == 0
    assert "saved to" in capsys.readouterr().out


def test_acceptance_command(home, pair, capsys, tmp_path):
    target, draft = pair
    path = tmp_path / "acceptance.json"
    assert cli.main(["acceptance", "--model", str(target), "--draft", str(draft), *CPU, *ACC_FLAGS,
                     "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert "std err" in out
    result = acc.read_acceptance(path)
    assert len(result.p) == len(result.se) == 4 and result.steps > 20
    assert sum(result.counts) + result.none == result.steps
    assert result.p == pytest.approx([c / result.steps for c in result.counts])
    assert 0 < result.p[0] < 1 and sum(result.p) <= 1


def test_acceptance_of_a_draft_equal_to_the_target_is_all_first_child(home, pair):
    """P == Q at every node: the first child is accepted with probability min(1, P/Q) = 1, so p = (1, 0, 0)."""
    from planner.models import resolve_model

    target, _ = pair
    ref = resolve_model(str(target))[0]
    for temperature in (0.0, 1.0):
        # 13 tokens: every step emits 2, so the 7th starts with one left, drafts nothing, and must not count
        result = acc.measure_acceptance(ref, ref, device="cpu", dtype="float64", temperature=temperature, width=3,
                                        prompts=acc.BUILTIN_PROMPTS[:2], max_new_tokens=13)
        assert result.p == [1.0, 0.0, 0.0] and result.se == [0.0, 0.0, 0.0] and result.steps == 2 * 6


def test_acceptance_batched_equals_one_by_one(pair):
    """Each prompt keeps its own seed and cache row, so sharing sweeps changes nothing (float64: no rounding ties)."""
    from planner.models import resolve_model

    target, draft = (resolve_model(str(x))[0] for x in pair)
    kwargs = dict(device="cpu", dtype="float64", temperature=1.0, width=3, prompts=acc.BUILTIN_PROMPTS[:3],
                  max_new_tokens=10, seed=3)
    one = acc.measure_acceptance(target, draft, batch_size=1, **kwargs)
    three = acc.measure_acceptance(target, draft, batch_size=3, **kwargs)
    assert (one.counts, one.none, one.steps) == (three.counts, three.none, three.steps)
    assert 0 < one.none < one.steps  # the pair disagrees sometimes: the comparison is not vacuous


def test_plan_end_to_end(planned, pair, home):
    target, draft = pair
    plan = planned
    assert plan.device == "cpu" and plan.dtype == "float32" and plan.temperature == 0.8
    assert plan.acceptance["source"] == "measured" and len(plan.acceptance["p"]) == 4
    assert plan.resident_layers == [0, 1, 2] and not plan.offload  # the CPU with no budget streams nothing
    assert 1 <= plan.n <= 48 and plan.depth <= 6
    G = best_trees(plan.acceptance["p"], 48, 6).value(plan.n, plan.depth) if plan.n > 1 else 1.0
    assert plan.predicted["tokens_per_step"] == pytest.approx(G)
    best = plan.candidates[0]
    assert best["n"] == plan.n and best["s_per_token"] == pytest.approx(plan.predicted["s_per_token"])
    assert all(a["tokens_per_s"] >= b["tokens_per_s"] for a, b in zip(plan.candidates, plan.candidates[1:]))
    assert plan.figures["grid"] == list(profile_mod.QUICK_GRID)


def test_plan_round_trip(planned, tmp_path):
    copy = tmp_path / "copy.json"
    save_plan(planned, copy)
    again = read_plan(copy)
    assert again == planned and again.to_dict() == planned.to_dict()
    assert Plan.from_dict(json.loads(copy.read_text())) == planned


def test_find_plan_uses_the_matching_plan(planned, pair):
    target, draft = pair
    plan, msg = find_plan(target, draft, "cpu", torch.float32)
    assert plan == planned
    assert msg.startswith(f"using plan {planned.path}: {planned.n} nodes, depth {planned.depth}, 3/3 resident layers")
    assert "predicted" in msg and "\n" not in msg
    plan, msg = find_plan(target, draft, "cpu", torch.float32, temperature=0.8, top_p=1.0)
    assert plan == planned
    # other settings: no plan, and the notice says how to make one
    for kwargs in ({"temperature": 0.5}, {"dtype": torch.float64}):
        args = {"dtype": torch.float32, **kwargs}
        plan, msg = find_plan(target, draft, "cpu", **args)
        assert plan is None
        # (find_plan serves `planner show` and the tools, which use no default tree: the engine's notice,
        # from find_plans, is the one that says so)
        assert msg.startswith("no plan for this machine and model pair; run "
                              f"`python -m planner plan --model {target} --draft {draft}")


def test_show(planned, capsys):
    assert cli.main(["show", str(planned.path)]) == 0
    out = capsys.readouterr().out
    assert "status      current" in out and f"{planned.n} nodes" in out


def test_stale_plan_is_detected(planned, pair, tmp_path):
    target, draft = pair
    # A plan made on another machine: same key, another fingerprint.
    data = planned.to_dict()
    data["machine"] = {**data["machine"], "id": "0" * 16, "cpu_model": "Another CPU"}
    other = tmp_path / "other_machine.json"
    other.write_text(json.dumps(data))
    plan, msg = load_plan(other, target=target, draft=draft, device="cpu", dtype=torch.float32)
    assert "stale" in msg and "Another CPU" in msg and "python -m planner plan" in msg and "warning" in msg
    original = planned.path.read_text()
    try:
        planned.path.write_text(json.dumps(data))  # the store's plan now claims another machine
        plan, msg = find_plan(target, draft, "cpu", torch.float32)
        assert plan is None and "is stale" in msg and "machine changed" in msg
        assert f"python -m planner plan --model {target} --draft {draft}" in msg
    finally:
        planned.path.write_text(original)

    # The draft's weights change (same shapes, same size): its fingerprint changes, the plan goes stale.
    from safetensors.torch import load_file, save_file

    shard = Path(draft) / "model.safetensors"
    before = model_fingerprint(draft)
    backup = shard.read_bytes()
    try:
        weights = load_file(shard)
        save_file({k: v * 1.01 for k, v in weights.items()}, shard, metadata={"format": "pt"})
        assert shard.stat().st_size == len(backup) and model_fingerprint(draft) != before
        plan, msg = find_plan(target, draft, "cpu", torch.float32)
        assert plan is None and "stale" in msg and "draft's model files changed" in msg
        plan, msg = load_plan(planned.path)  # named explicitly: used, with a warning
        assert plan == planned and "stale" in msg
    finally:
        shard.write_bytes(backup)
    assert find_plan(target, draft, "cpu", torch.float32)[0] == planned


def test_load_plan_errors(tmp_path):
    from offload_runtime.api.plans import PlanError

    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(PlanError, match=r"bad.json is not a plan file \(not JSON\); give a plan made by"):
        load_plan(bad)
    bad.write_text(json.dumps({"kind": "plan", "version": 1}))
    with pytest.raises(PlanError, match="not a complete plan"):
        load_plan(bad)


def test_plan_resident_layers_follow_the_budget(home, capsys):
    """--gpu-memory: a budget that holds one more layer gives one more resident layer and a faster prediction."""
    fixed, lb = _budgets(max_seq_len=64, max_tree=32)
    plans = []
    for extra in (0.5, 1.5, 2.5):
        out = home / f"budget{extra}.json"
        assert cli.main(["plan", "--model", "tiny", "--draft", "tiny", *QUICK, "--acceptance", "default", "--offload",
                         "--gpu-memory", str(int(fixed + extra * lb)), "--max-seq-len", "64", "--max-tree", "32",
                         "--max-depth", "5", "--output", str(out)]) == 0
        plans.append(read_plan(out))
    assert [len(p.resident_layers) for p in plans] == [0, 1, 2]
    assert plans[0].predicted["s_per_token"] > plans[1].predicted["s_per_token"] > plans[2].predicted["s_per_token"]
    assert plans[0].acceptance["source"] == "default"
    assert plans[0].acceptance["p"] == list(DEFAULT_ACCEPTANCE)


def test_plan_batch_auto(home):
    out = home / "batch_auto.json"
    assert cli.main(["plan", "--model", "tiny", "--draft", "tiny", *QUICK, "--acceptance", "0.6,0.2",
                     "--batch-size", "auto", "--max-batch", "4", "--max-seq-len", "64", "--max-tree", "16",
                     "--max-depth", "4", "--output", str(out)]) == 0
    plan = read_plan(out)
    assert [r["batch"] for r in plan.search["per_batch"]] == [1, 2, 4]
    assert plan.batch_size == max(plan.search["per_batch"], key=lambda r: r["tokens_per_s"])["batch"]


def test_plot_needs_matplotlib(home, tmp_path):
    args = ["plan", "--model", "tiny", "--draft", "tiny", *QUICK, "--acceptance", "default", "--max-tree", "16",
            "--max-depth", "4", "--max-seq-len", "64", "--plot", str(tmp_path / "t.png")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="pip install"):
            cli.main(args)
    else:
        assert cli.main(args) == 0 and (tmp_path / "t.png").stat().st_size > 1000


def test_usage_errors():
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "tiny", "--batch-size", "0"])
    assert e.value.code == 2
    for bad in ("-1", "soon"):
        with pytest.raises(SystemExit) as e:
            cli.main(["plan", "--model", "tiny", "--calibration-time", bad])
        assert e.value.code == 2
    with pytest.raises(UsageError, match="needs a draft"):
        cli.main(["plan", "--model", "tiny", *QUICK])
    with pytest.raises(UsageError, match="grid"):
        cli.main(["profile", "--model", "tiny", *QUICK, "--grid", "4,2"])


def test_cli_one_line_errors(tmp_path):
    import os

    env = {**os.environ, "OFFLOAD_RUNTIME_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    bad_flag = subprocess.run([sys.executable, "-m", "planner", "plan", "--model", "tiny", "--bogus"], cwd=REPO,
                              capture_output=True, text=True, env=env, timeout=120)
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.strip().count("\n") == 0 and "--bogus" in bad_flag.stderr
    missing = subprocess.run([sys.executable, "-m", "planner", "profile", "--model", str(tmp_path / "nope"),
                              "--device", "cpu"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr and missing.stderr.strip().count("\n") == 0
    assert "not found" in missing.stderr


def test_engine_follows_the_plan(planned, pair, capsys):
    from offload_runtime import Engine

    target, draft = pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32")
    # The tree a request at the plan's sampling settings gets (each request takes its own regime's plan).
    default_tree = lambda e: e.tree_for(e.sampling_params(planned.temperature, planned.top_p))  # noqa: E731
    assert engine.plans == [planned] and default_tree(engine) == planned.tree
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("using plan")
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64")  # no plan for float64
    assert engine.plans == [] and len(default_tree(engine)) > 1
    assert "no plan for this machine and model pair; using the default tree" in capsys.readouterr().err
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", plan=str(planned.path))
    assert default_tree(engine) == planned.tree
    assert "built for dtype float32" in capsys.readouterr().err
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", tree=[-1, 0])
    assert default_tree(engine) == [-1, 0] and capsys.readouterr().err == ""


def test_top_p_warping_is_charged_per_drafted_and_walked_row():
    base = model(opt.Curve.constant(1e-3), draft_s=1e-3)
    warped = dataclasses.replace(base, warp=opt.Curve((1, 4), (1e-4, 4e-4)))
    tree = [-1, 0, 0, 1, 1, 2, 3]  # levels with children: [1, 2, 1] nodes -> 3 draft levels, 4 walked rows at most
    assert warped.t_draft(tree) - base.t_draft(tree) == pytest.approx((1 + 2 + 1) * 1e-4)
    extra_host = warped.step_parts(tree)["host_s"] - base.step_parts(tree)["host_s"]
    assert extra_host == pytest.approx(4e-4)
    profile = {"grid": [1, 4], "layer_s": [1e-3, 1e-3], "head_s": [0, 0], "host_s": [0, 0], "warp_s": [1e-4, 4e-4],
               "draft_level_s": [1e-3, 1e-3], "layer_bytes": 10, "layer_copy_s": 1e-6, "device": "cpu"}
    assert opt.time_model_from_profile(profile, resident=1, n_layers=1, temperature=0.7, top_p=0.9).warp is not None
    assert opt.time_model_from_profile(profile, resident=1, n_layers=1, temperature=0.7, top_p=1.0).warp is None
    assert opt.time_model_from_profile(profile, resident=1, n_layers=1, temperature=0.0, top_p=0.9).warp is None


def test_calibration_scales_each_phase_to_the_measured_step():
    tm = model(opt.Curve((1, 64), (1e-3, 4e-3)), draft_s=2e-3)
    tm = dataclasses.replace(tm, host=opt.Curve.constant(5e-4))
    tree = [-1, 0, 0, 1, 2]
    raw = tm.step_parts(tree)
    measured = {"draft_s": 3 * raw["draft_s"], "verify_s": 1.5 * raw["verify_s"], "host_s": 2 * raw["host_s"]}
    cal = tm.calibrated(measured, tree)
    assert (cal.draft_scale, cal.verify_scale, cal.host_scale) == pytest.approx((3, 1.5, 2))
    got = cal.step_parts(tree)
    for key in measured:
        assert got[key] == pytest.approx(measured[key])
    # re-calibrating a calibrated model starts from the raw model, not on top of the old factors
    assert cal.calibrated(measured, tree).draft_scale == pytest.approx(3)
    # the search's lower bound stays a lower bound with the scales: branch and bound == exhaustive
    table = best_trees(P3, 32, 6)
    best = opt.optimize(P3, cal, max_tree=32, max_depth=6, top=3, table=table)
    exhaustive = max(opt.evaluate(table.tree(n, d), table.value(n, d), cal).tokens_per_s
                     for n in range(1, 33) for d in range(0, 7))
    assert best.best.tokens_per_s == pytest.approx(exhaustive)


def test_plan_records_its_calibration(planned):
    cal = planned.figures["calibration"]
    if planned.n == 1:
        assert cal is None  # plain decoding: nothing to calibrate a tree with
    else:
        assert cal["measured"]["steps"] > 0 and set(cal["factors"]) == {"draft", "verify", "host"}
        assert cal["tree"] and all(f > 0 for f in cal["factors"].values())


def test_measure_step_split_on_the_real_engine(pair):
    from planner.calibrate import measure_step_split

    target, draft = pair
    m = measure_step_split(str(target), str(draft), device=torch.device("cpu"), dtype=torch.float32,
                           tree=[-1, 0, 0, 1], temperature=0.8, top_p=0.9, tokens=12)
    assert m["runs"] == 1 and m["steps"] >= 6 and m["tokens_per_sweep"] >= 1
    assert m["draft_s"] > 0 and m["verify_s"] > 0 and m["host_s"] > 0 and m["reference_s_per_token"] > 0
    # repeated until min_time, capped by max_runs; without the plain-decoding reference when told so
    m = measure_step_split(str(target), str(draft), device=torch.device("cpu"), dtype=torch.float32,
                           tree=[-1, 0, 0, 1], temperature=0.8, top_p=0.9, tokens=6, min_time=1e9, max_runs=3,
                           reference=False)
    assert m["runs"] == 3 and "reference_s_per_token" not in m
