#!/usr/bin/env python3
"""The disk tier measured on this machine: python tools/bench_disk.py [--size-gb 3] [--small] [--no-write]

A random Llama of a few GB (float32 safetensors written from RandomWeights), run with a host budget
(--host-memory) that holds a quarter of its decoder layers, staging ring included; the other layers are read from
the disk store every sweep with direct I/O. Each method runs in its own process, started after dropping the page
cache (where the machine permits: root writes /proc/sys/vm/drop_caches) and inside a memory cgroup capped at the
budget plus what the method holds besides it (globals, the CPU's two slots, the draft) and a fixed allowance for
the interpreter (where cgroup v1's memory controller is writable), so the page cache cannot hold what the budget
leaves out: as on a machine whose RAM is smaller than the model. Reported:

  sweeps   disk bytes per sweep, sweep time, disk wait, the direct-I/O read bandwidth of the same store files
           measured in the same process right before and right after its timed run (same reader threads, same
           chunks; a virtual disk's speed drifts), and sweep efficiency = (disk bytes / bandwidth) / sweep time,
           with the higher of the two bandwidths (goal >= 0.85)
  speed    plain decoding vs Sequoia (static DP trees, --trees sizes) and grown trees of the same budgets (dynamic)
           tokens/s at that budget, against Accelerate's disk offload
           (transformers device_map="auto", max_memory={"cpu": budget + globals}, offload_folder) on the same
           checkpoint and budget: peak RSS and bytes read from storage per token (/proc/self/io) beside each

Unless --no-write, the tables are appended to BENCHMARKS.md under a dated heading with the machine and the command.
The GB-sized files live under --workdir (default tools/_work/bench_disk, a real filesystem: O_DIRECT needs one) and
are deleted at the end unless --keep. --small runs a tiny model in a temporary directory (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import harness as h
import report
from report import Column, Table, sig, times

import torch

from offload_runtime.cli import ArgumentParser
from offload_runtime.model.config import ModelArgs
from offload_runtime.residency import split_host_disk
from offload_runtime.weights import disk
from offload_runtime.weights.layout import layer_bytes

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
ALLOWANCE = 640 * 2 ** 20  # interpreter, torch and transformers in each measured process
METHODS = ("plain", "sequoia", "dynamic", "accelerate")
SPECULATIVE = ("sequoia", "dynamic")  # methods that run the draft: sequoia-N (static DP tree), dynamic-N (grown)


@dataclass
class Settings:
    size_gb: float
    fraction: float  # of the decoder layers' bytes the host budget holds
    tokens: int
    trees: tuple[int, ...]  # Sequoia's tree sizes
    tree_depth: int
    read_threads: int
    prefetch: int
    threads: int
    cold: bool  # drop the page cache and cap memory with a cgroup, where permitted
    damping: float  # of the layers' output projections (Damped)
    methods: tuple[str, ...]
    small: bool = False


@dataclass
class Model:
    target: Path
    draft: Path
    args: ModelArgs
    budget: int  # --host-memory
    store: Path
    offload_folder: Path


def model_args(size_gb: float, small: bool) -> ModelArgs:
    """A Llama-2-like shape (GQA, dim 2048) with as many layers as make `size_gb` of float32 decoder layers."""
    if small:
        return ModelArgs(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=256,
                         vocab_size=512, max_position_embeddings=512)
    base = dict(dim=2048, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=5632, vocab_size=32000,
                max_position_embeddings=2048)
    per_layer = layer_bytes(ModelArgs(n_layers=1, **base), torch.float32)
    return ModelArgs(n_layers=max(4, round(size_gb * 1e9 / per_layer)), **base)


class Damped:
    """Random weights whose decoder layers' output projections (o_proj, down_proj) are scaled by `factor`: each
    layer then nudges the residual stream instead of rewriting it, so a draft made of the target's first layers
    agrees with it often, as a real draft does (two random models agree on nothing)."""

    def __init__(self, inner: Any, factor: float):
        self.inner, self.args, self.label, self.factor = inner, inner.args, inner.label, factor

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.inner.read_into(name, out)
        return out.mul_(self.factor) if name.endswith(("o_proj.weight", "down_proj.weight")) else out


def write_checkpoint(path: Path, args: ModelArgs, seed: int, damping: float) -> Path:
    """Damped random weights saved as a float32 transformers checkpoint (the harness's builder), what both our
    engine and transformers read; reused when a run with --keep left the same one. A draft written with the same
    seed and fewer layers holds the target's globals and first layers."""
    from offload_runtime.weights.random import RandomWeights

    made = {"args": repr(args), "seed": seed, "damping": damping}
    marker = path / "bench_disk.json"
    if marker.is_file() and json.loads(marker.read_text()) == made:
        return path
    # One layer of random draws, copied into every layer: fast to build, and a sweep still reads every layer.
    h.save_checkpoint(path, Damped(RandomWeights(args, seed, distinct_layers=False), damping))
    marker.write_text(json.dumps(made))
    return path


def build(workdir: Path, cfg: Settings, log) -> Model:
    from offload_runtime.api.loading import layer_store
    from offload_runtime.weights.checkpoint import Checkpoint

    args = model_args(cfg.size_gb, cfg.small)
    layers_b = args.n_layers * disk.padded_bytes(layer_bytes(args, torch.float32))
    need = 3 * (layers_b + args.global_numel() * 4) + 2 ** 30
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"error: {workdir} has {free / 1e9:.1f} GB free; this run writes ~{need / 1e9:.1f} GB "
                         f"(checkpoint, layer store, Accelerate's offload folder); pass a smaller --size-gb")
    log(f"writing a random Llama ({args.n_layers} layers, {layers_b / 1e9:.2f} GB of decoder layers) to {workdir}")
    target = write_checkpoint(workdir / "target", args, seed=1, damping=cfg.damping)
    draft_args = args.replace(n_layers=2)
    draft = write_checkpoint(workdir / "draft", draft_args, seed=1, damping=cfg.damping)
    store = workdir / "store"
    log("writing the layer store")
    layer_store(target, Checkpoint(target), torch.float32, None, store, progress=False, quiet=True)
    budget = int(cfg.fraction * layers_b)
    return Model(target, draft, args, budget, store, workdir / "accelerate-offload")


# --- the machine: cold cache, memory cap


def drop_page_cache() -> str:
    """Empty the page cache (root only); how it went, in words."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped before each method's timed run (echo 3 > /proc/sys/vm/drop_caches)"
    except OSError as e:
        return f"not dropped: /proc/sys/vm/drop_caches refused ({e.strerror}); direct reads bypass it anyway"


class MemoryCap:
    """A cgroup v1 memory limit the measured processes join (page cache counts against it), where writable."""

    def __init__(self, limit: int):
        self.path: Path | None = CGROUP_ROOT / f"offload-bench-{os.getpid()}"
        self.limit = limit
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            self.status = f"capped at {limit / 2**30:.2f} GiB, page cache included (cgroup v1)"
        except OSError as e:
            self.status = f"no memory cap ({CGROUP_ROOT} not writable: {e.strerror}); page cache may help Accelerate"
            self.close()

    def close(self) -> None:
        """Remove the cgroup; the kernel may hold it a moment after its last process exited."""
        for _ in range(50):
            if self.path is None or not self.path.exists():
                break
            try:
                self.path.rmdir()
            except OSError:
                time.sleep(0.1)
        if self.path is not None and self.path.exists():
            print(f"warning: could not remove {self.path}; rmdir it by hand", file=sys.stderr)
        self.path = None


# --- one method, in its own process


def storage_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt_ids(vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (8,), generator=g).tolist()


def cold_start(spec: dict[str, Any]) -> None:
    if spec["cold"]:
        drop_page_cache()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method (in a fresh process) and return its figures."""
    if spec.get("cgroup"):
        (Path(spec["cgroup"]) / "cgroup.procs").write_text(str(os.getpid()))
    torch.set_num_threads(spec["threads"])
    ids, n = prompt_ids(spec["vocab"]), spec["tokens"]
    t_load = time.perf_counter()
    if spec["method"] == "accelerate":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["target"], device_map="auto", max_memory={"cpu": spec["accelerate_cpu"]},
            offload_folder=spec["offload_folder"], dtype=torch.float32)
        placed = list(model.hf_device_map.values())
        load_s = time.perf_counter() - t_load

        def generate(tokens: int) -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        generate(1)  # warm-up: first-call costs, not disk ones (the cache is dropped again below)
        cold_start(spec)
        read0, t0 = storage_read_bytes(), time.perf_counter()
        out = generate(n)
        wall = time.perf_counter() - t0
        return {"tokens": out[0, len(ids):].tolist(), "wall_s": wall, "load_s": load_s, "steps": n,
                "read_bytes": storage_read_bytes() - read0, "peak_rss": peak_rss(),
                "placement": {d: placed.count(d) for d in set(map(str, placed))}, "sweeps": []}
    from offload_runtime import Engine

    speculative = spec["method"].startswith(SPECULATIVE)
    grown = spec["method"].startswith("dynamic")
    trees = dict(tree="dynamic", tree_size=spec["nodes"], tree_depth=spec["depth"]) if grown else \
        dict(tree=spec["tree"] if speculative else None)
    engine = Engine.from_pretrained(spec["target"], draft=spec["draft"] if speculative else False, dtype="float32",
                                    device="cpu", offload=True, resident_layers=0, host_memory=spec["budget"],
                                    offload_dir=spec["store"], prefetch=spec["prefetch"],
                                    read_threads=spec["read_threads"], **trees, plan=None,
                                    max_seq_len=len(ids) + n + spec["nodes"] + 2, quiet=True, progress=False)
    load_s = time.perf_counter() - t_load
    engine.generate(ids, max_new_tokens=1, temperature=0, ignore_eos=True)  # warm-up, as for Accelerate
    skip = len(engine.sweep_stats())
    r = engine.residency
    files = [engine.target.layers.disk.files.path(i) for i in r.disk]

    def bandwidth() -> dict[str, Any]:
        b = disk.measure_read_bandwidth(files, spec["read_threads"])
        return {"bytes_per_s": b.bytes_per_s, "direct": b.direct}
    cold_start(spec)
    before = bandwidth()
    read0, t0 = storage_read_bytes(), time.perf_counter()
    result = engine.generate(ids, max_new_tokens=n, temperature=0, ignore_eos=True)
    wall = time.perf_counter() - t0
    read = storage_read_bytes() - read0
    return {"tokens": result[0].token_ids, "wall_s": wall, "load_s": load_s, "steps": result.stats.steps,
            "read_bytes": read, "peak_rss": peak_rss(), "bandwidth": [before, bandwidth()],
            "placement": {"host": len(r.host), "disk": len(r.disk)},
            "sweeps": [{"disk_bytes": s.disk_bytes, "wall_s": s.wall_s, "disk_wait_s": s.disk_wait_s}
                       for s in engine.sweep_stats()[skip:]]}


def device_part(method: str, model: Model) -> int:
    """What a method holds in RAM besides the host budget: the CPU's "device" (globals, two slots, the draft) for
    ours; the globals for Accelerate (its max_memory covers them)."""
    args = model.args
    globals_b = args.global_numel() * 4
    if method == "accelerate":
        return globals_b
    slots = 2 * disk.padded_bytes(layer_bytes(args, torch.float32))
    draft = ModelArgs.from_file(model.draft).n_params() * 4 if method.startswith(SPECULATIVE) else 0
    return globals_b + slots + draft


def run_method(method: str, model: Model, cfg: Settings, log) -> dict:
    tree = sequoia_tree(int(method.split("-")[1]), cfg.tree_depth) if method.startswith("sequoia") else [-1]
    nodes = int(method.split("-")[1]) if method.startswith(SPECULATIVE) else 1
    cap = MemoryCap(model.budget + device_part(method, model) + ALLOWANCE) if cfg.cold else None
    spec = {"method": method, "target": str(model.target), "draft": str(model.draft), "store": str(model.store),
            "budget": model.budget, "accelerate_cpu": model.budget + model.args.global_numel() * 4,
            "offload_folder": str(model.offload_folder), "prefetch": cfg.prefetch, "read_threads": cfg.read_threads,
            "threads": cfg.threads, "tokens": cfg.tokens, "vocab": model.args.vocab_size, "tree": tree,
            "nodes": nodes, "depth": cfg.tree_depth,
            "cgroup": str(cap.path) if cap is not None and cap.path else None, "cold": cfg.cold}
    cache = drop_page_cache() if cfg.cold else "kept (--no-cold)"
    log(f"{method}: running (page cache {cache.split(' (')[0]}; {cap.status if cap else 'no memory cap'})")
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    finally:
        if cap is not None:
            cap.close()
    if out.returncode != 0:
        raise SystemExit(f"error: the {method} run failed (exit {out.returncode}; killed by the memory cap if "
                         f"-9):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "cache": cache,
            "cap": cap.status if cap is not None else "no memory cap (--no-cold)"}


# --- the bench


@dataclass
class BenchResult:
    runs: dict[str, dict[str, Any]]
    bandwidth: dict[str, float]  # per method of ours: the higher direct-I/O bandwidth (bytes/s) around its run
    efficiency: dict[str, float]  # median over each method's sweeps after the first
    disk_bytes_per_sweep: int
    tables: list[Table]
    cache: str
    cap: str


def best_bandwidth(run: dict[str, Any]) -> float:
    return max(b["bytes_per_s"] for b in run["bandwidth"])


def sweep_efficiency(sweeps: Sequence[dict], bandwidth: float) -> float:
    """Median of (disk bytes / bandwidth) / sweep time over the sweeps after the first (whose first reads ran
    while the engine was built)."""
    later = [s for s in sweeps[1:] if s["wall_s"] > 0 and s["disk_bytes"]]
    return statistics.median(s["disk_bytes"] / bandwidth / s["wall_s"] for s in later) if later else math.nan


def sequoia_tree(size: int, depth: int) -> list[int]:
    """Sequoia's DP tree of `size` nodes and depth at most `depth` under the default acceptance vector."""
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_trees

    depth = min(depth, size - 1)
    return list(best_trees(DEFAULT_ACCEPTANCE, size, depth).tree(size, depth))


def method_names(cfg: Settings) -> list[str]:
    return [n for m in cfg.methods for n in ([f"{m}-{t}" for t in cfg.trees] if m in SPECULATIVE else [m])]


def bench(model: Model, cfg: Settings, log) -> BenchResult:
    args = model.args
    per_file = disk.padded_bytes(layer_bytes(args, torch.float32))
    host, on_disk, _ = split_host_disk(tuple(range(args.n_layers)), layer_bytes(args, torch.float32), model.budget,
                                       cfg.prefetch)
    runs = {m: run_method(m, model, cfg, log) for m in method_names(cfg)}
    cap_status = "; ".join(f"{m}: {r['cap']}" for m, r in runs.items())
    # The better of the two around each run: efficiency errs low, not high.
    bandwidth = {m: best_bandwidth(r) for m, r in runs.items() if r["sweeps"]}
    efficiency = {m: sweep_efficiency(runs[m]["sweeps"], bandwidth[m]) for m in bandwidth}
    disk_per_sweep = len(on_disk) * per_file
    return BenchResult(runs, bandwidth, efficiency, disk_per_sweep,
                       tables(model, cfg, runs, bandwidth, efficiency, disk_per_sweep, len(host), len(on_disk),
                              cap_status),
                       next(iter(runs.values()))["cache"], cap_status)


def tables(model: Model, cfg: Settings, runs: dict, bandwidth: list, efficiency: dict, disk_per_sweep: int,
           n_host: int, n_disk: int, cap_status: str) -> list[Table]:
    args = model.args
    layers_gb = args.n_layers * disk.padded_bytes(layer_bytes(args, torch.float32)) / 1e9
    sweep_rows = []
    for m, r in runs.items():
        later = r["sweeps"][1:]
        if not later:
            continue
        sweep_rows.append({"method": m, "sweeps": len(r["sweeps"]),
                           "disk_gb": statistics.median(s["disk_bytes"] for s in later) / 1e9,
                           "sweep_s": statistics.median(s["wall_s"] for s in later),
                           "disk_wait_s": statistics.median(s["disk_wait_s"] for s in later),
                           "bandwidth_gbps": bandwidth[m] / 1e9, "efficiency": efficiency[m],
                           "bandwidths": ", ".join(f"{b['bytes_per_s'] / 1e9:.2f}" for b in r["bandwidth"]),
                           "direct": all(b["direct"] for b in r["bandwidth"])})
    plain, base = runs.get("plain"), runs.get("accelerate")
    speed_rows = []
    for m, r in runs.items():
        tps = cfg.tokens / r["wall_s"]
        speed_rows.append({
            "method": m, "tokens_per_s": tps, "vs_accelerate": None if base is None else tps * base["wall_s"] / cfg.tokens,
            "tokens_per_sweep": cfg.tokens / r["steps"], "s_per_token": r["wall_s"] / cfg.tokens,
            "read_gb_per_token": r["read_bytes"] / cfg.tokens / 1e9, "peak_rss_gib": r["peak_rss"] / 2 ** 30,
            "layers": ", ".join(f"{k} {v}" for k, v in sorted(r["placement"].items())),
            "same": None if plain is None or m == "plain" else (report.CHECK if r["tokens"] == plain["tokens"]
                                                               else report.CROSS)})
    model_note = (f"random Llama: {args.n_layers} layers of dim {args.dim} (GQA {args.n_heads}/{args.n_kv_heads}, "
                  f"MLP {args.intermediate_size}, vocab {args.vocab_size}), float32: {layers_gb:.2f} GB of decoder "
                  f"layers + {args.global_numel() * 4 / 1e9:.2f} GB embeddings and head")
    budget_note = (f"--host-memory {model.budget / 2**30:.2f} GiB = {cfg.fraction:.0%} of the decoder layers: "
                   f"{cfg.prefetch} staging buffers + {n_host} host layers, {n_disk} layers read from disk every "
                   f"sweep with {cfg.read_threads} reader threads; 0 resident layers; {cfg.threads} torch threads")
    bw_note = ("bandwidth: direct-I/O reads of the same store files (the disk layers, same threads and chunks) "
               "in the method's own process right before and right after its timed run ('before, after' GB/s); "
               "efficiency uses the higher")
    return [
        Table("Disk tier: sweeps at a host budget of a quarter of the layers",
              [Column("method", "method", left=True), Column("sweeps", "sweeps"),
               Column("disk_gb", "disk GB/sweep", sig), Column("sweep_s", "sweep s", sig),
               Column("disk_wait_s", "disk wait s", sig), Column("bandwidths", "bandwidth GB/s before, after"),
               Column("efficiency", "efficiency", ".2f")],
              sweep_rows,
              [model_note, budget_note, bw_note,
               "sweep figures: medians over the sweeps after the first (its first reads ran during the load); "
               "efficiency = (disk bytes / bandwidth) / sweep time"]),
        Table("Disk tier: tokens/s at that budget, against Accelerate's disk offload",
              [Column("method", "method", left=True), Column("tokens_per_s", "tokens/s", sig),
               Column("vs_accelerate", "vs Accelerate", times), Column("tokens_per_sweep", "tokens/sweep", sig),
               Column("s_per_token", "s/token", sig), Column("read_gb_per_token", "disk GB read/token", sig),
               Column("peak_rss_gib", "peak RSS GiB", sig), Column("layers", "layers", left=True),
               Column("same", "= plain")],
              speed_rows,
              [f"{cfg.tokens} new tokens after an 8-token prompt (after a 1-token warm-up run), greedy, "
               f"end-of-sequence ignored; sequoia-N: Sequoia's DP tree of N nodes (depth <= {cfg.tree_depth}) "
               f"under the default acceptance vector; dynamic-N: trees of up to N nodes (depth <= {cfg.tree_depth}) "
               f"grown per step, keyed by the draft's own probabilities (no plan); draft = the target's first 2 layers and globals; the layers' "
               f"output projections are scaled by {cfg.damping:g} so that the random pair agrees at all (two random "
               f"models agree on nothing); tokens/sweep counts the prompt's sweep too",
               "Accelerate: transformers device_map='auto', max_memory={'cpu': budget + globals}, offload_folder "
               "(it then reads the offloaded layers from the checkpoint's safetensors through memory maps); "
               "'layers' = its device map entries",
               f"page cache: {next(iter(runs.values()))['cache']}; memory: {cap_status}",
               "disk GB read/token: bytes the process read from storage (/proc/self/io read_bytes) per new token"]),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python tools/bench_disk.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=3.0, help="decoder layers' size in GB (default 3)")
    p.add_argument("--fraction", type=float, default=0.25, help="host budget as a share of the layers (default 0.25)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per method (default 8; 2 with --small)")
    p.add_argument("--damping", type=float, default=0.0003,
                   help="scale of the layers' output projections, so the draft agrees with the target (default 0.0003)")
    p.add_argument("--trees", default="4,16", help="Sequoia's tree sizes, comma-separated (default 4,16)")
    p.add_argument("--tree-depth", type=int, default=8)
    p.add_argument("--read-threads", type=int, default=disk.DEFAULT_READ_THREADS)
    p.add_argument("--prefetch", type=int, default=disk.DEFAULT_PREFETCH)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--no-cold", action="store_true", help="neither drop the page cache nor cap memory")
    p.add_argument("--small", action="store_true", help="a tiny model in a temporary directory, 2 tokens")
    p.add_argument("--workdir", type=h.work_dir, default=None, help="where the GB-sized files go (default tools/_work)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the store afterwards")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--output", type=h.output_file, default=h.BENCHMARKS_MD, help="the Markdown file to append to")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one method's run, in its own process (a JSON spec)
    a = p.parse_args(argv)
    h.check_positive(p, a, ("tokens", "tree_depth", "read_threads", "prefetch", "threads"))
    methods = tuple(m for m in a.methods.split(",") if m)
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods takes a comma-separated list of {', '.join(METHODS)}")
    a.methods = methods
    try:
        a.trees = tuple(int(t) for t in a.trees.split(",") if t.strip())
    except ValueError:
        p.error("--trees takes comma-separated tree sizes")
    if not a.trees or min(a.trees) < 2:
        p.error("--trees takes sizes of at least 2 nodes")
    if not 0 < a.fraction < 1 or a.size_gb <= 0:
        p.error("--fraction must be between 0 and 1 and --size-gb positive")
    return a


def run(argv: Sequence[str] | None = None) -> BenchResult:
    """The whole benchmark; returns its figures (main prints and records them)."""
    a = parse_args(argv)
    log = h.Log()
    cfg = Settings(size_gb=a.size_gb, fraction=a.fraction, tokens=a.tokens or (2 if a.small else 8),
                   trees=(4,) if a.small else a.trees,
                   tree_depth=min(a.tree_depth, 4) if a.small else a.tree_depth, read_threads=a.read_threads,
                   prefetch=a.prefetch, threads=a.threads, cold=not (a.no_cold or a.small), methods=a.methods,
                   damping=a.damping,
                   small=a.small)
    workdir = Path(tempfile.mkdtemp(prefix="bench-disk-", dir=a.workdir)) if a.small else \
        (a.workdir or h.REPO / "tools" / "_work" / "bench_disk")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return bench(build(workdir, cfg, log), cfg, log)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    load_start = os.getloadavg()[0]
    result = run(argv)
    for t in result.tables:
        print(report.to_text(t), end="\n\n")
    machine = (f"{h.machine_description(a.threads)}; load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} "
               f"(start -> end; the machine is shared)")
    command = shlex.join(["python", "tools/bench_disk.py", *argv])
    print(f"machine: {machine}\ncommand: {command}")
    if not a.no_write:
        report.append(a.output, report.section("Disk tier", machine=machine, command=f"`{command}`",
                                               blocks=result.tables))
        print(f"appended to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
