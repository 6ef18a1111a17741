"""The planner's inputs: each bad one is refused in one line before any profiling or measuring (which takes minutes
on a real model), and no file of the user's is overwritten. Measuring is replaced by a tripwire where a test
expects a refusal, so "before profiling" is checked, not assumed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer, make_truncated_draft, one_line_error, run_cli
from offload_runtime.api.plans import read_plan
from offload_runtime.errors import CheckpointError, MissingFileError, UsageError
from planner import __main__ as cli
from planner import acceptance as acc
from planner import pipeline
from planner import profile as prof

CPU = ["--device", "cpu", "--threads", "1"]
QUICK = [*CPU, "--quick"]
# A plan of shape presets: no weights, a profile of seven points, no engine runs; about a second.
TINY_PLAN = ["plan", "--model", "tiny", "--draft", "tiny", *QUICK, "--acceptance", "default", "--max-tree", "8",
             "--max-depth", "3", "--max-seq-len", "64"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh store for each test; torch's thread count restored afterwards."""
    path = tmp_path / "home"
    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(path))
    threads = torch.get_num_threads()
    yield path
    torch.set_num_threads(threads)


@pytest.fixture
def no_measuring(monkeypatch):
    """Profiling or measuring acceptance fails the test: the input should have been refused before either."""
    def tripwire(*args, **kwargs):
        raise AssertionError("measured before the inputs were checked")

    monkeypatch.setattr(prof, "run_profile", tripwire)
    monkeypatch.setattr(acc, "measure_acceptance", tripwire)


# --- 1. --output and --plot


@pytest.mark.parametrize("command", [
    [*TINY_PLAN, "--output"],
    [*TINY_PLAN, "--plot"],
    ["acceptance", "--model", "demo", "--draft", "demo-draft", *CPU, "--limit", "1", "--max-new-tokens", "8",
     "--output"],
    ["profile", "--model", "tiny", "--no-draft", *QUICK, "--output"],
], ids=["plan", "plot", "acceptance", "profile"])
def test_an_existing_file_that_is_not_the_planners_is_not_overwritten(command, home, tmp_path, no_measuring):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    with pytest.raises(UsageError, match="is not overwritten"):
        cli.main([*command, str(precious)])
    assert precious.read_text() == "precious\n"


def test_an_existing_plan_file_is_rebuilt(home, tmp_path):
    out = tmp_path / "plan.json"
    assert cli.main([*TINY_PLAN, "--output", str(out)]) == 0
    first = read_plan(out)
    assert cli.main([*TINY_PLAN, "--max-tree", "4", "--output", str(out)]) == 0
    assert read_plan(out).search["max_tree"] == 4 != first.search["max_tree"]


@pytest.mark.parametrize("flag", ["--output", "--plot"])
def test_an_output_in_a_missing_directory_is_refused_and_not_made(flag, home, tmp_path, no_measuring):
    with pytest.raises(UsageError, match=r"does not exist; create it \(mkdir -p"):
        cli.main([*TINY_PLAN, flag, str(tmp_path / "nodir" / "x.out")])
    assert not (tmp_path / "nodir").exists()


# --- 2. the store


def test_a_home_that_is_a_file_is_refused_before_profiling(tmp_path, monkeypatch, no_measuring):
    home = tmp_path / "home"
    home.write_text("not a directory\n")
    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(home))
    for command in (TINY_PLAN, ["profile", "--model", "tiny", "--no-draft", *QUICK]):
        with pytest.raises(UsageError, match="is a file, not a directory; point OFFLOAD_RUNTIME_HOME at"):
            cli.main(command)
    assert home.read_text() == "not a directory\n"


def test_a_home_that_is_a_file_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.write_text("x")
    proc = run_cli("planner", *TINY_PLAN, env={"OFFLOAD_RUNTIME_HOME": str(home)})
    one_line_error(proc, 2, "is a file, not a directory")


# --- 3. the model pair and the flags, before profiling


@pytest.fixture
def pair_copy(tiny_pair, tmp_path):
    root = tmp_path / "pair"
    return shutil.copytree(tiny_pair[0], root / "target"), shutil.copytree(tiny_pair[1], root / "draft")


def plan_of(target: Path, draft: Path, *flags: str) -> list[str]:
    return ["plan", "--model", str(target), "--draft", str(draft), *QUICK, "--acceptance", "default", *flags]


def test_a_truncated_checkpoint_is_refused_before_profiling(pair_copy, home, no_measuring):
    target, draft = pair_copy
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        cli.main(plan_of(target, draft))


def test_a_draft_of_another_vocabulary_size_is_refused_before_profiling(pair_copy, home, tmp_path, no_measuring):
    target, _ = pair_copy
    small = make_truncated_draft(target, tmp_path / "small", "llama-mha", vocab_size=64)  # and no tokenizer
    with pytest.raises(UsageError, match="has vocab_size 64 but target"):
        cli.main(plan_of(target, small))


def test_a_draft_with_another_tokenizer_is_refused_before_profiling(pair_copy, home, no_measuring):
    target, draft = pair_copy
    make_tokenizer(draft, 128, renamed={w: w.upper() for w in ("the", "a", "an", "and", "of")})
    with pytest.raises(UsageError, match="has another vocabulary than target"):
        cli.main(plan_of(target, draft))


@pytest.mark.parametrize("flags, message", [
    (["--dynamic-sizes", "0,abc"], "--dynamic-sizes: cannot read"),
    (["--grid", "5-2"], "cannot read grid '5-2'"),
    (["--grid", "a,b"], "cannot read grid 'a,b'"),
    (["--prefix", "-1"], "--prefix must be >= 0"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "cannot read prompts file"),
])
def test_flags_are_read_before_a_cached_profile_is_used(flags, message, home, monkeypatch):
    """Even with a profile in the store (where --grid used to be skipped, and the rest came after it)."""
    assert cli.main(TINY_PLAN) == 0
    monkeypatch.setattr(prof, "run_profile", lambda *a, **k: pytest.fail("profiled"))
    with pytest.raises(UsageError, match=message):
        cli.main([*TINY_PLAN, *flags])


# --- 4. which profile a plan uses


def test_a_cached_profile_is_used_only_when_it_covers_the_request(home, monkeypatch):
    logs: list[str] = []
    calls: list[list[int]] = []
    measure = prof.run_profile

    def counted(*args, **kwargs):
        calls.append(list(kwargs["grid"]))
        return measure(*args, **kwargs)

    monkeypatch.setattr(prof, "run_profile", counted)

    def ensure(**asked) -> dict:
        req = pipeline.PlanRequest(model="tiny", no_draft=True, device="cpu", log=logs.append, **asked)
        return pipeline.ensure_profile(req, pipeline.resolve(req), force=False)[0]

    ensure(quick=True, grid="1,2")
    assert ensure(quick=True, grid="1,2")["grid"] == [1, 2] and calls == [[1, 2]]  # the same ask: reused
    assert ensure(quick=True, grid="2")["grid"] == [1, 2] and len(calls) == 1  # a subset: reused
    logs.clear()
    ensure(quick=True, grid="1,2,3")
    assert calls[-1] == [1, 2, 3] and any("has no timings for 3 tokens; profiling again" in s for s in logs)
    # A full plan does not take the quick profile in the same place of the store for its own.
    logs.clear()
    monkeypatch.setattr(prof, "run_profile", lambda *a, **k: pytest.fail("profiled again"))
    with pytest.raises(pytest.fail.Exception, match="profiled again"):
        ensure(grid="1,2,3")
    assert any("is a quick one (--quick); profiling again" in s for s in logs)


# --- 5. show


def test_show_defaults_the_draft_as_plan_does(home, capsys):
    plan = ["plan", "--model", "demo", *QUICK, "--acceptance", "default", "--policy", "static", "--no-calibrate",
            "--grid", "1,2,4", "--prefix", "8", "--max-tree", "4", "--max-depth", "2", "--max-seq-len", "64"]
    assert cli.main(plan) == 0
    capsys.readouterr()
    assert cli.main(["show", "--model", "demo", "--device", "cpu"]) == 0
    assert "with draft demo-draft" in capsys.readouterr().out


def test_show_says_what_is_missing(home, tmp_path):
    with pytest.raises(MissingFileError, match="not found: no such file or directory"):
        cli.main(["show", "--model", str(tmp_path / "nope")])
    with pytest.raises(UsageError, match="tiny has no default draft; pass --draft"):
        cli.main(["show", "--model", "tiny"])


# --- 7. --acceptance


@pytest.mark.parametrize("name", ["nope.json", "some/dir/acceptance"])
def test_an_acceptance_file_that_does_not_exist_is_said_so(name, home, tmp_path, no_measuring):
    with pytest.raises(UsageError, match="does not exist; measure one with `python -m planner acceptance --output"):
        cli.main([*TINY_PLAN, "--acceptance", str(tmp_path / name)])
    with pytest.raises(UsageError, match="cannot read acceptance vector"):  # not a path: a vector mistyped
        cli.main([*TINY_PLAN, "--acceptance", "0.5,x"])


def test_a_large_file_is_refused_without_being_read(home, tmp_path, no_measuring, monkeypatch):
    big = tmp_path / "model.safetensors"  # a shard passed as --output by mistake
    with open(big, "wb") as f:
        f.truncate(pipeline.OUTPUT_MAX_BYTES + 1)  # sparse: no disk taken
    monkeypatch.setattr(pipeline, "read_plan", lambda path: pytest.fail("read the whole file"))
    with pytest.raises(UsageError, match="is not overwritten"):
        cli.main([*TINY_PLAN, "--output", str(big)])
    assert big.stat().st_size == pipeline.OUTPUT_MAX_BYTES + 1


# --- 6. a user's file given as a profile is not to be deleted


def test_a_file_that_is_not_a_profile_is_not_called_deletable(home, tmp_path, no_measuring):
    mine = tmp_path / "good.jsonl"
    mine.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    with pytest.raises(UsageError, match="is not a planner profile") as e:
        cli.main([*TINY_PLAN, "--profile", str(mine)])
    assert "delete" not in str(e.value)
