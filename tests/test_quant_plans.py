"""Plans know the weight format they were made for: an int4 engine follows the int4 plan, never the float one; a
self-draft's plans are its own, apart from an external draft's and from the other bit width's."""
from __future__ import annotations

import pytest

from offload_runtime import Engine
from planner.pipeline import PlanRequest, make_plan


@pytest.fixture(scope="module")
def plans(tiny_pair, tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("quant-plans-home")
    old = os.environ.get("OFFLOAD_RUNTIME_HOME")
    os.environ["OFFLOAD_RUNTIME_HOME"] = str(home)
    target, draft = tiny_pair
    common = dict(model=str(target), draft=str(draft), device="cpu", dtype="float32", temperature=0.0, quick=True,
                  grid="1,2,4,8", prefix=8, max_tree=8, max_depth=3, no_calibrate=True)
    try:
        made = {"float": make_plan(PlanRequest(acceptance="0.5", **common)).plan,
                "int4": make_plan(PlanRequest(acceptance="0.9", quantize="int4", group_size=32, **common)).plan}
        for self_draft in ("self-int4", "self-int8"):
            made[self_draft] = make_plan(PlanRequest(**{**common, "draft": self_draft}, acceptance="0.95",
                                                     group_size=32)).plan
        yield made
    finally:
        if old is None:
            os.environ.pop("OFFLOAD_RUNTIME_HOME")
        else:
            os.environ["OFFLOAD_RUNTIME_HOME"] = old


def test_each_weight_format_follows_its_own_plan(plans, tiny_pair, capsys):
    target, draft = tiny_pair
    assert plans["int4"].formats == ("int4-g32", None) and plans["float"].formats == (None, None)
    assert plans["int4"].key() != plans["float"].key() and plans["int4"].path != plans["float"].path
    assert "--quantize int4 --group-size 32" in plans["int4"].rebuild_command()
    fp = Engine.from_pretrained(target, draft=str(draft), dtype="float32")
    q = Engine.from_pretrained(target, draft=str(draft), dtype="float32", quantize="int4", group_size=32)
    assert fp.plans == [plans["float"]] and q.plans == [plans["int4"]]
    capsys.readouterr()
    # A format no plan was made for gets none, and the notice says how to make one for it.
    Engine.from_pretrained(target, draft=str(draft), dtype="float32", quantize="int8", group_size=32)
    err = capsys.readouterr().err
    assert "no plan" in err and "--quantize int8 --group-size 32" in err


def test_a_named_plan_of_another_format_is_flagged(plans, tiny_pair, capsys):
    target, draft = tiny_pair
    Engine.from_pretrained(target, draft=str(draft), dtype="float32", plan=str(plans["int4"].path))
    assert "built for weights int4-g32 / float, not float / float" in capsys.readouterr().err


def test_self_drafts_have_their_own_plans_and_acceptance_files(plans, tiny_pair):
    from planner.acceptance import acceptance_path

    target, _ = tiny_pair
    int4, int8, external = plans["self-int4"], plans["self-int8"], plans["float"]
    assert int4.formats == (None, "int4-g32") and int8.formats == (None, "int8-g32")
    assert len({int4.draft.identity, int8.draft.identity, external.draft.identity}) == 3
    assert len({int4.path, int8.path, external.path}) == 3
    assert int4.draft.path == int4.target.path and int4.draft.fingerprint == int4.target.fingerprint
    assert "--draft self-int4" in int4.rebuild_command() and "--group-size 32" in int4.rebuild_command()
    assert len({acceptance_path(p.target, p.draft, 0.0, 1.0, 16, "sha", p.formats)
                for p in (int4, int8, external)}) == 3
    for name in ("self-int4", "self-int8"):
        assert Engine.from_pretrained(target, draft=name, group_size=32, dtype="float32").plans == [plans[name]]
