"""The planner's choice between Sequoia's static tree and dynamic trees: the measurement, the recorded reason,
plans the engine follows, and plan files written before the choice existed."""
from __future__ import annotations

import json

import pytest

from offload_runtime import Engine
from offload_runtime.api.plans import PLAN_VERSION, Plan, read_plan
from offload_runtime.model.tree import Tree
from offload_runtime.spec.growth import ConfidenceAcceptance, DynamicTree
from planner import __main__ as cli
from planner import acceptance as acc
from planner import optimizer as opt
from test_planner import ACC_FLAGS, QUICK, home, pair  # noqa: F401 (fixtures)


def candidate(n: int, tokens_per_step: float, step_s: float) -> opt.Candidate:
    return opt.Candidate(n=n, depth=4, batch=1, tokens_per_step=tokens_per_step, draft_s=0.0, verify_s=step_s,
                         host_s=0.0, overhead_s=0.0, parents=())


def test_choose_policy_keeps_the_faster_and_says_why():
    static = candidate(16, 3.0, 1.0)
    slower, faster = candidate(8, 2.5, 1.0), candidate(32, 3.6, 1.0)
    choice = opt.choose_policy(static, [slower, faster])
    assert choice.policy == "dynamic" and choice.chosen is faster and "+20.0%" in choice.reason
    assert opt.choose_policy(static, [slower]).policy == "static"
    assert opt.choose_policy(static, [candidate(16, 3.0, 1.0)]).policy == "static"  # a tie keeps the static tree
    assert opt.choose_policy(static, [slower], forced="dynamic").chosen is slower
    assert opt.choose_policy(static, []).reason == "dynamic trees were not measured"


@pytest.fixture(scope="module")
def auto_plan(home, pair):  # noqa: F811
    target, draft = pair
    assert cli.main(["plan", "--model", str(target), "--draft", str(draft), *QUICK, *ACC_FLAGS, "--max-tree", "16",
                     "--max-depth", "5", "--temperature", "0"]) == 0
    plans = [p for p in map(read_plan, (home / "plans").glob("*.json")) if p.temperature == 0]
    assert len(plans) == 1
    return plans[0]


def test_plan_measures_both_policies_and_keeps_the_faster(auto_plan):
    plan = auto_plan
    assert plan.version == PLAN_VERSION == 2
    d = plan.dynamic
    sizes = [c["n"] for c in d["candidates"]]  # the quick budgets, and the static tree's own size
    assert sizes == sorted({4, 16} | ({plan.n} if plan.n > 1 else set())) and d["depth"] == 5
    for entry in [d["static"]] + d["candidates"]:
        m, pr = entry["measured"], entry["predicted"]
        assert m["steps"] > 0 and 1 <= m["tokens_per_step"] <= 6 and 1 <= m["nodes"] <= entry["n"]
        assert pr["tokens_per_step"] == m["tokens_per_step"] and pr["draft_s"] == m["draft_s"] > 0
    assert d["static"]["n"] == plan.n
    best = max(d["candidates"], key=lambda c: c["predicted"]["tokens_per_s"])
    faster = best["predicted"]["tokens_per_s"] > d["static"]["predicted"]["tokens_per_s"]
    assert plan.policy == ("dynamic" if faster else "static") and d["size"] == best["n"]
    assert d["reason"].startswith(plan.policy)
    conf = ConfidenceAcceptance.from_dict(d["acceptance"])  # keyed by the measured confidence table
    assert len(conf.table) >= 2 and d["keyed_by"] == conf.describe()
    if plan.policy == "dynamic":
        assert plan.predicted["tokens_per_step"] == best["measured"]["tokens_per_step"]


def test_show_says_which_policy_and_why(auto_plan, capsys):
    assert cli.main(["show", str(auto_plan.path)]) == 0
    out = capsys.readouterr().out
    assert f"policy      {auto_plan.dynamic['reason']}" in out and "tokens/step (measured)" in out
    assert ("grown per step" in out) == (auto_plan.policy == "dynamic")


def test_engine_follows_a_dynamic_plan(auto_plan, pair, tmp_path, capsys):  # noqa: F811
    target, draft = pair
    data = auto_plan.to_dict()
    data["policy"] = "dynamic"
    path = tmp_path / "dynamic.json"
    path.write_text(json.dumps(data))
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", plan=str(path))
    greedy = engine.sampling_params(temperature=0)
    grown = engine.tree_for(greedy)
    assert grown == DynamicTree(auto_plan.dynamic["size"], 5)
    assert isinstance(grown.model, ConfidenceAcceptance)  # the plan's calibration
    assert engine.tree_for(greedy, "static") == Tree(auto_plan.tree)
    assert "dynamic trees of up to" in capsys.readouterr().err
    out = engine.generate([5, 6, 7], max_new_tokens=10, temperature=0, ignore_eos=True)[0]
    assert max(out.stats.tree_sizes) <= grown.size
    # a size given to the engine overrides the plan's budget, keeping its calibration
    bigger = Engine.from_pretrained(target, draft=str(draft), dtype="float32", plan=str(path), tree_size=24)
    assert bigger.tree_for(greedy).size == 24 and isinstance(bigger.tree_for(greedy).model, ConfidenceAcceptance)


def test_version_1_plans_read_as_static(auto_plan, pair, tmp_path):  # noqa: F811
    target, draft = pair
    data = auto_plan.to_dict()
    data["version"] = 1
    del data["policy"], data["dynamic"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    plan = read_plan(path)
    assert plan.policy == "static" and plan.dynamic is None
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", plan=str(path), quiet=True)
    assert engine.tree_for(engine.sampling_params(temperature=0)) == Tree(auto_plan.tree)
    data["version"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(Exception, match="format version 3"):
        read_plan(path)
    bad = dict(auto_plan.to_dict(), policy="dynamic", dynamic=None)
    with pytest.raises(Exception, match="not a complete plan"):
        Plan.from_dict(bad)


def test_acceptance_records_the_confidence_table(pair, tmp_path):  # noqa: F811
    from planner.models import resolve_model

    target, draft = (resolve_model(str(x))[0] for x in pair)
    result = acc.measure_acceptance(target, draft, device="cpu", dtype="float32", temperature=0.0, width=3,
                                    prompts=acc.BUILTIN_PROMPTS[:4], max_new_tokens=16)
    conf = ConfidenceAcceptance.from_dict(result.confidence)
    assert len(conf.table[0]) == 3 and len(conf.edges) >= 1
    # bins shrink toward the pooled vector, whose average is p
    assert list(conf.marginal) == pytest.approx(result.p, abs=0.05)
    path = tmp_path / "old.json"
    old = result.to_dict()
    del old["confidence"]  # a file measured before the table was recorded still reads
    path.write_text(json.dumps(old))
    assert acc.read_acceptance(path).confidence is None
