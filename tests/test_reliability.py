"""No bad record, path, plan file or network stops a job, corrupts a file or hangs the runtime (issue 15).

Each test drives one surface with a bad input or a fault and checks for the one clear line, and that nothing is
lost. The command lines run as subprocesses. Checks that must come before the model loads are run with a model
path that does not exist: an error about anything else shows that the check ran first.
"""
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import CLI_ENV, make_checkpoint, one_line_error, read_jsonl, run_cli, write_jsonl

from offload_runtime import Engine, batch
from offload_runtime.api.machine import machine_fingerprint
from offload_runtime.api.plans import ModelRef, Plan, PlanError, save_plan
from offload_runtime.errors import (CheckpointError, ConfigError, ModelOutputError, ResourceError, StoreError,
                                    UsageError)
from offload_runtime.model.config import ModelArgs
from offload_runtime.weights.layout import layer_bytes
from offload_runtime.spec.policy import default_tree
from offload_runtime.weights import checkpoint as checkpoint_module
from offload_runtime.weights.checkpoint import Checkpoint

BATCH, CHAT = "offload_runtime.batch", "offload_runtime.chat"
# The decoding-side checks also run on CUDA (copy stream and events, device-side argmax), where a GPU is lent.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]
NAN_MESSAGE = "the model produced NaN logits; the checkpoint may be corrupt"
# As strict as published templates (Llama 2's raises on roles it does not know); a message "boom" stands in
# for a bug: the template then fails with an error that is no OffloadError.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}{% if m['content'] == 'boom' %}{{ 1 // 0 }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def with_nan(src: Path, dst: Path, tensor: str, row: int | None = None) -> Path:
    """A copy of a checkpoint with NaN in one tensor (or one row of it): a corrupt download."""
    from safetensors.torch import load_file, save_file

    copy_checkpoint(src, dst)
    weights = load_file(dst / "model.safetensors")
    if row is None:
        weights[tensor][:] = float("nan")
    else:
        weights[tensor][row] = float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def strict_target(tiny_pair, tmp_path_factory) -> Path:
    target = copy_checkpoint(tiny_pair[0], tmp_path_factory.mktemp("strict") / "target")
    (target / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return target


@pytest.fixture(scope="module")
def nan_target(tiny_pair, tmp_path_factory) -> Path:
    return with_nan(tiny_pair[0], tmp_path_factory.mktemp("nan") / "target", "model.norm.weight")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A runtime home of this test's own (plans written here are seen by no other test)."""
    monkeypatch.setenv("OFFLOAD_RUNTIME_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def stderr_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def memory_cap():
    # A regression that reads a device without end must fail with MemoryError, not take the machine down.
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))


def no_model(tmp_path: Path) -> list:
    return ["--model", tmp_path / "no-such-model", "--device", "cpu"]


# --- batch: bad records (item 1, item 7's ids and fields)


def test_each_bad_record_is_reported_and_the_job_goes_on(strict_target, tiny_pair, tmp_path):
    rows = [
        {"id": "good-1", "prompt": "the cat sat"},                                   # 1
        {"id": "seed-text", "prompt": "the cat", "seed": "x"},                       # 2
        {"id": "seed-huge", "prompt": "the cat", "seed": 2**64},                     # 3
        {"id": "no-messages", "messages": []},                                       # 4
        {"id": "wizard", "messages": [{"role": "wizard", "content": "hi"}]},         # 5: the template refuses it
        {"id": "stop-ints", "prompt": "the cat", "stop": [1]},                       # 6
        {"id": "stop-number", "prompt": "the cat", "stop": 5},                       # 7
        {"id": "eos-text", "prompt": "the cat", "ignore_eos": "yes"},                # 8
        {"id": "hot", "prompt": "the cat", "temperature": "hot"},                    # 9
        {"id": True, "prompt": "the cat"},                                           # 10
        {"id": 7, "prompt": "the dog", "max_tokens": 3},                             # 11: good, an unknown field
        {"id": "7", "prompt": "the dog"},                                            # 12: the same id as line 11
        {"id": "surrogate", "prompt": "the \udcff cat"},                             # 13
        {"id": "vocab", "prompt": [5, 999]},                                         # 14: outside the vocabulary
        {"id": "good-2", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 9},  # 15
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = run_cli(BATCH, "--model", strict_target, "--draft", tiny_pair[1], "--input", inp, "--output", out,
                   "--max-new-tokens", "3", "--temperature", "0", "--batch-size", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc)
    for n, reason in [(2, "seed"), (3, "seed"), (4, "non-empty list"), (5, "unknown role wizard"), (6, "stop"),
                      (7, "stop"), (8, "ignore_eos"), (9, "temperature"), (10, "needs an id"),
                      (12, "already on line 11"), (13, "lone surrogate"), (14, "outside the vocabulary")]:
        mine = [line for line in lines if line.startswith(f"{inp}:{n}: ")]
        assert len(mine) == 1 and reason in mine[0] and mine[0].endswith("; skipped"), (n, lines)
    assert len([line for line in lines if "'max_tokens'" in line]) == 1  # once per field name
    assert sorted(map(str, (r["id"] for r in read_jsonl(out)))) == ["7", "good-1", "good-2"]


@dataclass
class Poisoned:
    """A checkpoint with one corrupt embedding row (NaN), prompts that never meet it, and what they give."""

    model: Path
    token: int  # the corrupt row
    prompts: list[list[int]]
    expected: list[str]  # their texts (greedy, 8 tokens) on the sound model

    @property
    def bad_prompt(self) -> list[int]:
        return [self.token] + [9] * 29  # long: its NaN K/V reach far into its cache row


@pytest.fixture(scope="module")
def poisoned(tiny_pair, tmp_path_factory) -> Poisoned:
    target, draft = tiny_pair
    # Long rows next to short ones: a short row's attention spans the long rows' context, so it meets masked
    # slots of its own row that an earlier occupant wrote (and a zero weight times NaN is NaN).
    prompts = [[5 + i] * (2 if i in (3, 5, 7) else 20) for i in range(8)]
    ref = Engine.from_pretrained(target, draft=str(draft), dtype="float64", device="cpu")
    results = ref.generate(prompts, max_new_tokens=8, temperature=0)
    token = min(set(range(10, 128)) - {t for p in prompts for t in p} - {t for r in results for t in r.token_ids})
    model = with_nan(target, tmp_path_factory.mktemp("poisoned") / "target", "model.embed_tokens.weight", row=token)
    return Poisoned(model, token, prompts, [r.text for r in results])


def test_a_record_that_fails_while_decoding_costs_only_itself(poisoned, tiny_pair, tmp_path):
    """A record whose decoding raises mid-batch (NaN logits from a corrupt embedding row) is reported with its
    id; the records sharing its sweeps, and those that take its cache row next, come out as on a sound model."""
    rows = [{"id": i, "prompt": p} for i, p in enumerate(poisoned.prompts)]
    rows.insert(2, {"id": "bad", "prompt": poisoned.bad_prompt})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = run_cli(BATCH, "--model", poisoned.model, "--draft", tiny_pair[1], "--dtype", "float64", "--input", inp,
                   "--output", out, "--max-new-tokens", "8", "--temperature", "0", "--batch-size", "4",
                   "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = [line for line in stderr_lines(proc) if line.startswith(f"{inp}:3: id \"bad\" failed: ")]
    assert len(failed) == 1 and NAN_MESSAGE in failed[0] and "a rerun retries it" in failed[0], proc.stderr
    assert "1 of 9 records failed" in proc.stderr
    assert {r["id"]: r["text"] for r in read_jsonl(out)} == dict(enumerate(poisoned.expected))


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_row_leaves_nothing_behind(poisoned, tiny_pair, device):
    """After the corrupt request fails, nothing fails again: the next request in its cache row does not meet
    its NaN K/V (which the retry of every step alone would otherwise hide, at a sweep per row per step)."""
    engine = Engine.from_pretrained(poisoned.model, draft=str(tiny_pair[1]), dtype="float64", device=device,
                                    batch_size=4)
    prompts = poisoned.prompts[:2] + [poisoned.bad_prompt] + poisoned.prompts[2:]
    requests = [engine.request(p, max_new_tokens=8, temperature=0) for p in prompts]
    step, raised = engine.decoder.step, []

    def counting_step(rows):
        try:
            return step(rows)
        except Exception as e:
            raised.append(e)
            raise
    engine.decoder.step = counting_step
    results = dict(engine.run(requests))
    assert isinstance(results[2].error, ModelOutputError)
    assert [results[i].text for i in range(len(prompts)) if i != 2] == poisoned.expected
    assert len(raised) == 2  # the shared step, then the corrupt row alone; never again


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_that_raises_ends_alone_and_a_transient_failure_ends_none(tiny_pair, monkeypatch, device):
    """The API below the batch job: a request whose own step raises (a stop check, here) ends with
    finish_reason "error" and the others run on; a step that fails once (a streamed sweep, here) is rerun row by
    row and every request comes out exactly as without the failure."""
    from offload_runtime.model import transformer

    target, draft = tiny_pair
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float64", device=device, batch_size=3,
                                    offload=True, resident_layers=1)
    expected = [r.token_ids for r in engine.generate(prompts, max_new_tokens=10, temperature=0, ignore_eos=True)]

    requests = [engine.request(p, max_new_tokens=10, temperature=0, ignore_eos=True) for p in prompts]

    def broken_check(req, new):
        raise RuntimeError("a bug in one request")
    requests[1].stop_check = broken_check
    results = dict(engine.run(requests))
    assert results[1].finish_reason == "error" and isinstance(results[1].error, RuntimeError)
    assert [results[0].token_ids, results[2].token_ids] == [expected[0], expected[2]]

    # Layers 0 and 2 stream (layer 1 is resident): fail once at layer 2 of the third target sweep, while the
    # sweep is half-way through its cycle of loads.
    real, target_calls = transformer.decoder_layer, []

    def fails_once(args, *rest):
        if args is engine.target.args:
            target_calls.append(1)
            if len(target_calls) == 9:
                raise RuntimeError("transient")
        return real(args, *rest)
    monkeypatch.setattr(transformer, "decoder_layer", fails_once)
    assert engine.target.layers.streamed == [0, 2]
    again = engine.generate(prompts, max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(target_calls) > 9 and [r.token_ids for r in again] == expected


# --- batch: the output file (items 2-6)


def test_an_output_that_is_the_input_or_not_ours_is_refused_untouched(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the cat"}])
    with open(inp, "a") as f:
        f.write('{"id": "b", "prompt": "a last line without its newline"}')
    link = tmp_path / "link.jsonl"
    os.link(inp, link)
    foreign = tmp_path / "notes.jsonl"
    foreign.write_bytes(b'{"x": 1}\n{"precious": "unterminated')
    lonely = tmp_path / "lonely.jsonl"  # one unterminated line that begins like a record but is no result
    lonely.write_bytes(b'{"id": 5, "prompt": "the cat')
    files = {p: p.read_bytes() for p in (inp, foreign, lonely)}
    for output, message in [(inp, "is the input file"), (link, "is the input file"),
                            (foreign, "notes.jsonl:1: not a result record"),
                            (lonely, "lonely.jsonl:1: the last line is not a result record")]:
        one_line_error(run_cli(BATCH, *no_model(tmp_path), "--input", inp, "--output", output), 2, message)
    assert {p: p.read_bytes() for p in files} == files


def test_two_jobs_on_one_output_one_runs_the_other_stops_at_once(tiny_pair, tmp_path):
    target, draft = tiny_pair
    n = 40
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": [5 + i % 50, 6, 7]} for i in range(n)])
    out = tmp_path / "out.jsonl"
    alias = tmp_path / "alias.jsonl"  # the second job names the same file by another path
    alias.symlink_to(out)
    common = ["--model", target, "--draft", draft, "--input", inp, "--max-new-tokens", "16", "--temperature", "0",
              "--batch-size", "1", "--device", "cpu"]
    first = subprocess.Popen([sys.executable, "-m", BATCH, *map(str, common), "--output", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLI_ENV)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or not out.read_text()):
        time.sleep(0.05)
    second = run_cli(BATCH, *common, "--output", alias, timeout=120)
    still_running = first.poll() is None
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    line = one_line_error(second, 1, f"is in use by process {first.pid}")
    assert "wait for that job to end" in line
    assert still_running, "the second job should stop while the first still runs"
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(n))  # every id exactly once


@pytest.mark.parametrize("kind", ["/dev/full", "/dev/stdout", "directory", "fifo"])
def test_an_output_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the cat"}])
    if kind == "directory":
        output = tmp_path
    elif kind == "fifo":
        output = tmp_path / "fifo"
        os.mkfifo(output)
    else:
        output = Path(kind)  # /dev/stdout is the pipe run_cli reads, once the command has ended
    proc = subprocess.run([sys.executable, "-m", BATCH, *map(str, no_model(tmp_path)), "--input", str(inp),
                           "--output", str(output)], capture_output=True, text=True, timeout=60, env=CLI_ENV,
                          preexec_fn=memory_cap)
    one_line_error(proc, 2, "give a file path")


def test_output_problems_are_reported_before_the_model_loads(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the cat"}])
    (tmp_path / "a-file").write_text("x")
    cases = [(tmp_path / "missing" / "out.jsonl", f"does not exist; create it (mkdir -p {tmp_path / 'missing'})"),
             (tmp_path / "a-file" / "out.jsonl", "a-file is a file, not a directory")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((locked / "out.jsonl", "Permission denied; give a path in a directory you can write to"))
    elif Path("/sys").is_dir():  # root writes anywhere a mode allows; sysfs refuses new files even to root
        cases.append((Path("/sys/offload-runtime-test.jsonl"), "give a path in a directory you can write to"))
    for output, message in cases:
        one_line_error(run_cli(BATCH, *no_model(tmp_path), "--input", inp, "--output", output), 2, message)


def test_a_full_disk_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the cat"}])
    real = os.fstatvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 0
    monkeypatch.setattr(os, "fstatvfs", lambda fd: Full(real(fd)))
    with pytest.raises(UsageError, match="out.jsonl is full .*free some space"):
        batch.main([*map(str, no_model(tmp_path)), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")])


def test_a_disk_that_fills_during_the_job_keeps_what_was_written(tiny_pair, tmp_path):
    target, _ = tiny_pair
    n = 6
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": [5, 6, 7 + i]} for i in range(n)])
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", BATCH, "--model", str(target), "--no-draft", "--input", str(inp), "--output",
            str(out), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]

    def small_files():  # writes past 600 bytes fail (EFBIG: Python ignores SIGXFSZ), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, env=CLI_ENV, preexec_fn=small_files)
    one_line_error(proc, 1, "records written before are kept: free disk space, then rerun the same command")
    assert 0 < out.read_bytes().count(b"\n") < n
    assert batch.main(args[3:]) == 0  # room again: the same command resumes
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(n))


def result(i: int) -> dict:
    return {"id": i, "text": f"t{i}", "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "length",
            "stats": {}}


def test_merge_reads_and_checks_every_part_before_writing(tmp_path):
    out = tmp_path / "m.jsonl"
    write_jsonl(tmp_path / "m.jsonl.rank0", [result(0), result(2)])
    part1 = write_jsonl(tmp_path / "m.jsonl.rank1", [result(1), "{not json", result(3)])
    one_line_error(run_cli(BATCH, "--output", out, "--merge"), 2,
                   "m.jsonl.rank1:2: not a result record of this tool; nothing was merged")
    assert not out.exists() or out.read_text() == ""
    # A part whose job still runs holds its lock: nothing is merged either.
    write_jsonl(part1, [result(1), result(3)])
    with open(part1, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        one_line_error(run_cli(BATCH, "--output", out, "--merge"), 1, f"is in use by process {os.getpid()}")
    assert not out.exists() or out.read_text() == ""
    # A part a killed rank left a torn record in: the rest merges, and the torn one is named.
    with open(part1, "a") as f:
        f.write('{"id": 5, "text": "cut sho')
    proc = run_cli(BATCH, "--output", out, "--merge")
    assert proc.returncode == 0, proc.stderr
    assert "m.jsonl.rank1: its last record is partial" in proc.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == [0, 1, 2, 3]


@pytest.mark.parametrize("env, message", [({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: it must be at least 1"),
                                          ({"WORLD_SIZE": "2", "RANK": "3"}, "RANK=3 with WORLD_SIZE=2"),
                                          ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number")])
def test_rank_and_world_size_are_checked(env, message, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "the cat"}])
    one_line_error(run_cli(BATCH, *no_model(tmp_path), "--input", inp, "--output", tmp_path / "o.jsonl", env=env),
                   2, message)


def test_batch_survives_sigkill_at_random_points(tiny_pair, tmp_path):
    """60 records, SIGKILL at five random points (while loading, between and inside records), each time resumed:
    every id exactly once, and every text as an uninterrupted run gives it (sampled, seeded)."""
    target, draft = tiny_pair
    rng = random.Random(15)
    rows = [{"id": f"r{i}", "prompt": [5 + i % 40, 6 + i % 7, 7]} for i in range(60)]
    for i in range(0, 60, 3):
        rows[i].update(seed=1000 + i, temperature=0.9)  # records with their own settings, the rest with the flags'
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--model", target, "--draft", draft, "--dtype", "float64", "--device", "cpu", "--input", inp,
              "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "7", "--batch-size", "4"]
    reference = tmp_path / "reference.jsonl"
    assert batch.main([*map(str, common), "--output", str(reference)]) == 0
    expected = {r["id"]: r["text"] for r in read_jsonl(reference)}
    assert len(expected) == 60

    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", BATCH, *map(str, common), "--output", str(out)]
    killed = []
    for k in sorted(rng.sample(range(55), 5)):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLI_ENV)
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline and (
                not out.exists() or out.read_bytes().count(b"\n") < k):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(out.read_bytes().count(b"\n") if out.exists() else 0)
        proc.wait()
    proc = run_cli(BATCH, *common, "--output", out)
    assert proc.returncode == 0, proc.stderr
    got = read_jsonl(out)
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == 60
    assert {r["id"]: r["text"] for r in got} == expected
    assert len(killed) >= 3, killed  # the kills really landed inside runs


# --- chat (item 8, item 12's full context window)


@pytest.fixture(scope="module")
def chat_session(strict_target):
    """One piped session: bytes that are not UTF-8, a turn that hits a bug, a reply that fills the window, a
    message the full window has no room for, then /reset and a message that is answered."""
    stdin = b"hello \xff\xfe world\nboom\nthe cat sat\nthe dog\n/reset\nthe dog\n"
    return run_cli(CHAT, "--model", strict_target, "--no-draft", "--device", "cpu", "--temperature", "0",
                   "--max-new-tokens", "40", "--max-seq-len", "16", stdin=stdin)


def answered_turns(proc) -> int:
    return len([line for line in proc.stderr.splitlines() if "tok/s" in line])


def test_chat_without_a_tokenizer_says_so_before_the_first_message(tmp_path):
    model = make_checkpoint(tmp_path / "m", "llama-mha", seed=1, num_hidden_layers=1)
    proc = run_cli(CHAT, "--model", model, "--no-draft", "--device", "cpu", stdin="")  # no message at all
    one_line_error(proc, 2, "ships no tokenizer, so it cannot chat: put the model's tokenizer files")


def test_chat_survives_input_that_is_not_utf8(chat_session):
    errors = [line for line in stderr_lines(chat_session) if line.startswith("error:")]
    assert "lone surrogate" in errors[0] and "not valid text" in errors[0]
    assert answered_turns(chat_session) == 2  # the session went on
    assert chat_session.returncode == 2  # piped input: a failed turn shows in the exit status
    assert "Traceback" not in chat_session.stderr


def test_chat_survives_an_unexpected_error_in_a_turn(chat_session):
    errors = [line for line in stderr_lines(chat_session) if line.startswith("error:")]
    assert errors[1].startswith("error: ZeroDivisionError") and "the session goes on" in errors[1]
    assert answered_turns(chat_session) == 2


def test_chat_says_when_the_reply_fills_the_context_window(chat_session):
    assert "(the 16-token context window is full; /reset starts a new conversation" in chat_session.stdout
    errors = [line for line in stderr_lines(chat_session) if line.startswith("error:")]
    assert "start a new conversation (/reset in the chat" in errors[2]


def test_chat_survives_nan_logits(nan_target):
    proc = run_cli(CHAT, "--model", nan_target, "--no-draft", "--device", "cpu", "--temperature", "0.8",
                   "--max-new-tokens", "3", stdin="the cat\nthe dog\n")
    errors = [line for line in stderr_lines(proc) if line.startswith("error:")]
    assert len(errors) == 2 and all(NAN_MESSAGE in e for e in errors), proc.stderr
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_nan_logits_are_named_greedy_or_sampled(nan_target, tiny_pair, temperature, device):
    # Greedy verification reads argmaxes only: a NaN row used to become a token without a word.
    for draft in (False, str(tiny_pair[1])):
        engine = Engine.from_pretrained(nan_target, draft=draft, dtype="float32", device=device)
        with pytest.raises(ModelOutputError, match=NAN_MESSAGE):
            engine.generate("the cat", max_new_tokens=3, temperature=temperature)


def test_a_seed_out_of_range_is_refused_before_loading(tmp_path):
    one_line_error(run_cli(CHAT, *no_model(tmp_path), "--seed", str(2**64)), 2, "seed must be a whole number")


# --- the hub (item 9)


def test_a_hub_that_never_answers_does_not_hang(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []

    def accept_and_stay_silent():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2"}
    t0 = time.time()
    try:
        proc = run_cli(CHAT, "--model", "someone/some-model", "--no-draft", "--device", "cpu", env=env, timeout=90)
    finally:
        server.close()
    assert time.time() - t0 < 60
    assert accepted, "the hub was never contacted"
    assert "someone/some-model is not in the Hugging Face cache: asking" in proc.stderr  # said before the wait
    line = one_line_error(proc, 1, "did not answer within 2 s")
    assert "huggingface-cli download someone/some-model" in line and "HF_HUB_OFFLINE=1" in line


# --- config.json and safetensors (item 10)


def safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n])


def test_config_and_header_errors_name_the_file_and_the_field(tiny_pair, tmp_path):
    target = tiny_pair[0]
    config = json.loads((target / "config.json").read_text())
    for name, value, pattern in [("list", [1, 2], "config.json holds a JSON list"),
                                 ("abc", {**config, "hidden_size": "abc"}, "hidden_size must be a whole number"),
                                 ("zero-heads", {**config, "num_attention_heads": 0}, "num_attention_heads"),
                                 ("bad-eos", {**config, "eos_token_id": "</s>"}, "eos_token_id must be a token id"),
                                 ("scaling", {**config, "rope_scaling": "linear"}, "rope_scaling must be an object")]:
        d = copy_checkpoint(target, tmp_path / name)
        (d / "config.json").write_text(json.dumps(value))
        with pytest.raises(ConfigError, match=pattern) as e:
            ModelArgs.from_file(d)
        assert str(d / "config.json") in str(e.value)
    for name, value, pattern in [("hot", {"do_sample": True, "temperature": -3}, "temperature must be a number"),
                                 ("nucleus", {"do_sample": True, "top_p": 2}, "top_p must be"),
                                 ("short", {"max_new_tokens": -1}, "max_new_tokens must be")]:
        d = copy_checkpoint(target, tmp_path / f"generation-{name}")
        (d / "generation_config.json").write_text(json.dumps(value))
        with pytest.raises(CheckpointError, match=rf"generation_config.json: {pattern}.*; fix or delete it") as e:
            Engine.from_pretrained(d, draft=False, device="cpu")
        assert str(d / "generation_config.json") in str(e.value)
    good = safetensors_header(target / "model.safetensors")
    name = next(k for k in good if k != "__metadata__")
    for label, header, pattern in [("list", [1, 2], "header that is not a JSON object"),
                                   ("no-shape", {name: {"dtype": "F32", "data_offsets": [0, 0]}}, "lacks 'shape'"),
                                   ("bad-offsets", {name: {**good[name], "data_offsets": [0]}}, "data_offsets"),
                                   ("entry", {name: 5}, "is not an object")]:
        d = copy_checkpoint(target, tmp_path / f"header-{label}")
        raw = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(CheckpointError, match=pattern) as e:
            Checkpoint(d)
        assert "model.safetensors" in str(e.value) and "re-download" in str(e.value)


def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused_before_opening_it(tiny_pair, tmp_path,
                                                                                       monkeypatch):
    d = copy_checkpoint(tiny_pair[0], tmp_path / "ckpt")
    shutil.copy(d / "model.safetensors", tmp_path / "x.safetensors")  # a readable shard, outside
    names = [k for k in safetensors_header(d / "model.safetensors") if k != "__metadata__"]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "../x.safetensors"
                                                                                for n in names}}))
    opened = []
    real = checkpoint_module.read_safetensors_header
    monkeypatch.setattr(checkpoint_module, "read_safetensors_header", lambda f: opened.append(f) or real(f))
    with pytest.raises(CheckpointError, match=r"names shard '\.\./x\.safetensors', which lies outside"):
        Checkpoint(d)
    assert opened == []


# --- plans (item 11)


def make_plan(target: Path, draft: Path, tree: list[int], **changes) -> Plan:
    fields = dict(target=ModelRef.of_checkpoint(str(target), target), draft=ModelRef.of_checkpoint(str(draft), draft),
                  device="cpu", dtype="float32", temperature=0.0, top_p=1.0, batch_size=1,
                  machine=machine_fingerprint(torch.device("cpu")), tree=tree, resident_layers=[0, 1, 2],
                  n_layers=3, offload=False, gpu_memory=None, max_seq_len=256, slots=2,
                  acceptance={"p": [0.5], "source": "test"}, figures={},
                  predicted={"tokens_per_step": 1.5, "s_per_token": 0.01, "tokens_per_s": 100.0, "step_s": 0.015,
                             "draft_s": 0.005, "verify_s": 0.005, "host_s": 0.005})
    return Plan(**{**fields, **changes})


def test_a_corrupt_plan_file_is_named_and_the_default_tree_used(tiny_pair, home, capsys):
    target, draft = tiny_pair
    (home / "plans").mkdir(parents=True)
    (home / "plans" / "broken.json").write_text('{"kind": "plan", "version": ')
    (home / "plans" / "binary.json").write_bytes(b"\xff\xfe\x00")
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", device="cpu")
    err = capsys.readouterr().err
    assert "using the default tree" in err and "skipped 2 unreadable plan file(s) of the store" in err
    assert "binary.json is not a plan file (not text)" in err and "broken.json is not a plan file (not JSON)" in err
    assert "delete it" not in err and "which may be deleted" in err  # the store's files: the user's own never
    assert engine.tree_for(engine.sampling_params(temperature=0)) == default_tree(torch.device("cpu"))
    # next to a good plan, the bad files are still named, and the good plan is used
    save_plan(make_plan(target, draft, [-1, 0, 0, 1]))
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", device="cpu")
    err = capsys.readouterr().err
    assert "using plans for greedy" in err and "skipped 2 unreadable plan file(s) of the store" in err
    assert list(engine.tree_for(engine.sampling_params(temperature=0)).parents) == [-1, 0, 0, 1]


def test_a_home_that_cannot_be_written_is_one_line(tmp_path):
    from offload_runtime.api.home import write_json

    blocker = tmp_path / "home"
    blocker.write_text("a file, not a directory")
    with pytest.raises(StoreError, match=r"cannot write .*home/plans/p.json \(.*\); point OFFLOAD_RUNTIME_HOME at a "
                                         r"directory you can write"):
        write_json(blocker / "plans" / "p.json", {"kind": "plan"})
    assert blocker.read_text() == "a file, not a directory"


def test_a_plan_whose_fields_have_the_wrong_kind_is_refused(tiny_pair, home, capsys):
    target, draft = tiny_pair
    for label, changes in [("machine", {"machine": ["not", "a", "dict"]}), ("temperature", {"temperature": "0.5"}),
                           ("created", {"created": 5}), ("gpu_memory", {"gpu_memory": "lots"})]:
        path = home / f"{label}.json"
        data = make_plan(target, draft, [-1, 0]).to_dict()
        data.update(changes)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        with pytest.raises(PlanError, match=f"is not a valid plan \\({label} is"):  # plan=PATH: one line
            Engine.from_pretrained(target, draft=str(draft), dtype="float32", device="cpu", plan=path)
        (home / "plans").mkdir(exist_ok=True)
        shutil.copy(path, home / "plans" / path.name)  # in the store: named, skipped, the chat goes on
        Engine.from_pretrained(target, draft=str(draft), dtype="float32", device="cpu").generate(
            "the cat", max_new_tokens=2, temperature=0)
        assert f"{label}.json is not a valid plan" in capsys.readouterr().err
        (home / "plans" / path.name).unlink()


def test_a_plan_tree_larger_than_the_context_window_is_not_used(tiny_pair, home, capsys):
    target, draft = tiny_pair
    chain = [-1] + list(range(39))  # 40 nodes
    save_plan(make_plan(target, draft, chain))
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32", device="cpu", max_seq_len=32)
    err = capsys.readouterr().err
    assert "40-node tree does not fit the 32-token context window, so greedy requests use the default tree" in err
    assert engine.tree_for(engine.sampling_params(temperature=0)) == default_tree(torch.device("cpu"))


# --- small ones (item 12)


def test_api_inputs_get_usage_errors(tiny_pair):
    target, _ = tiny_pair
    engine = Engine.from_pretrained(target, draft=False, dtype="float32", device="cpu")
    for call, pattern in [(lambda: engine.generate("the cat", temperature=1000), "from 0 to 100"),
                          (lambda: engine.generate({"a": 1}), "prompts must be a string"),
                          (lambda: engine.generate([1.7]), "got float 1.7"),
                          (lambda: engine.generate("the \udcff cat"), "lone surrogate"),
                          (lambda: engine.generate("the cat", seed=2**64), "seed must be"),
                          (lambda: engine.generate("the cat", stop=[1]), "stop must be"),
                          (lambda: engine.generate("the cat", stop=5), "stop must be"),
                          (lambda: engine.generate("the cat", ignore_eos="yes"), "ignore_eos must be true or false"),
                          (lambda: engine.chat([]), "non-empty list"),
                          (lambda: Engine.from_pretrained(target, draft=True), "draft must be a model name"),
                          (lambda: Engine.from_pretrained(target, draft=False, max_chunk=0), "max_chunk must be")]:
        with pytest.raises(UsageError, match=pattern):
            call()


def test_one_engine_decodes_one_call_at_a_time_and_says_so(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), device="cpu", dtype="float32")
    ask = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    expected = engine.generate("the cat", **ask)[0].text
    stream = engine.stream("the cat", **ask)
    first = next(stream)
    busy = "this engine is already decoding another call"
    with pytest.raises(UsageError, match=busy):
        engine.generate("the dog", **ask)
    with pytest.raises(UsageError, match=busy):
        next(engine.stream("the dog", **ask))
    assert first + "".join(stream) == expected  # the suspended stream lost nothing
    # Threads sharing one engine: each call is decoded whole, or refused in one line; never cut short.
    outcomes: list[str] = []

    def call() -> None:
        try:
            outcomes.append(engine.generate("the cat", **ask)[0].text)
        except UsageError as e:
            outcomes.append("busy" if busy in str(e) else str(e))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 4 and set(outcomes) <= {expected, "busy"} and expected in outcomes


def test_a_tree_the_context_cannot_hold_is_refused_at_load(tiny_pair):
    target, draft = tiny_pair
    for options in ({"tree": [-1] + [0] * 31}, {"tree": "static", "tree_size": 40},
                    {"tree": "dynamic", "tree_size": 32}):
        with pytest.raises(UsageError, match=r"a tree of (32|40) nodes does not fit the 32-token context with a prompt "
                                             r"beside it; pass a smaller tree"):
            Engine.from_pretrained(target, draft=draft, device="cpu", max_seq_len=32, **options)
    engine = Engine.from_pretrained(target, draft=draft, device="cpu", max_seq_len=32, tree=[-1] + [0] * 30)
    assert len(engine.tree_for(engine.sampling_params())) == 31


def test_options_that_would_be_ignored_are_refused_or_noted(tiny_pair, tmp_path, capsys):
    target = tiny_pair[0]
    with pytest.raises(UsageError, match=r"cache_quantized \(--cache-quantized\) .* needs quantize"):
        Engine.from_pretrained(target, draft=False, device="cpu", cache_quantized=True)
    for given in ({"host_memory": "20MiB"}, {"offload_dir": tmp_path / "s"}):
        with pytest.raises(UsageError, match=r"offload=False \(--no-offload\) streams none; drop one or the other"):
            Engine.from_pretrained(target, draft=False, device="cpu", offload=False, **given)
    capsys.readouterr()
    Engine.from_pretrained(target, draft=False, device="cpu", offload_dir=tmp_path / "s")
    assert f"note: --offload-dir {tmp_path / 's'} is not used: the whole model is held in memory" in \
        capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_host_memory_variable_is_named(tiny_pair, monkeypatch):
    monkeypatch.setenv("OFFLOAD_RUNTIME_MAX_HOST_MEMORY", "abc")
    with pytest.raises(UsageError, match="OFFLOAD_RUNTIME_MAX_HOST_MEMORY='abc': cannot read memory size"):
        Engine.from_pretrained(tiny_pair[0], draft=False, device="cpu")


def test_a_batch_whose_kv_caches_exceed_ram_is_refused_before_loading(tiny_pair, monkeypatch):
    monkeypatch.setenv("OFFLOAD_RUNTIME_MAX_HOST_MEMORY", "1GiB")
    args = ModelArgs.from_file(tiny_pair[0])
    rows = (1 << 30) // (args.kv_bytes_per_token(torch.float32) * 65) + 1  # just over 1 GiB at 64 positions
    with pytest.raises(ResourceError, match=r"loading .* with its KV caches \(1.0 GiB\) needs .* of host RAM "
                                            r"but only 1.0 GiB is available; lower the batch size"):
        Engine.from_pretrained(tiny_pair[0], draft=False, device="cpu", dtype="float32", batch_size=rows,
                               max_seq_len=64)


def test_one_ram_check_counts_the_weights_the_caches_and_the_draft_together(tiny_pair, monkeypatch):
    """Each part fits the RAM on its own; together they do not, and the load says so before allocating."""
    target, draft = tiny_pair
    ta, da = ModelArgs.from_file(target), ModelArgs.from_file(draft)
    weights = ta.n_layers * layer_bytes(ta, torch.float32) + ta.global_numel() * 4
    per_row = (ta.kv_bytes_per_token(torch.float32) + da.kv_bytes_per_token(torch.float32)) * 65
    rows = weights // per_row + 1  # the caches alone are about the target's weights
    monkeypatch.setenv("OFFLOAD_RUNTIME_MAX_HOST_MEMORY", str(int(weights * 1.5)))
    with pytest.raises(ResourceError, match=r"with its KV caches .* draft .* needs"):
        Engine.from_pretrained(target, draft=draft, device="cpu", dtype="float32", batch_size=rows, max_seq_len=64)
    monkeypatch.setenv("OFFLOAD_RUNTIME_MAX_HOST_MEMORY", str(int(weights * 4) + 2 ** 24))
    Engine.from_pretrained(target, draft=draft, device="cpu", dtype="float32", batch_size=rows, max_seq_len=64)


def test_gpu_memory_zero_on_the_cpu_does_not_speak_of_a_gpu(tiny_pair):
    with pytest.raises(ResourceError) as e:
        Engine.from_pretrained(tiny_pair[0], draft=False, device="cpu", gpu_memory="0")
    assert "GPU memory" not in str(e.value) and "on the CPU leave --gpu-memory out" in str(e.value)


def test_planner_show_without_a_plan_does_not_promise_the_default_tree(tiny_pair, tmp_path):
    target, draft = tiny_pair
    proc = run_cli("planner", "show", "--model", target, "--draft", draft, "--device", "cpu",
                   env={"OFFLOAD_RUNTIME_HOME": str(tmp_path)})
    line = one_line_error(proc, 2, "no plan for this machine and model pair")
    assert "default tree" not in line and "python -m planner plan" in line
