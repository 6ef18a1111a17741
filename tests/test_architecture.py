"""The shape the code promises: one-way layers, one tree rule, per-regime plan trees, linear-time stop strings,
phase timing without device-wide synchronisation."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_runtime import Engine
from offload_runtime.api.machine import machine_fingerprint
from offload_runtime.api.plans import Plan, local_ref, save_plan
from offload_runtime.api.text import TextStream
from offload_runtime.decode.timing import StepClock
from offload_runtime.model.tree import Tree
from offload_runtime.spec.methods import verify
from offload_runtime.spec.tree_search import expected_tokens

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "offload_runtime"


def _imports(path: Path) -> list[str]:
    """Every module a Python file imports (absolute names; relative imports resolved against the package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


# --- dependencies run one way


def test_the_runtime_never_imports_the_planner():
    offenders = [f"{p.relative_to(REPO)}: {m}" for p in RUNTIME.rglob("*.py") for m in _imports(p)
                 if m == "planner" or m.startswith("planner.")]
    assert offenders == []


def test_importing_and_running_the_runtime_loads_no_planner_module():
    code = ("import sys, offload_runtime\n"
            "from offload_runtime import Engine\n"
            "e = Engine.from_pretrained('demo', device='cpu', quiet=True)\n"
            "e.generate('In the beginning', max_new_tokens=4, temperature=0)\n"
            "print(sorted(m for m in sys.modules if m == 'planner' or m.startswith('planner.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_lower_layers_do_not_import_upper_ones():
    """model/ and weights/ know nothing of decoding or the API; spec/ nothing of decoding; decode/ not the API."""
    above = {"model": ("decode", "api", "spec", "streaming", "residency", "weights"),
             "weights": ("decode", "api", "spec"), "spec": ("decode", "api"), "decode": ("api",)}
    offenders = []
    for layer, banned in above.items():
        for p in (RUNTIME / layer).rglob("*.py"):
            for m in _imports(p):
                if any(m == f"offload_runtime.{b}" or m.startswith(f"offload_runtime.{b}.") for b in banned):
                    offenders.append(f"{p.relative_to(REPO)}: {m}")
    assert offenders == []


# --- one tree rule


def test_one_rule_for_a_valid_tree_everywhere():
    """[-1, 0, 0, 1, 2, 1] has non-decreasing depths but its children are not grouped by parent: not a tree,
    for the Tree type, the tree search's objective and the verifiers alike."""
    bad = [-1, 0, 0, 1, 2, 1]
    with pytest.raises(ValueError, match="breadth-first"):
        Tree(bad)
    with pytest.raises(ValueError, match="breadth-first"):
        expected_tokens(bad, [0.5, 0.2])
    p = torch.full((6, 4), 0.25)
    with pytest.raises(AssertionError, match="breadth-first"):
        verify("sequoia", bad, [0, 1, 2, 3, 0, 1], p, p, torch.Generator().manual_seed(0))
    good = Tree([-1, 0, 0, 1, 1, 2])
    assert good.ranks == (0, 1, 2, 1, 2, 1) and good.internal_per_level == (1, 2) and good == [-1, 0, 0, 1, 1, 2]


# --- each request gets the tree of its own plan


def _plan(target: Path, draft: Path, temperature: float, top_p: float, tree: list[int]) -> Plan:
    return Plan(target=local_ref(str(target)), draft=local_ref(str(draft)), device="cpu", dtype="float32",
                temperature=temperature, top_p=top_p, batch_size=1, machine=machine_fingerprint("cpu"), tree=tree,
                resident_layers=[0, 1, 2], n_layers=3, offload=False, gpu_memory=None, max_seq_len=256, slots=2,
                acceptance={"p": [0.5], "source": "given"}, figures={},
                predicted={"tokens_per_step": 2.0, "s_per_token": 0.01, "tokens_per_s": 100.0})


def test_greedy_and_sampled_requests_use_the_trees_of_their_own_plans(tiny_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(tmp_path / "home"))
    target, draft = tiny_pair
    greedy_tree, sampled_tree = [-1, 0, 1, 2, 3], [-1, 0, 0, 0, 1, 2]
    save_plan(_plan(target, draft, 0.0, 1.0, greedy_tree))
    save_plan(_plan(target, draft, 0.7, 1.0, sampled_tree))
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", batch_size=2)
    notice = capsys.readouterr().err.strip()
    assert notice.count("\n") == 0 and "greedy" in notice and "T=0.7" in notice
    greedy = engine.request("the cat sat", max_new_tokens=8, temperature=0, ignore_eos=True)
    sampled = engine.request("the cat sat", max_new_tokens=8, temperature=0.7, top_p=1.0, seed=3, ignore_eos=True)
    assert greedy.tree == greedy_tree and sampled.tree == sampled_tree
    # In one batch, each row drafts and verifies its own tree: the tokens are the ones each gives alone.
    together = {i: r.token_ids for i, r in engine.run([greedy, sampled])}
    alone_greedy = engine.generate("the cat sat", max_new_tokens=8, temperature=0, ignore_eos=True)[0]
    alone_sampled = engine.generate("the cat sat", max_new_tokens=8, temperature=0.7, top_p=1.0, seed=3,
                                    ignore_eos=True)[0]
    assert together == {0: alone_greedy.token_ids, 1: alone_sampled.token_ids}
    assert max(len(r) for r in greedy.stats.accepted_ranks) <= 4
    # A sampled regime with no plan of its own takes the nearest sampled plan, never the greedy one.
    assert engine.request("the cat", temperature=1.0, top_p=0.9).tree == sampled_tree
    # A tree given for the call overrides the plans.
    assert engine.request("the cat", temperature=0, tree=[-1, 0]).tree == [-1, 0]


# --- stop strings in linear time


def _old_stop(tokenizer, steps: list[list[int]], stop: str) -> tuple[int, str]:
    """The old rule: after every step, decode the whole reply and look for the stop string."""
    ids: list[int] = []
    for k, new in enumerate(steps):
        ids += new
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop in text:
            return k, text[: text.find(stop)]
    return len(steps) - 1, tokenizer.decode(ids, skip_special_tokens=True)


def test_a_4000_token_reply_with_a_stop_string_costs_linear_detokenising():
    from offload_runtime.api.registry import demo_paths
    from offload_runtime.api.text import load_tokenizer

    tok = load_tokenizer(demo_paths()[0])
    verse = ("And God said, Let there be light: and there was light. And the evening and the morning were the "
             "first day; and he rested, and blessed them, saying unto them. ")
    stop = "endeth the lesson"
    ids = tok(verse * 200, add_special_tokens=False).input_ids[:4000]
    ids += tok(" Here endeth the lesson. Amen.", add_special_tokens=False).input_ids  # the stop, near the end
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 4000 and text.count(stop) == 1
    g = torch.Generator().manual_seed(0)
    steps, i = [], 0
    while i < len(ids):
        k = int(torch.randint(1, 6, (), generator=g))  # 1..5 tokens a step, as a speculative step emits
        steps.append(ids[i: i + k])
        i += k
    old_step, old_text = _old_stop(tok, steps, stop)
    stream = TextStream(tok, (stop,))
    new_step = None
    for k, new in enumerate(steps):
        stream.add(new)
        if stream.stopped:
            new_step = k
            break
    assert (new_step, stream.result()) == (old_step, old_text)
    # Work: a few tokens of context per step, not the whole reply (the old rule decoded ~n^2 / 2 tokens).
    assert stream.decoded_tokens < 6 * len(ids), stream.decoded_tokens
    assert sum(len(s) for s in steps[: old_step + 1]) > 3500


def test_generate_stops_where_the_old_rule_stopped(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", tree=[-1, 0, 0, 1, 2])
    full = engine.generate("the cat sat", max_new_tokens=40, temperature=0, ignore_eos=True)[0]
    steps, at = [], 0
    for emitted in (a + 1 for a in full.stats.accepted_per_step):
        steps.append(full.token_ids[at: at + emitted])
        at += emitted
    step_ends = {sum(len(s) for s in steps[: k + 1]) for k in range(len(steps))}

    def completes(stop: str) -> int:  # how many tokens it takes for the stop string to appear
        decode = engine.tokenizer.decode
        return next(k for k in range(1, len(full.token_ids) + 1)
                    if stop in decode(full.token_ids[:k], skip_special_tokens=True))
    words = full.text.split()
    # A stop string that completes inside a step, where the old rule kept the rest of the step's tokens.
    stop = next(s for s in (" ".join(words[i:i + 2]) for i in range(1, len(words) - 1))
                if completes(s) not in step_ends)
    stopped = engine.generate("the cat sat", max_new_tokens=40, temperature=0, ignore_eos=True, stop=stop)[0]
    old_step, old_text = _old_stop(engine.tokenizer, steps, stop)
    assert stopped.finish_reason == "stop" and stopped.text == old_text
    # The tokens end at the one that completes the stop string, so they are the same whatever the tree: plain
    # decoding's.
    assert stopped.token_ids == full.token_ids[: completes(stop)]
    plain = Engine.from_pretrained(target, draft=False, dtype="float32")
    assert plain.generate("the cat sat", max_new_tokens=40, temperature=0, ignore_eos=True, stop=stop)[0].token_ids \
        == stopped.token_ids
    # A reply that ends on the beginning of a stop string streams that beginning too, as generate returns it.
    short = engine.generate("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True)[0].text
    tail = short.split()[-1] + " zzzz"
    assert "".join(engine.stream("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True, stop=tail)) == \
        engine.generate("the cat sat", max_new_tokens=12, temperature=0, ignore_eos=True, stop=tail)[0].text == short


# --- phase timing never waits for the whole device


def test_the_decoding_path_calls_no_device_wide_synchronize():
    """Timing by events only: no torch.cuda.synchronize in the decoder, the scheduler, the methods, the
    streamer or the engine (the planner's profiler may synchronise: it measures, nothing overlaps there)."""
    files = [*(RUNTIME / "decode").glob("*.py"), *(RUNTIME / "spec").glob("*.py"), *(RUNTIME / "api").glob("*.py"),
             RUNTIME / "streaming.py", *(RUNTIME / "model").glob("*.py")]
    calls = [f"{p.relative_to(REPO)}:{n.lineno}" for p in files for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Attribute) and n.attr == "synchronize" and isinstance(n.value, ast.Attribute)
             and n.value.attr == "cuda"]
    assert calls == []


class FakeEvent:
    """A CUDA event stand-in: records on 'the stream', completes when the test says so."""

    clock = 0.0
    done = False

    def __init__(self):
        self.t = None

    def record(self):
        FakeEvent.clock += 0.25
        self.t = FakeEvent.clock

    def query(self):
        return FakeEvent.done

    def synchronize(self):
        FakeEvent.done = True

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_event_timing_resolves_lazily_and_never_synchronises_the_device(tiny_pair, monkeypatch):
    def no_device_sync(*a, **k):
        raise AssertionError("device-wide synchronize inside a step")

    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", tree=[-1, 0, 1])
    engine.decoder.clock = StepClock(torch.device("cpu"), event_factory=FakeEvent)
    FakeEvent.done = False
    req = engine.request("the cat sat", max_new_tokens=6, temperature=0, ignore_eos=True)
    for _ in engine.scheduler.run([req]):
        pass
    assert req.done and req.stats.steps > 0 and req.stats.time_s == 0  # nothing resolved while events pend
    engine.decoder.clock.resolve(block=True)  # waits on the last event only
    assert req.stats.draft_s == req.stats.sweep_s == req.stats.host_s == pytest.approx(0.25 * req.stats.steps)
