#!/usr/bin/env python3
"""Load benchmark of the OpenAI-compatible server: python tools/bench_serve.py [--small] [--no-write]

For each model a server runs as a child process (`python -m offload_runtime.serve`, batch 16, on the CPU):
the demo pair with its target resident, and the harness's random pair of the bench-100m shape (float32; draft =
the target's first 2 layers, noised; a word tokenizer covering its vocabulary is added so the server can
speak text) whose target streams every layer through the slots each sweep (--offload: 0 resident layers on the
CPU). Against each, 1, 4 and 16 clients (asyncio, the official openai client, one connection each) send
--requests streamed chat requests back to back, greedy, with ignore_eos so every request yields exactly
--tokens tokens. Per level:

  total tokens/s       every completed request's tokens / the level's wall time (and the ratio to 1 client)
  per-client tokens/s  median over clients of its tokens / its own wall time
  TTFT p50 / p99       from sending a request to its first content chunk
  sweeps/token         target sweeps the server ran during the level (its /health count) / tokens generated
  completed / errors / lost   every request ends in one of the first two; "lost" (a stream that ended without
                       a finish reason, or a request that never returned) must stay 0

Unless --no-write, the table is appended to BENCHMARKS.md with the machine and the command. Ratios are the
figures to quote; absolute CPU times are noise. --small runs the harness's tiny random pair at 1 and 4 clients
(the test suite runs it).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import harness as h
import report
from report import Column, Table, sig, times

from offload_runtime.cli import ArgumentParser
from offload_runtime.model.config import ModelArgs
from offload_runtime.serve.launch import ServerProcess, launched

QUESTIONS = ["Who made the heaven and the earth?", "Tell me of the ark.", "What did Moses say unto the people?",
             "Where is the river?", "Sing of the harvest.", "Who was the king of Israel?"]


# --- models


@dataclass(frozen=True)
class ServedModel:
    label: str
    about: str
    flags: list[str]  # the server's model flags


def add_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer for every id of a random model's vocabulary (w3 .. wN) with a plain chat template;
    a random checkpoint has none, and the server reads prompts and writes replies as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        return
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, ModelArgs.from_file(path).vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def served(pair: h.Pair, about: str, *extra: str) -> ServedModel:
    for path in (pair.target, pair.draft):
        add_word_tokenizer(path)
    return ServedModel(pair.label, about, ["--model", str(pair.target), "--draft", str(pair.draft), *extra])


def served_models(small: bool, workdir: Path) -> list[ServedModel]:
    if small:
        return [served(h.small_pair(workdir), "tiny random Llama (--small), streamed", "--offload")]
    random = h.random_pair(workdir, ModelArgs.from_name("bench-100m"), "bench-100m", "")
    return [ServedModel("demo", "the bundled demo pair, target resident", ["--model", "demo"]),
            served(random, "random Llama of ModelArgs preset bench-100m (float32), streamed through 2 slots, every "
                           "layer copied each sweep; draft = its first 2 layers, noised", "--offload")]


# --- one level of load


@dataclass
class Outcome:
    tokens: int = 0
    ttft_s: float | None = None
    wall_s: float = 0.0
    finished: bool = False  # a finish reason and the usage arrived
    error: str | None = None


@dataclass
class Level:
    model: str
    clients: int
    per_client: list[list[Outcome]]
    wall_s: float
    sweeps: int  # the server's sweeps during the level

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for c in self.per_client for o in c]

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def completed(self) -> int:
        return sum(o.finished for o in self.outcomes)

    @property
    def errors(self) -> int:
        return sum(o.error is not None for o in self.outcomes)

    @property
    def lost(self) -> int:
        return self.sent - self.completed - self.errors

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outcomes if o.finished)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def per_client_tokens_per_s(self) -> float:
        return statistics.median(sum(o.tokens for o in c) / sum(o.wall_s for o in c) for c in self.per_client)

    def ttft(self, q: int) -> float:
        """The q-th percentile of the time to first token (inclusive method: p100 is the slowest)."""
        xs = sorted(o.ttft_s for o in self.outcomes if o.ttft_s is not None)
        if len(xs) < 2:
            return xs[0] if xs else float("nan")
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]

    @property
    def sweeps_per_token(self) -> float:
        return self.sweeps / self.tokens if self.tokens else float("nan")


async def one_request(client, messages: list[dict[str, str]], tokens: int) -> Outcome:
    out = Outcome()
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model="served", messages=messages, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        finish = None
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].delta.content and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
        out.finished = finish is not None and out.tokens > 0
    except Exception as e:  # noqa: BLE001 - every failure is counted and shown, none stops the level
        out.error = f"{type(e).__name__}: {e}"
    out.wall_s = time.perf_counter() - t0
    return out


async def load(url: str, clients: int, requests: int, tokens: int) -> tuple[list[list[Outcome]], float]:
    import openai

    async def client_loop(i: int) -> list[Outcome]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800) as c:
            return [await one_request(c, [{"role": "user", "content": QUESTIONS[(i + r) % len(QUESTIONS)]}], tokens)
                    for r in range(requests)]

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return list(per_client), time.perf_counter() - t0


def run_level(server: ServerProcess, label: str, clients: int, requests: int, tokens: int) -> Level:
    before = server.health()
    per_client, wall = asyncio.run(load(server.url, clients, requests, tokens))
    return Level(label, clients, per_client, wall, server.health()["sweeps"] - before["sweeps"])


def bench_model(model: ServedModel, levels: Sequence[int], requests: int, tokens: int, threads: int,
                workdir: Path, log: h.Log) -> list[Level]:
    flags = [*model.flags, "--served-model-name", "served", "--device", "cpu", "--plan", "none",
             "--batch-size", str(max(levels)), "--max-queue", str(max(levels)), "--max-seq-len", "512"]
    log(f"[{model.label}] python -m offload_runtime.serve {shlex.join(flags)}")
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with launched(flags, workdir / f"serve-{model.label}.log", env=env, timeout=600) as server:
        run_level(server, model.label, 1, 1, min(tokens, 8))  # warm-up
        out = []
        for c in levels:
            out.append(run_level(server, model.label, c, requests, tokens))
            log(f"[{model.label}] {c} client(s): {out[-1].tokens_per_s:.1f} tokens/s, "
                f"{out[-1].sweeps_per_token:.3f} sweeps/token")
    return out


# --- the table


def level_table(levels: Sequence[Level], models: Sequence[ServedModel], requests: int, tokens: int,
                batch: int) -> Table:
    rows = []
    for lv in levels:
        base = min((x for x in levels if x.model == lv.model), key=lambda x: x.clients)
        rows.append({"model": lv.model, "clients": lv.clients, "outcome": f"{lv.completed}/{lv.errors}/{lv.lost}",
                     "completed": lv.completed, "errors": lv.errors, "lost": lv.lost, "tokens": lv.tokens,
                     "tokens_per_s": lv.tokens_per_s, "vs_1": lv.tokens_per_s / base.tokens_per_s,
                     "per_client": lv.per_client_tokens_per_s, "ttft_p50": lv.ttft(50), "ttft_p99": lv.ttft(99),
                     "sweeps_per_token": lv.sweeps_per_token})
    errors = sorted({o.error for lv in levels for o in lv.outcomes if o.error})
    return Table(
        "Server load: concurrent streaming clients",
        [Column("model", "model", left=True), Column("clients", "clients"),
         Column("outcome", "completed/errors/lost"), Column("tokens_per_s", "total tokens/s", sig),
         Column("vs_1", "vs 1 client", times), Column("per_client", "per-client tokens/s", sig),
         Column("ttft_p50", "TTFT p50 s", sig), Column("ttft_p99", "TTFT p99 s", sig),
         Column("sweeps_per_token", "sweeps/token", ".3f")],
        rows,
        [f"each client sends {requests} streamed chat request(s) back to back, greedy, {tokens} tokens each "
         f"(ignore_eos); server batch {batch}, queue {batch}, float32, default tree",
         *(f"{m.label}: {m.about}" for m in models),
         "a sweep is one target forward over every running row's tree: on the CPU its compute grows with the rows, "
         "so per-client tokens/s falls as clients join; offloaded on a GPU a sweep costs about one copy of the "
         "weights whatever the rows, and sweeps/token is the figure that carries over",
         *(f"error: {e}" for e in errors)])


@dataclass
class Report:
    levels: list[Level]
    table: Table
    machine: str
    command: str


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python tools/bench_serve.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the tiny random pair at 1 and 4 clients (the tests)")
    p.add_argument("--clients", type=h.csv(int), default=None, help="client counts (default 1,4,16; --small: 1,4)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default 2; --small: 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per request (default 32; --small: 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    p.add_argument("--workdir", type=h.work_dir, default=None,
                   help="keep the built random checkpoints here (reused next time); default: a temporary directory")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--output", type=h.output_file, default=h.BENCHMARKS_MD, help="the Markdown file to append to")
    a = p.parse_args(argv)
    h.check_positive(p, a, ("requests", "tokens", "threads"))
    if a.clients is not None and (not a.clients or min(a.clients) < 1):
        p.error("--clients must be whole numbers >= 1")
    return a


def run(argv: Sequence[str]) -> Report:
    a = parse_args(argv)
    levels = a.clients or ([1, 4] if a.small else [1, 4, 16])
    requests, tokens = a.requests or (1 if a.small else 2), a.tokens or (8 if a.small else 32)
    log = h.Log()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = a.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        log("building models")
        models = served_models(a.small, workdir)
        results = [lv for m in models for lv in bench_model(m, levels, requests, tokens, a.threads, workdir, log)]
    machine = (f"{h.machine_description(a.threads)}; load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} "
               f"(start -> end; the machine is shared)")
    return Report(results, level_table(results, models, requests, tokens, max(levels)), machine,
                  shlex.join(["python", "tools/bench_serve.py", *argv]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = run(argv)
    print(report.to_text(out.table), end="\n\n")
    print(f"machine: {out.machine}\ncommand: {out.command}")
    a = parse_args(argv)
    if not a.no_write:
        report.append(a.output, report.section(
            "Server load", machine=out.machine, command=f"`{out.command}`", blocks=[out.table],
            intro=["ratios (vs 1 client) are the figures to quote; absolute CPU times are noise"]))
        print(f"appended to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
