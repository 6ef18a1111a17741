#!/usr/bin/env python3
"""Load benchmark of the OpenAI-compatible server: python tools/bench_serve.py [--small] [--no-write]

For each model a server runs as a child process (`python -m offload_runtime.serve`, batch 16, on the CPU):
the demo pair with its target resident, and a random pair of the bench-100m shape (ModelArgs preset, float32,
draft = the target's first 2 layers, noised) whose target streams every layer through the slots each sweep
(--offload, 0 resident layers on the CPU). Against each, 1, 4 and 16 clients (asyncio, the official openai
client, one connection each) send --requests streamed chat requests back to back, greedy, with ignore_eos so
every request yields exactly --tokens tokens. Per level:

  total tokens/s       every completed request's tokens / the level's wall time (and the ratio to 1 client)
  per-client tokens/s  median over clients of its tokens / its own wall time
  TTFT p50 / p99       from sending a request to its first content chunk
  sweeps/token         target sweeps the server ran during the level (its /health count) / tokens generated
  completed / errors / lost   every request ends in one of the first two; "lost" (a stream that ended without
                       a finish reason, or a request that never returned) must stay 0

Unless --no-write, the table is appended to BENCHMARKS.md with the machine and the command. Ratios are the
figures to quote; absolute CPU times are noise. --small runs a tiny random pair at 1 and 4 clients (the test
suite runs it).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from offload_runtime.model.config import ModelArgs  # noqa: E402
from offload_runtime.serve.launch import ServerProcess, launched  # noqa: E402

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
SMALL_ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                       vocab_size=512, max_position_embeddings=512)
QUESTIONS = ["Who made the heaven and the earth?", "Tell me of the ark.", "What did Moses say unto the people?",
             "Where is the river?", "Sing of the harvest.", "Who was the king of Israel?"]


# --- models


@dataclass(frozen=True)
class ServedModel:
    label: str
    about: str
    args: list[str]  # the server's model flags


def word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering every id of a random model (w3 .. wN), with a plain chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def random_pair(root: Path, args: ModelArgs, label: str, draft_layers: int = 2, noise: float = 0.05,
                seed: int = 0) -> tuple[Path, Path]:
    """A random float32 target of `args` and a draft cut from it (its first layers, each tensor noised by
    `noise` x its std), both with a word tokenizer; reused when present."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    args = args.replace(bos_token_id=1, eos_token_ids=(2,))  # the word tokenizer's <s> and </s>
    target, draft = root / f"{label}-target", root / f"{label}-draft"
    cfg = args.to_hf_config()
    if not (target / "model.safetensors").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        model.to(torch.float32).save_pretrained(target)
        del model
        word_tokenizer(target, args.vocab_size)
    if not (draft / "model.safetensors").is_file():
        g = torch.Generator().manual_seed(seed + 1)
        kept = {n: w + noise * w.std() * torch.randn(w.shape, generator=g) if w.numel() > 1 else w
                for n, w in load_file(target / "model.safetensors").items()
                if not n.startswith("model.layers.") or int(n.split(".")[2]) < draft_layers}
        cfg = args.replace(n_layers=draft_layers).to_hf_config()
        AutoConfig.for_model(cfg.pop("model_type"), **cfg).save_pretrained(draft)
        save_file(kept, draft / "model.safetensors", metadata={"format": "pt"})
        word_tokenizer(draft, args.vocab_size)
    return target, draft


def served_models(small: bool, workdir: Path) -> list[ServedModel]:
    if small:
        target, draft = random_pair(workdir, SMALL_ARGS, "small")
        return [ServedModel("small", "tiny random Llama (--small), streamed", [
            "--model", str(target), "--draft", str(draft), "--offload"])]
    target, draft = random_pair(workdir, ModelArgs.from_name("bench-100m"), "bench-100m")
    return [ServedModel("demo", "the bundled demo pair, target resident", ["--model", "demo"]),
            ServedModel("bench-100m", "random bench-100m-shaped target (float32) streamed through 2 slots, "
                                      "every layer copied each sweep; draft = its first 2 layers, noised",
                        ["--model", str(target), "--draft", str(draft), "--offload"])]


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
    sent: int
    outcomes: list[Outcome]
    per_client: list[list[Outcome]]
    wall_s: float
    sweeps: int
    notes: list[str] = field(default_factory=list)

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
        return xs[0] if len(xs) == 1 else statistics.quantiles(xs, n=100, method="inclusive")[q - 1]

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


async def load_level(url: str, clients: int, requests: int, tokens: int) -> tuple[list[list[Outcome]], float]:
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
    per_client, wall = asyncio.run(load_level(server.url, clients, requests, tokens))
    after = server.health()
    outcomes = [o for c in per_client for o in c]
    level = Level(label, clients, clients * requests, outcomes, per_client, wall, after["sweeps"] - before["sweeps"])
    level.notes = sorted({o.error for o in outcomes if o.error})
    return level


def bench_model(model: ServedModel, levels: Sequence[int], requests: int, tokens: int, threads: int,
                workdir: Path, log) -> list[Level]:
    args = [*model.args, "--served-model-name", "served", "--device", "cpu", "--plan", "none",
            "--batch-size", str(max(levels)), "--max-queue", str(max(levels)), "--max-seq-len", "512"]
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log(f"[{model.label}] starting: python -m offload_runtime.serve {shlex.join(args)}")
    with launched(args, workdir / f"serve-{model.label}.log", env=env, timeout=600) as server:
        run_level(server, model.label, 1, 1, min(tokens, 8))  # warm-up
        out = []
        for c in levels:
            log(f"[{model.label}] {c} client(s) x {requests} request(s) x {tokens} tokens")
            out.append(run_level(server, model.label, c, requests, tokens))
            log(f"[{model.label}]   {out[-1].tokens_per_s:.1f} tokens/s, {out[-1].sweeps_per_token:.3f} sweeps/token")
    return out


# --- report


def table_rows(levels: Sequence[Level]) -> list[list[str]]:
    rows = []
    for lv in levels:
        base = next(x for x in levels if x.model == lv.model and x.clients == min(
            y.clients for y in levels if y.model == lv.model))
        rows.append([lv.model, str(lv.clients), f"{lv.completed}/{lv.errors}/{lv.lost}", f"{lv.tokens_per_s:.1f}",
                     f"{lv.tokens_per_s / base.tokens_per_s:.2f}x", f"{lv.per_client_tokens_per_s:.1f}",
                     f"{lv.ttft(50):.3g}", f"{lv.ttft(99):.3g}", f"{lv.sweeps_per_token:.3f}"])
    return rows


HEADERS = ["model", "clients", "completed/errors/lost", "total tokens/s", "vs 1 client", "per-client tokens/s",
           "TTFT p50 s", "TTFT p99 s", "sweeps/token"]


def to_text(levels: Sequence[Level]) -> str:
    cells = [HEADERS] + table_rows(levels)
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADERS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def machine_line(threads: int, load: Sequence[float]) -> str:
    import transformers

    from offload_runtime.api.machine import machine_fingerprint

    fp = machine_fingerprint("cpu")
    return (f"{fp['cpu_model']}, {threads} torch thread(s) for the server of {fp['cpu_count']} logical CPUs, "
            f"{fp['ram_total_gib']} GiB RAM; load average {' -> '.join(f'{x:.1f}' for x in load)} (start -> end: "
            f"the machine is shared); torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def to_markdown(levels: Sequence[Level], models: Sequence[ServedModel], settings: str, command: str,
                machine: str) -> str:
    lines = [f"## Server load, {time.strftime('%Y-%m-%d %H:%M')}", "", f"Machine: {machine}", "",
             f"Command: `{command}`", "",
             f"- {settings}", *(f"- {m.label}: {m.about}" for m in models),
             "- ratios (vs 1 client) are the figures to quote; absolute CPU times are noise",
             "- a sweep is one target forward over every running row's tree: on the CPU its compute grows with the "
             "rows, so per-client tokens/s falls as clients join; offloaded on a GPU a sweep costs about one copy of "
             "the weights whatever the rows, and sweeps/token is the figure that carries over", "",
             "| " + " | ".join(HEADERS) + " |", "|:---|" + "---:|" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(levels)]
    errors = sorted({e for lv in levels for e in lv.notes})
    if errors:
        lines += ["", *(f"- error: {e}" for e in errors)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Level]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny random pair, 1 and 4 clients (for tests)")
    p.add_argument("--clients", default=None, help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (default 2)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per request (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--workdir", default=None, help="where the random checkpoints live (default: a temp dir)")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    a = p.parse_args(argv)
    levels = [int(x) for x in (a.clients or ("1,4" if a.small else "1,4,16")).split(",")]
    requests = a.requests or (1 if a.small else 2)
    tokens = a.tokens or (8 if a.small else 32)
    if min(levels) < 1 or requests < 1 or tokens < 1 or a.threads < 1:
        p.error("--clients, --requests, --tokens and --threads must be >= 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models = served_models(a.small, workdir)
        results = [lv for m in models for lv in bench_model(m, levels, requests, tokens, a.threads, workdir, log)]
    load.append(os.getloadavg()[0])
    print(to_text(results))
    if not a.no_write:
        settings = (f"each client sends {requests} streamed chat request(s) back to back, greedy, {tokens} tokens "
                    f"each (ignore_eos); server batch {max(levels)}, queue {max(levels)}, float32, default tree")
        command = "python tools/bench_serve.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                   if (argv if argv is not None else sys.argv[1:]) else "")
        text = to_markdown(results, models, settings, command, machine_line(a.threads, load))
        with open(BENCHMARKS_MD, "a") as f:
            f.write("\n" + text)
    return results


if __name__ == "__main__":
    main()
