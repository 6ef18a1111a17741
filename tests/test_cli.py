"""The command lines, driven as users drive them: subprocesses, piped stdin, bad input."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CLI_ENV as ENV, one_line_error, read_jsonl, run_cli as run, write_jsonl

from offload_runtime import Engine

# --- chat


def test_chat_through_piped_stdin_on_the_demo_pair():
    # No --model: the chat starts on the bundled demo pair, as README's first command does.
    proc = run("offload_runtime.chat", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu",
               stdin="In the beginning\nAnd God said\n/stats\n/reset\nIn the beginning\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    replies = [l for l in proc.stdout.splitlines() if l and not l.startswith(("(", "steps", "tokens per", "accept",
                                                                               "time per", "6 tokens"))]
    assert len(replies) == 3, proc.stdout
    assert replies[0] == replies[2]  # the first message again after /reset, greedy: the same reply
    assert all(r.strip() for r in replies)
    assert "(conversation cleared)" in proc.stdout
    assert "tokens per step histogram" in proc.stdout  # /stats
    stats_lines = [l for l in proc.stderr.splitlines() if "tok/s" in l]
    assert len(stats_lines) == 3 and "tokens/step" in stats_lines[0]


def test_second_turn_reuses_the_first_turns_kv(tiny_pair):
    target, draft = tiny_pair
    engine = Engine.from_pretrained(target, draft=str(draft), dtype="float32")
    session = engine.session()
    "".join(session.send("hello world", max_new_tokens=5, temperature=0))
    first = engine.last_stats[0]
    assert first.prefill_tokens == first.prompt_tokens - 1  # the whole prompt but the root
    conversation_so_far = len(session.request.tokens)
    "".join(session.send("the cat sat", max_new_tokens=5, temperature=0))
    second = engine.last_stats[0]
    new_tokens = second.prompt_tokens - conversation_so_far
    assert 0 < second.prefill_tokens <= new_tokens + 2  # only the new turn (and a re-tokenised edge)
    assert second.prefill_tokens < first.prefill_tokens + new_tokens


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_the_reply_and_keeps_the_session(tiny_pair, tmp_path):
    target, _ = tiny_pair
    proc = subprocess.Popen([sys.executable, "-m", "offload_runtime.chat", "--model", str(target), "--no-draft",
                             "--temperature", "0", "--max-new-tokens", "100000", "--max-seq-len", "256",
                             "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    proc.stdin.write("hello world\n")
    proc.stdin.flush()
    # Interrupt once the (long) reply is streaming: its first byte, whatever loading took on a busy machine.
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready and os.read(proc.stdout.fileno(), 1), "the reply never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    proc.stdin.write("the cat\n/quit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert len([l for l in err.splitlines() if "tok/s" in l]) == 2  # both turns answered


# --- batch


def test_batch_end_to_end_with_malformed_lines(tiny_pair, tmp_path):
    target, draft = tiny_pair
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "the cat sat on the mat"},
        "{not json",
        {"id": "b", "messages": [{"role": "user", "content": "hello world"}], "max_new_tokens": 3},
        {"prompt": "no id"},
        {"id": "c", "prompt": [5, 6, 7], "temperature": 0.7, "seed": 1},
        {"id": "d", "prompt": "the dog", "temperature": -2},
    ])
    out = tmp_path / "out.jsonl"
    proc = run("offload_runtime.batch", "--model", target, "--draft", draft, "--input", inp, "--output", out,
               "--max-new-tokens", "5", "--temperature", "0", "--batch-size", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "in.jsonl:2: not valid JSON" in proc.stderr and "in.jsonl:4: a record needs an id" in proc.stderr
    assert "in.jsonl:6:" in proc.stderr and "temperature" in proc.stderr
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"]["completion_tokens"] == 5 and rows["b"]["completion_tokens"] == 3
    assert isinstance(rows["a"]["text"], str) and rows["a"]["finish_reason"] in ("length", "eos")


def test_batch_ranks_and_merge(tiny_pair, tmp_path):
    target, _ = tiny_pair
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": [5, 6, 7 + i]} for i in range(5)])
    out = tmp_path / "out.jsonl"
    for rank in range(2):
        proc = run("offload_runtime.batch", "--model", target, "--no-draft", "--input", inp, "--output", out,
                   "--max-new-tokens", "2", "--device", "cpu", env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl.rank0")) == 3 and len(read_jsonl(tmp_path / "out.jsonl.rank1")) == 2
    proc = run("offload_runtime.batch", "--output", out, "--merge")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(5))


# --- bad input, everywhere: one line, the right exit status


def test_bad_inputs(tiny_pair, checkpoints, tmp_path):
    target, draft = tiny_pair
    chat = "offload_runtime.chat"
    one_line_error(run(chat, "--model", tmp_path / "nowhere"), 1, "not found")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in Path(target).iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(run(chat, "--model", corrupt), 1, "model.safetensors")
    other_vocab = checkpoints["llama-tied-bias-linear"]  # vocab 96 vs 128, no tokenizer
    one_line_error(run(chat, "--model", target, "--draft", other_vocab), 2, "vocab")
    one_line_error(run(chat, "--model", target, "--no-draft", "--max-seq-len", "8", stdin="the " * 20 + "\n"),
                   1, "context window")
    one_line_error(run(chat, "--model", target, "--no-draft", env={"OFFLOAD_RUNTIME_MAX_HOST_MEMORY": "1KB"}),
                   1, "host RAM")
    one_line_error(run(chat, "--model", target, "--no-draft", "--offload", "--gpu-memory", "10KB"),
                   1, "too small to stream this model on the CPU")
    one_line_error(run(chat, "--model", target, "--temperature", "-1"), 2, "temperature")
    one_line_error(run(chat, "--model", target, "--top-p", "1.5"), 2, "top_p")
    one_line_error(run(chat, "--model", target, "--device", "tpu"), 2, "device")
    one_line_error(run(chat, "--model", target, "--device", "cuda"), 2, "CUDA is not available")
    one_line_error(run(chat, "--model", target, "--gpu-memory", "lots"), 2, "memory size")
    one_line_error(run(chat, "--bogus-flag"), 2, "unrecognized arguments")
    one_line_error(run("offload_runtime.batch", "--model", target, "--input", tmp_path / "missing.jsonl",
                       "--output", tmp_path / "o.jsonl"), 2, "cannot read input")
    debug = run(chat, "--model", tmp_path / "nowhere", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
