"""Batch jobs: `python -m offload_runtime.batch --model M --input prompts.jsonl --output out.jsonl`.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}, optionally with max_new_tokens,
temperature, top_p, seed, stop. Output lines: id, text, token counts, finish reason and stats, written one
record at a time with flush + fsync, so a killed job loses only the records in flight; rerunning with the same
output resumes and skips the ids already there. Malformed input lines are reported with their line number and
skipped. Under torchrun each rank takes every WORLD_SIZE-th record and writes `OUTPUT.rankN`; `--merge` joins
the part files into OUTPUT.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .cli import ArgumentParser, add_model_args, add_sampling_args, load_engine, run_main
from .errors import OffloadError, UsageError

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")


@dataclass
class Record:
    line: int
    id: Any
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    sampling: dict[str, Any]


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(prog="python -m offload_runtime.batch", description="Run a JSONL file of prompts.")
    add_model_args(p, default_model="demo")
    add_sampling_args(p)
    p.add_argument("--input", help="JSONL file: one {id, prompt | messages, ...} per line")
    p.add_argument("--output", required=True, help="JSONL results (resumed when it exists)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together, sharing each sweep")
    p.add_argument("--merge", action="store_true", help="merge OUTPUT.rank* part files into OUTPUT and exit")
    return p.parse_args(argv)


# --- input


def read_records(path: Path, warn) -> Iterator[Record]:
    """Valid records in file order; each malformed line is reported (with its number) and skipped."""
    seen: set[str] = set()
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read input {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                warn(f"{path}:{n}: not valid JSON ({e.msg}); skipped")
                continue
            problem = _check_record(obj)
            if problem:
                warn(f"{path}:{n}: {problem}; skipped")
                continue
            key = json.dumps(obj["id"])
            if key in seen:
                warn(f"{path}:{n}: id {obj['id']!r} appears twice; skipped")
                continue
            seen.add(key)
            yield Record(n, obj["id"], obj.get("prompt"), obj.get("messages"),
                         {k: obj[k] for k in SAMPLING_FIELDS if k in obj})


def _check_record(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "a record must be a JSON object"
    if "id" not in obj or not isinstance(obj["id"], (str, int)):
        return "a record needs an id (string or integer)"
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        return "a record needs exactly one of prompt and messages"
    if has_prompt and not (isinstance(obj["prompt"], str) or
                           (isinstance(obj["prompt"], list) and all(isinstance(t, int) for t in obj["prompt"]))):
        return "prompt must be a string or a list of token ids"
    if has_messages and not (isinstance(obj["messages"], list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in obj["messages"])):
        return "messages must be a list of {role, content} objects"
    return None


# --- output


def done_ids(path: Path) -> set[str]:
    """Ids already written; a torn last line (a killed job) is cut off so appending starts clean."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    ids = set()
    for raw in keep.splitlines():
        try:
            ids.add(json.dumps(json.loads(raw)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


class Writer:
    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def merge(output: Path, warn) -> int:
    parts = sorted(output.parent.glob(output.name + ".rank*"))
    if not parts:
        raise UsageError(f"no part files {output.name}.rank* next to {output}")
    have = done_ids(output)
    writer = Writer(output)
    added = 0
    try:
        for part in parts:
            done_ids(part)  # cut a torn last line
            for raw in part.read_text(encoding="utf-8").splitlines():
                obj = json.loads(raw)
                key = json.dumps(obj["id"])
                if key not in have:
                    have.add(key)
                    writer.write(obj)
                    added += 1
    finally:
        writer.close()
    warn(f"merged {added} records from {len(parts)} part files into {output}")
    return added


# --- the job


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.merge:
        merge(output, warn)
        return 0
    if not args.input:
        raise UsageError("--input is required (or --merge)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if world > 1:
        output = output.with_name(f"{output.name}.rank{rank}")
        if device in (None, "cuda"):
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    records = [r for i, r in enumerate(read_records(Path(args.input), warn)) if i % world == rank]
    finished = done_ids(output)
    todo = [r for r in records if json.dumps(r.id) not in finished]
    if len(todo) < len(records):
        warn(f"resuming: {len(records) - len(todo)} of {len(records)} records already in {output}")
    if not todo:
        return 0
    engine = load_engine(args, batch_size=args.batch_size, device=device)
    cli_sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                      ("max_new_tokens", args.max_new_tokens), ("seed", args.seed)) if v is not None}
    requests, kept = [], []
    for r in todo:
        sampling = {**cli_sampling, **r.sampling}
        if "seed" in sampling and "seed" not in r.sampling:
            sampling["seed"] = int(sampling["seed"]) + r.line  # a record's seed does not depend on the others
        try:
            requests.append(engine.request(r.prompt, messages=r.messages, **sampling))
            kept.append(r)
        except OffloadError as e:
            warn(f"{args.input}:{r.line}: {e}; skipped")
        except TypeError as e:
            warn(f"{args.input}:{r.line}: bad sampling field ({e}); skipped")
    writer = Writer(output)
    bar = _progress(len(requests))
    t0, tokens = time.perf_counter(), 0
    try:
        for i, result in engine.run(requests):
            r = kept[i]
            tokens += len(result.token_ids)
            s = result.stats
            writer.write({"id": r.id, "text": result.text, "prompt_tokens": len(result.prompt_token_ids),
                          "completion_tokens": len(result.token_ids), "finish_reason": result.finish_reason,
                          "stats": {"steps": s.steps, "tokens_per_step": round(s.tokens_per_step, 3),
                                    "time_s": round(s.time_s, 3)}})
            if bar is not None:
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.1f} tok/s")
                bar.update(1)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    warn(f"wrote {len(requests)} records to {output} ({tokens} tokens, "
         f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s)")
    return 0


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="batch", file=sys.stderr)


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
