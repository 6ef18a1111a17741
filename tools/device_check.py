"""One run on a lent GPU: correctness on CUDA, copy bandwidth, sweep efficiency, verification and draft curves,
the accelerate baseline, the planner's predictions and batch throughput, all within a wall-time budget.

    python tools/device_check.py                      # on the GPU machine (default budget 450 s)
    python tools/device_check.py --small              # the same code paths, tiny shapes, on the CPU (tests)
    python tools/device_check.py --sections h2d_bandwidth,sweep_efficiency --budget-s 200

Nothing is downloaded: every model is random weights of a published shape, built on the spot.

Sections run in order of value; each is timed, and a failure is recorded (with its error) while the script
carries on. A section that would not fit the time left is skipped with a note. The JSON report goes to
$OUT/device_check.json when $OUT is set, and to --output (default ./device_check.json) when that is given or
$OUT is not set; it is rewritten after every section, so a killed run still leaves what it measured. A short
table is printed LAST on stdout (the device tool returns only the end of the output). The exit status is 0
whenever the report was written (2: asked for CUDA where there is none); each section's status says how it went:

    ok        ran; its result holds the numbers (a figure below its target is a finding, not a failure)
    failed    ran, and a check it makes did not pass (a failing GPU test, logits that should be bitwise equal)
    error     raised; `error` and `traceback` say what
    skipped   not run; `reason` says why (no CUDA, out of time, not selected, not enough host RAM)

JSON layout:
    {"kind": "device_check", "version": 1, "created", "finished", "mode": "full" | "small", "card", "device",
     "budget_s", "elapsed_s", "argv", "settings": {...shapes and grids used...},
     "sections": {NAME: {"status", "seconds", "started_at_s", "result": {...} | null, "reason", "error",
                         "traceback"}},
     "summary": {NAME: one-line headline}}
with NAME in SECTIONS below.
"""
from __future__ import annotations

import argparse
import gc
import json
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

_T_START = time.perf_counter()  # the budget counts from here: imports are part of the run
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU machine's python3 runs the repo without installing it
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from offload_runtime.config import ModelArgs  # noqa: E402
from offload_runtime.engine import Engine  # noqa: E402
from offload_runtime.errors import ResourceError, UsageError  # noqa: E402
from offload_runtime.inputs import RowChunk, build_forward  # noqa: E402
from offload_runtime.kv_cache import KVCache  # noqa: E402
from offload_runtime.loader import fixed_device_bytes, spread  # noqa: E402
from offload_runtime.memory import itemsize  # noqa: E402
from offload_runtime.model import ForwardBatch, GlobalWeights, ResidentLayers, Transformer  # noqa: E402
from offload_runtime.streaming import HostLayerStore, StreamedLayers, SweepStats, alloc_host, views  # noqa: E402
from offload_runtime.tree import Tree  # noqa: E402
from planner import hardware  # noqa: E402
from planner import optimizer as opt  # noqa: E402
from planner.tree_search import DEFAULT_ACCEPTANCE, best_first_tree, best_tree, best_trees  # noqa: E402

REPORT_VERSION = 1
SECTIONS = ("environment", "gpu_tests", "h2d_bandwidth", "sweep_efficiency", "verify_scaling", "draft_levels",
            "accelerate_baseline", "planner_predictions", "batch_throughput")
EFFICIENCY_TARGET = 0.9
PROJECTED_CARD = {"name": "24 GB PCIe-4 card (projected)", "memory_bytes": 24 * 2**30, "bandwidth_Bps": 25e9}
BUDGET_FRACTION = 0.92  # of a card's memory, as the runtime leaves headroom for the allocator and context


class SectionSkipped(Exception):
    """A section that cannot run here; the message is the reason recorded in the report."""


# --- what each mode runs


def _pow2_grid(top: int) -> tuple[int, ...]:
    return tuple(2 ** k for k in range(int(math.log2(top)) + 1))


@dataclass(frozen=True)
class Settings:
    small: bool
    dtype: torch.dtype
    seed: int
    # the sweep model: a published shape (13B), random weights, streamed
    target_name: str
    target: ModelArgs
    min_layers: int  # fewer than this fit in host RAM: the sweep sections are skipped
    ram_headroom: int  # host bytes left free for everything else
    prefix: int  # cached tokens every timed forward attends to
    sweep_configs: tuple[tuple[int, int], ...]  # (resident layers, slots K)
    sweep_tokens: tuple[int, ...]
    sweep_repeats: int
    verify_grid: tuple[int, ...]
    verify_repeats: int
    # bandwidth
    copy_bytes: int
    copy_repeats: int
    # drafts, resident
    drafts: dict[str, ModelArgs]
    draft_grids: dict[str, tuple[int, ...]]
    draft_prefix: int
    effort: hardware.Effort
    # accelerate
    hf_tokens: int
    prompt_len: int
    # planner
    plan_target_name: str
    plan_target: ModelArgs
    plan_draft_name: str  # a key of `drafts`: its measured curve is reused
    plan_grid: tuple[int, ...]
    plan_prefix: int
    plan_max_tree: int
    plan_max_depth: int
    plan_max_seq_len: int
    # batches
    batch_target_name: str
    batch_target: ModelArgs
    batch_draft_layers: int
    batch_sizes: tuple[int, ...]
    batch_new_tokens: int
    batch_tree_nodes: int
    # time: the least each section needs to start, and the gpu pytest's own limit
    need_s: dict[str, float]
    pytest_timeout_s: float
    default_budget_s: float

    def describe(self) -> dict[str, Any]:
        def shape(a: ModelArgs) -> dict[str, Any]:
            return hardware.shape_fields(a) | {"params": a.n_params()}

        return {
            "dtype": _dtype_name(self.dtype), "seed": self.seed,
            "target": {"name": self.target_name, **shape(self.target)},
            "sweep_configs": [{"resident": r, "slots": k} for r, k in self.sweep_configs],
            "sweep_tokens": list(self.sweep_tokens), "prefix": self.prefix,
            "verify_grid": list(self.verify_grid), "copy_bytes": self.copy_bytes,
            "drafts": {n: shape(a) for n, a in self.drafts.items()},
            "draft_grids": {n: list(g) for n, g in self.draft_grids.items()},
            "planner": {"target": {"name": self.plan_target_name, **shape(self.plan_target)},
                        "draft": self.plan_draft_name, "grid": list(self.plan_grid),
                        "max_tree": self.plan_max_tree, "max_depth": self.plan_max_depth},
            "batch": {"target": {"name": self.batch_target_name, **shape(self.batch_target)},
                      "draft_layers": self.batch_draft_layers, "sizes": list(self.batch_sizes),
                      "new_tokens": self.batch_new_tokens, "tree_nodes": self.batch_tree_nodes},
        }


# llama-68m (JackFram) and TinyLlama-1.1B: the small drafts Sequoia and SpecExec pair with Llama-2 targets.
LLAMA_68M = ModelArgs(dim=768, n_layers=2, n_heads=12, n_kv_heads=12, head_dim=64, intermediate_size=3072,
                      vocab_size=32000, max_position_embeddings=2048)
TINYLLAMA_1B = ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64, intermediate_size=5632,
                         vocab_size=32000, max_position_embeddings=2048)


def full_settings(dtype: torch.dtype, seed: int, max_layers: int | None) -> Settings:
    target = ModelArgs.from_name("llama-2-13b")
    if max_layers is not None:
        target = target.replace(n_layers=min(target.n_layers, max_layers))
    drafts = {"llama-68m": LLAMA_68M, "tinyllama-1.1b": TINYLLAMA_1B, "llama-2-7b": ModelArgs.from_name("llama-2-7b")}
    return Settings(
        small=False, dtype=dtype, seed=seed, target_name="llama-2-13b", target=target, min_layers=4,
        ram_headroom=8 * 2**30, prefix=64, sweep_configs=((0, 2), (0, 3), (2, 2)), sweep_tokens=(1, 128),
        sweep_repeats=3, verify_grid=_pow2_grid(2048), verify_repeats=2, copy_bytes=2 * 2**30, copy_repeats=5,
        drafts=drafts, draft_grids={"llama-68m": _pow2_grid(256), "tinyllama-1.1b": _pow2_grid(256),
                                    "llama-2-7b": _pow2_grid(512)},
        draft_prefix=hardware.DEFAULT_PREFIX, effort=hardware.Effort(min_time=0.05, max_repeats=10),
        hf_tokens=3, prompt_len=16,
        plan_target_name="llama-2-70b", plan_target=ModelArgs.from_name("llama-2-70b"), plan_draft_name="llama-2-7b",
        plan_grid=_pow2_grid(2048), plan_prefix=hardware.DEFAULT_PREFIX, plan_max_tree=1024, plan_max_depth=16,
        plan_max_seq_len=4096,
        batch_target_name="llama-2-7b shape, 8 layers", batch_target=ModelArgs.from_name("llama-2-7b").replace(n_layers=8),
        batch_draft_layers=1, batch_sizes=(1, 2, 4, 8, 16), batch_new_tokens=16, batch_tree_nodes=32,
        need_s={"environment": 0, "gpu_tests": 20, "h2d_bandwidth": 5, "sweep_efficiency": 60, "verify_scaling": 25,
                "draft_levels": 10, "accelerate_baseline": 45, "planner_predictions": 15, "batch_throughput": 25},
        pytest_timeout_s=150, default_budget_s=450,
    )


def small_settings(dtype: torch.dtype, seed: int, max_layers: int | None) -> Settings:
    tiny = ModelArgs.from_name("tiny")
    target = tiny.replace(n_layers=6 if max_layers is None else max(1, min(6, max_layers)))
    draft = tiny.replace(n_layers=1)
    return Settings(
        small=True, dtype=dtype, seed=seed, target_name="tiny", target=target, min_layers=1,
        ram_headroom=256 * 2**20, prefix=8, sweep_configs=((0, 2), (0, 3), (2, 2)), sweep_tokens=(1, 16),
        sweep_repeats=2, verify_grid=_pow2_grid(32), verify_repeats=2, copy_bytes=16 * 2**20, copy_repeats=3,
        drafts={"tiny-draft": draft}, draft_grids={"tiny-draft": _pow2_grid(8)}, draft_prefix=16,
        effort=hardware.Effort.quick(), hf_tokens=2, prompt_len=16,
        plan_target_name="tiny, 8 layers", plan_target=tiny.replace(n_layers=8), plan_draft_name="tiny-draft",
        plan_grid=_pow2_grid(16), plan_prefix=16, plan_max_tree=64, plan_max_depth=6, plan_max_seq_len=256,
        batch_target_name="tiny, 4 layers", batch_target=tiny.replace(n_layers=4), batch_draft_layers=1,
        batch_sizes=(1, 2, 4), batch_new_tokens=4, batch_tree_nodes=8,
        need_s={name: 0.5 for name in SECTIONS} | {"environment": 0},
        pytest_timeout_s=90, default_budget_s=60,
    )


# --- small pure helpers


def host_layers_that_fit(n_layers: int, layer_bytes: int, pinned_layer_bytes: int, globals_bytes: int,
                         available: int, headroom: int) -> int:
    """Decoder layers of the benchmark model that host RAM holds twice over: once packed and pinned for our
    streamer, once pageable for accelerate's copy of the same model (they are not alive together, but pinned
    blocks may stay cached), each with its own embeddings and head."""
    room = available - headroom - 2 * globals_bytes
    return max(0, min(n_layers, room // max(1, pinned_layer_bytes + layer_bytes)))


def sweep_efficiency(streamed_bytes: float, bandwidth_Bps: float, sweep_s: float) -> float:
    """(streamed bytes / measured bandwidth) / sweep time: 1.0 means the copy engine never idled."""
    assert bandwidth_Bps > 0 and sweep_s > 0
    return streamed_bytes / bandwidth_Bps / sweep_s


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts, failing tests (with the start of their message) and the first skip reason from a JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing: list[dict[str, str]] = []
    skip_reason = None
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failing.append({"test": name, "kind": tag, "message": (el.get("message") or el.text or "")[:600]})
        sk = case.find("skipped")
        if sk is not None and skip_reason is None:
            skip_reason = sk.get("message") or sk.text
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failing, "skip_reason": skip_reason}


def jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become null, tuples lists, anything else its str."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return str(obj)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3g}"


# --- device plumbing (the CUDA-only parts are kept this thin)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Give memory back between sections: device blocks, and pinned host blocks the allocator keeps cached."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # private, so optional: its absence costs RAM only
        if empty_host is not None:
            try:
                empty_host()
            except RuntimeError as e:
                _log(f"could not return cached pinned memory: {e}")


def pinned_host_stats() -> dict[str, Any] | None:
    """PyTorch's pinned allocator's own account (bytes are its power-of-two blocks), where this torch has it."""
    fn = getattr(torch.cuda, "host_memory_stats", None)
    if fn is None or not torch.cuda.is_available():
        return None
    try:
        stats = fn()
    except Exception:  # informational only: a torch without these counters must not cost the section
        return None
    keys = ("allocated_bytes.current", "active_bytes.current", "num_host_alloc", "host_alloc_time.total")
    return {k: stats.get(k) for k in keys}


def timed_copies(dst: torch.Tensor, src: torch.Tensor, repeats: int, non_blocking: bool) -> list[float]:
    """Seconds of each of `repeats` copies src -> dst after one warm-up, synchronised around each copy."""
    device = dst.device
    dst.copy_(src, non_blocking=non_blocking)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=non_blocking)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_forwards(model: Transformer, batch: ForwardBatch, cache: KVCache, repeats: int, *, warmup: int = 1,
                  back_to_back: bool = True) -> tuple[float, list[SweepStats]]:
    """Seconds per forward, and the streamer's SweepStats of the timed sweeps.

    back_to_back: the host enqueues every forward before waiting once, so the copy engine runs on from one sweep
    into the next (the steady state of decoding); otherwise each forward is synchronised on its own and the
    median is returned (what one plain decoding token costs when the host waits after every step).
    """
    device = model.device
    layers = model.layers
    streamed = isinstance(layers, StreamedLayers)
    for _ in range(warmup):
        model.forward(batch, cache)
    sync(device)
    first = len(layers.history) if streamed else 0
    if back_to_back:
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.forward(batch, cache)
        sync(device)
        seconds = (time.perf_counter() - t0) / repeats
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.forward(batch, cache)
            sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
    stats = layers.resolve_stats()[first:] if streamed else []
    return seconds, stats


def summarise_stats(stats: Sequence[SweepStats]) -> dict[str, Any]:
    if not stats:
        return {}
    return {"sweeps": len(stats), "bytes": statistics.mean(s.bytes for s in stats),
            "wall_s": statistics.mean(s.wall_s for s in stats), "wait_s": statistics.mean(s.wait_s for s in stats),
            "GBps": statistics.mean(s.gbps for s in stats), "layers": stats[0].layers}


def random_globals(args: ModelArgs, dtype: torch.dtype, seed: int) -> GlobalWeights:
    """Embeddings, final norm and head on the host from a seeded generator (accelerate's copy draws the same)."""
    g = torch.Generator().manual_seed(seed + 1)
    embed = torch.randn(args.vocab_size, args.dim, generator=g).mul_(0.02).to(dtype)
    head = embed if args.tie_word_embeddings else torch.randn(args.vocab_size, args.dim, generator=g).mul_(0.02).to(dtype)
    return GlobalWeights(embed=embed, norm=torch.ones(args.dim, dtype=dtype), lm_head=head)


def globals_to(g: GlobalWeights, device: torch.device) -> GlobalWeights:
    embed = g.embed.to(device)
    head = embed if g.lm_head is g.embed else g.lm_head.to(device)
    return GlobalWeights(embed=embed, norm=g.norm.to(device), lm_head=head)


def tree_of(n: int, p: Sequence[float] = DEFAULT_ACCEPTANCE, depth: int = 16) -> Tree:
    """The tree shape plans use for n nodes: best-first under the acceptance vector p."""
    return Tree([-1]) if n == 1 else Tree(best_first_tree(p, n, depth)[1])


class HostModel:
    """A random-weight model of a published shape: every decoder layer packed in host RAM (pinned on CUDA), globals
    on the device, one KV cache; `streamed(R, K)` wraps it as a Transformer with R resident layers and K slots."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int, max_tokens: int,
                 prefix: int):
        self.args, self.dtype, self.device, self.prefix = args, dtype, device, prefix
        t0 = time.perf_counter()
        self.store = HostLayerStore(args, dtype, list(range(args.n_layers)), pin=device.type == "cuda")
        self.store.fill_random(seed)
        self.host_fill_s = time.perf_counter() - t0
        self.host_globals = random_globals(args, dtype, seed)
        self.globals = globals_to(self.host_globals, device)
        self.cache = KVCache(args, 1, prefix + max_tokens + 1, dtype, device)
        self.build_s = time.perf_counter() - t0
        self._batches: dict[int, ForwardBatch] = {}
        self._gen = torch.Generator().manual_seed(seed + 2)

    def streamed(self, resident: int, slots: int) -> Transformer:
        ids = spread(self.args.n_layers, resident)
        sub = HostLayerStore(self.args, self.dtype, [i for i in range(self.args.n_layers) if i not in ids],
                             pin=self.store.pinned)
        sub.buffers = {i: self.store.buffers[i] for i in sub.layer_ids}  # shared, not copied
        sub.pinned = self.store.pinned
        on_device = {i: views(self.store.buffers[i].to(self.device, copy=True), self.store.layout) for i in ids}
        layers = StreamedLayers(self.args.n_layers, on_device, sub, self.device, slots)
        return Transformer(self.args, self.globals, layers, self.device)

    def batch(self, n: int) -> ForwardBatch:
        """n new tokens (a plan-shaped tree) against `prefix` cached ones, logits at every node; built once."""
        if n not in self._batches:
            tree = tree_of(n)
            tokens = torch.randint(0, self.args.vocab_size, (n,), generator=self._gen).tolist()
            row = RowChunk(self.prefix, tree, tokens, range(n), range(n))
            self._batches[n] = build_forward([row], self.cache.scratch_slot, self.args.sliding_window, self.device)
        return self._batches[n]

    def prompt_logits(self, model: Transformer, prompt: list[int]) -> torch.Tensor:
        """Next-token logits after `prompt` from position 0 (float32, host); the cache is left zeroed."""
        self.cache.kv.zero_()
        n = len(prompt)
        batch = build_forward([RowChunk(0, Tree.chain(n), prompt, range(n), [n - 1])], self.cache.scratch_slot,
                              self.args.sliding_window, self.device)
        logits = model.forward(batch, self.cache)[0, 0].float().cpu()
        self.cache.kv.zero_()
        return logits

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def source(self) -> "RandomSource":
        """The weights' host-side origin (one layer, every layer being a copy of it, and the globals), pageable."""
        return RandomSource(views(self.store.buffers[0].clone(), self.store.layout), self.host_globals)


@dataclass
class RandomSource:
    layer: dict[str, torch.Tensor]  # name -> tensor of the layer every decoder layer copies
    globals_: GlobalWeights  # on the host

    @classmethod
    def draw(cls, args: ModelArgs, dtype: torch.dtype, seed: int) -> "RandomSource":
        """What HostModel(args, dtype, ..., seed) draws, drawn again."""
        first = HostLayerStore(args, dtype, [0], pin=False)
        first.fill_random(seed)
        return cls(views(first.buffers[0], first.layout), random_globals(args, dtype, seed))


# --- the run's shared state


@dataclass
class Context:
    settings: Settings
    device: torch.device
    budget_s: float
    acceptance: dict[str, Any]
    host_ram_override: int | None
    out_paths: list[Path]
    out_dir: Path | None
    report: dict[str, Any] = field(default_factory=dict)
    # filled in by sections, read by later ones
    card: str = "unknown"
    gpu_free_at_start: int | None = None
    gpu_total: int | None = None
    compute_mode: str | None = None  # NVML's, when it answers: "exclusive process" keeps a second process off
    bandwidth: dict[str, float] = field(default_factory=dict)  # pinned_best, pinned_median (bytes/s)
    host_model: HostModel | None = None
    layer_plan: dict[str, Any] | None = None
    ours: dict[str, Any] = field(default_factory=dict)  # token_s, prompt_logits (for the accelerate comparison)
    draft_curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - _T_START

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()

    def prompt(self) -> list[int]:
        g = torch.Generator().manual_seed(self.settings.seed + 3)
        return torch.randint(0, self.settings.target.vocab_size, (self.settings.prompt_len,), generator=g).tolist()

    # --- the benchmark model's size, decided once from host RAM

    def host_ram(self) -> tuple[int, str]:
        if self.host_ram_override is not None:
            return self.host_ram_override, "--host-ram-gib"
        return int(psutil.virtual_memory().available), "psutil available"

    def plan_layers(self) -> dict[str, Any]:
        if self.layer_plan is None:
            s = self.settings
            args, dtype = s.target, s.dtype
            store_probe = HostLayerStore(args, dtype, [], pin=False)  # layout only; allocates nothing
            layer_bytes = store_probe.layer_bytes
            pinned = layer_bytes  # the streamer pins exactly (cudaHostRegister), no power-of-two rounding
            globals_bytes = args.global_numel() * itemsize(dtype)
            available, source = self.host_ram()
            fit = host_layers_that_fit(args.n_layers, layer_bytes, pinned, globals_bytes, available, s.ram_headroom)
            n = min(args.n_layers, fit)
            note = None
            if n < args.n_layers:
                note = (f"host RAM ({available / 2**30:.1f} GiB by {source}) holds {n} of {args.n_layers} layers twice "
                        f"(pinned {pinned / 2**20:.0f} MiB + pageable {layer_bytes / 2**20:.0f} MiB each, "
                        f"{s.ram_headroom / 2**30:.1f} GiB kept free): both models use {n} layers")
            self.layer_plan = {"n_layers": n, "wanted_layers": args.n_layers, "layer_bytes": layer_bytes,
                               "pinned_layer_bytes": pinned, "globals_bytes": globals_bytes,
                               "host_ram_available": available, "host_ram_source": source,
                               "headroom": s.ram_headroom, "reduced": n < args.n_layers, "note": note}
        return self.layer_plan

    def target_args(self) -> ModelArgs:
        plan = self.plan_layers()
        if plan["n_layers"] < self.settings.min_layers:
            raise SectionSkipped(f"not enough host RAM for the benchmark model: {plan['n_layers']} layers fit "
                                 f"({plan['host_ram_available'] / 2**30:.1f} GiB by {plan['host_ram_source']}); "
                                 f"pass --host-ram-gib if that figure is wrong")
        return self.settings.target.replace(n_layers=plan["n_layers"])

    def get_host_model(self) -> HostModel:
        if self.host_model is None:
            s = self.settings
            self.host_model = HostModel(self.target_args(), s.dtype, self.device, s.seed,
                                        max(max(s.verify_grid), max(s.sweep_tokens), s.prompt_len), s.prefix)
        return self.host_model

    def drop_host_model(self, keep_source: bool = False) -> RandomSource | None:
        source = self.host_model.source() if keep_source and self.host_model is not None else None
        self.host_model = None
        release(self.device)
        return source

    def bandwidth_for(self, key: str) -> tuple[float, str]:
        """A measured pinned bandwidth from h2d_bandwidth, or a quick one measured now if that section did not run."""
        if key in self.bandwidth:
            return self.bandwidth[key], f"h2d_bandwidth {key}"
        quick = hardware.Effort(min_time=0.02, max_repeats=5, copy_bytes=min(self.settings.copy_bytes, 512 * 2**20))
        bw = hardware.measure_bandwidth(self.device, quick)
        self.bandwidth.setdefault("pinned_best", bw)
        self.bandwidth.setdefault("pinned_median", bw)
        return bw, "measured here (h2d_bandwidth did not run)"


# --- sections


def section_environment(ctx: Context) -> dict[str, Any]:
    dev = ctx.device
    res: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "device": str(dev), "threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count()}
    for pkg in ("transformers", "accelerate", "pynvml", "nvidia-ml-py"):
        res[f"version_{pkg}"] = _package_version(pkg)
    vm = psutil.virtual_memory()
    res["host_ram_total"], res["host_ram_available"] = int(vm.total), int(vm.available)
    res["host_ram_override"] = ctx.host_ram_override
    if ctx.cuda:
        props = torch.cuda.get_device_properties(dev)
        ctx.card = props.name
        free, total = torch.cuda.mem_get_info(dev)
        ctx.gpu_free_at_start, ctx.gpu_total = int(free), int(total)
        res.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, gpu_memory_total=int(total), gpu_memory_free=int(free),
                   cudnn=torch.backends.cudnn.version())
        ctx.compute_mode = res["compute_mode"] = _compute_mode(dev)
    try:
        fp = hardware.machine_fingerprint(dev)
    except Exception as e:  # NVML trouble must not cost the card's name: torch gave it above
        fp = {"gpu_name": res.get("gpu_name"), "cpu_model": platform.processor(), "error": f"{type(e).__name__}: {e}"}
    res["fingerprint"] = fp
    res["machine"] = hardware.describe_machine(fp) if "error" not in fp else fp["error"]
    if ctx.cuda:
        ctx.card = fp.get("gpu_name") or ctx.card
        res["pcie"] = {k: fp.get(k) for k in ("pcie_gen", "pcie_width", "pcie_max_gen", "pcie_max_width")}
        res["gpu_driver"] = fp.get("gpu_driver")
    else:
        ctx.card = f"cpu ({fp.get('cpu_model')})"
    res["card"] = ctx.card
    return res


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _compute_mode(dev: torch.device) -> str | None:
    """The GPU's compute mode through NVML (None without it); the GPU tests run in a second process."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            mode = pynvml.nvmlDeviceGetComputeMode(pynvml.nvmlDeviceGetHandleByIndex(index))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        return f"unknown ({e})"
    names = {0: "default", 1: "exclusive thread", 2: "prohibited", 3: "exclusive process"}
    return names.get(int(mode), str(mode))


def section_gpu_tests(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    later = sum(s.need_s[n] for n in SECTIONS[SECTIONS.index("gpu_tests") + 1:])
    timeout = min(s.pytest_timeout_s, ctx.time_left() - min(later, 0.5 * ctx.time_left()))
    if timeout < min(10.0, s.pytest_timeout_s):
        raise SectionSkipped(f"out of time budget ({ctx.time_left():.0f} s left) for the GPU tests")
    if ctx.compute_mode == "exclusive process":
        raise SectionSkipped("the GPU is in exclusive-process compute mode and this process holds it, so the GPU "
                             "tests (a second process) cannot start; run `python -m pytest -m gpu tests/test_gpu.py`")
    if importlib.util.find_spec("pytest") is None:
        raise SectionSkipped(f"pytest is not installed for {sys.executable}; `pip install pytest` to run the GPU tests")
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        timed_out = False
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            timed_out, rc = True, None
            output = _text(e.stdout) + _text(e.stderr)
        wall = time.perf_counter() - t0
        if ctx.out_dir is not None:
            (ctx.out_dir / "gpu_tests.log").write_text(output)
        res: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": rc, "timeout_s": round(timeout, 1),
                               "timed_out": timed_out, "wall_s": wall, "output_tail": output[-3000:]}
        if timed_out:
            raise RuntimeError(f"the GPU tests ran past their {timeout:.0f} s limit; output ends: {output[-400:]!r}")
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report (exit {rc}); output ends: {output[-600:]!r}")
        res.update(parse_junit(junit))
    if res["tests"] == 0:
        raise RuntimeError(f"pytest collected no GPU tests (exit {rc}); output ends: {output[-600:]!r}")
    res["all_skipped"] = res["skipped"] == res["tests"]
    if res["failures"] or res["errors"]:
        res["_status"] = "failed"
    return res


def _text(x: bytes | str | None) -> str:
    if x is None:
        return ""
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def section_h2d_bandwidth(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.settings, ctx.device
    n = s.copy_bytes
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    src, pinned = alloc_host(n, torch.uint8, pin=ctx.cuda)
    src.fill_(1)
    pinned_t = timed_copies(dst, src, s.copy_repeats, non_blocking=True)
    layer_bytes = HostLayerStore(s.target, s.dtype, [], pin=False).layer_bytes
    layer_t = None
    if layer_bytes <= n:  # a slice of the pinned block is pinned memory too
        layer_t = timed_copies(dst[:layer_bytes], src[:layer_bytes], s.copy_repeats, non_blocking=True)
    del src
    pageable = torch.empty(n, dtype=torch.uint8)
    pageable.fill_(1)  # fault the pages in before timing
    pageable_t = timed_copies(dst, pageable, max(2, s.copy_repeats // 2), non_blocking=False)
    del pageable, dst
    gbps = [n / t for t in pinned_t]
    res = {"bytes": n, "pinned": pinned, "kind": "host-to-device" if ctx.cuda else "memcpy (no GPU)",
           "pinned_Bps": gbps, "pinned_best_Bps": max(gbps), "pinned_median_Bps": statistics.median(gbps),
           "pageable_Bps": [n / t for t in pageable_t],
           "pageable_best_Bps": max(n / t for t in pageable_t),
           "layer_copy": None if layer_t is None else {
               "bytes": layer_bytes, "median_Bps": statistics.median(layer_bytes / t for t in layer_t),
               "best_Bps": max(layer_bytes / t for t in layer_t)}}
    if not pinned and ctx.cuda:
        res["note"] = "pinned host memory was refused: the 'pinned' figures are pageable copies"
    ctx.bandwidth["pinned_best"] = res["pinned_best_Bps"]
    ctx.bandwidth["pinned_median"] = res["pinned_median_Bps"]
    return res


def section_sweep_efficiency(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.settings, ctx.device
    plan = ctx.plan_layers()
    rss0 = psutil.Process().memory_info().rss
    host = ctx.get_host_model()
    res: dict[str, Any] = {"model": s.target_name, "n_layers": host.args.n_layers, "layer_plan": plan,
                           "dtype": _dtype_name(s.dtype), "pinned": host.store.pinned, "host_fill_s": host.host_fill_s,
                           "build_s": host.build_s, "store_bytes": host.nbytes,
                           "rss_growth_bytes": psutil.Process().memory_info().rss - rss0,
                           "pinned_allocator": pinned_host_stats() if ctx.cuda else None}
    bw, bw_source = ctx.bandwidth_for("pinned_best")
    res["bandwidth_Bps"], res["bandwidth_source"] = bw, bw_source
    rows: list[dict[str, Any]] = []
    reference = None
    bitwise = True
    notes = []
    for resident, slots in s.sweep_configs:
        if rows and ctx.time_left() < 3 * rows[-1]["sweep_s"] * (s.sweep_repeats + 1) * len(s.sweep_tokens) + 5:
            notes.append(f"out of time: stopped before resident={resident}, K={slots}")
            break
        model = host.streamed(resident, slots)
        layers: StreamedLayers = model.layers  # type: ignore[assignment]
        for n in s.sweep_tokens:
            batch = host.batch(n)
            sweep_s, stats = time_forwards(model, batch, host.cache, s.sweep_repeats)
            st = summarise_stats(stats)
            moved = st.get("bytes", layers.bytes_per_sweep)
            row = {"resident": resident, "slots": slots, "tokens": n, "streamed_layers": len(layers.streamed),
                   "streamed_bytes": moved, "sweep_s": sweep_s,
                   "efficiency": sweep_efficiency(moved, bw, sweep_s) if moved else None,
                   "effective_Bps": moved / sweep_s, "engine_stats": st}
            row["meets_target"] = row["efficiency"] is not None and row["efficiency"] >= EFFICIENCY_TARGET
            rows.append(row)
        # One plain decoding token as the engine pays it: the host waits after every forward.
        token_s, _ = time_forwards(model, host.batch(1), host.cache, s.sweep_repeats, back_to_back=False)
        rows[-len(s.sweep_tokens)]["synced_token_s"] = token_s
        logits = model.forward(host.batch(1), host.cache)[0, 0].float().cpu()
        if reference is None:
            reference = logits
            ctx.ours["token_s"] = token_s
            ctx.ours["config"] = {"resident": resident, "slots": slots}
            ctx.ours["prompt_logits"] = host.prompt_logits(model, ctx.prompt())
        else:
            bitwise = bitwise and torch.equal(logits.view(torch.int32), reference.view(torch.int32))  # NaN-proof
        del model, layers
        release(dev)
    effs = [r["efficiency"] for r in rows if r["efficiency"] is not None]
    res.update(rows=rows, notes=notes, target=EFFICIENCY_TARGET,
               best_efficiency=max(effs) if effs else None, worst_efficiency=min(effs) if effs else None,
               meets_target=bool(effs) and max(effs) >= EFFICIENCY_TARGET,
               bitwise_equal_across_configs=bitwise, logits_finite=bool(torch.isfinite(reference).all())
               if reference is not None else None)
    if not bitwise:
        res["_status"] = "failed"
    return res


def section_verify_scaling(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    host = ctx.get_host_model()
    model = host.streamed(0, 2)
    points: list[dict[str, Any]] = []
    notes = []
    for n in s.verify_grid:
        if points:
            guess = points[-1]["seconds"] * (s.verify_repeats + 1) * 1.5 + 2
            if ctx.time_left() < guess:
                notes.append(f"out of time: stopped before n = {n}")
                break
        seconds, stats = time_forwards(model, host.batch(n), host.cache, s.verify_repeats)
        points.append({"n": n, "seconds": seconds, "engine_stats": summarise_stats(stats)})
    del model
    t1 = points[0]["seconds"]
    for p in points:
        p["ratio"] = p["seconds"] / t1
    return {"model": s.target_name, "n_layers": host.args.n_layers, "resident": 0, "slots": 2, "prefix": s.prefix,
            "tree": "best-first under DEFAULT_ACCEPTANCE, depth <= 16", "points": points,
            "grid": [p["n"] for p in points], "ratios": [p["ratio"] for p in points], "notes": notes}


def section_draft_levels(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    out: dict[str, Any] = {"drafts": {}, "notes": [], "prefix": s.draft_prefix}
    # The planner's draft first: the planner section needs its curve.
    order = [s.plan_draft_name] + [n for n in s.drafts if n != s.plan_draft_name]
    for name in order:
        if out["drafts"] and ctx.time_left() < (0.5 if s.small else 10):
            out["notes"].append(f"out of time: {name} not timed")
            continue
        args, grid = s.drafts[name], list(s.draft_grids[name])
        t0 = time.perf_counter()
        secs = hardware.draft_level_curve(args, s.dtype, ctx.device, grid, prefix=s.draft_prefix, effort=s.effort,
                                          seed=s.seed)
        ctx.draft_curves[name] = (grid, secs)
        out["drafts"][name] = {"params": args.n_params(), "grid": grid, "seconds": secs,
                               "ms_per_level": {str(w): t * 1e3 for w, t in zip(grid, secs)},
                               "wall_s": time.perf_counter() - t0}
        release(ctx.device)
    return out


def build_hf_llama(args: ModelArgs, source: RandomSource):
    """transformers' LlamaForCausalLM with exactly the weights of a HostModel, pageable in host RAM.

    Built on the meta device and filled tensor by tensor, so neither a float32 copy nor a random init is ever made.
    """
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    assert args.rope_scaling is None and args.model_type == "llama", "plain Llama shapes only"
    # rope_theta is spelled differently across transformers versions; only pass it when it is not the default.
    rope = {} if args.rope_theta == 10000.0 else {"rope_theta": args.rope_theta}
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                         max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.rms_norm_eps,
                         tie_word_embeddings=args.tie_word_embeddings, **rope)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    layer, g = source.layer, source.globals_
    tops = {"model.embed_tokens.weight": g.embed, "model.norm.weight": g.norm, "lm_head.weight": g.lm_head}
    for name, param in list(model.named_parameters()):
        if name.startswith("model.layers."):
            rest = name.split(".", 3)[3]
            value = layer[rest].clone()  # every layer its own memory, as a loaded checkpoint has
        else:
            value = tops[name]
        assert value.shape == param.shape, (name, value.shape, param.shape)
        owner, leaf = name.rsplit(".", 1)
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval()


def section_accelerate_baseline(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.settings, ctx.device
    try:
        from accelerate import cpu_offload
    except ImportError as e:
        raise SectionSkipped(f"accelerate is not installed here ({e})") from None
    args = ctx.target_args()
    t0 = time.perf_counter()
    # Our pinned store goes before accelerate's pageable copy comes; its random draw is reused, not redrawn.
    source = ctx.drop_host_model(keep_source=True) or RandomSource.draw(args, s.dtype, s.seed)
    model = build_hf_llama(args, source)
    del source
    build_s = time.perf_counter() - t0
    cpu_offload(model, execution_device=dev)
    prompt = torch.tensor([ctx.prompt()], device=dev)
    res: dict[str, Any] = {"model": s.target_name, "n_layers": args.n_layers, "dtype": _dtype_name(s.dtype),
                           "how": "accelerate.cpu_offload(model, execution_device): weights in pageable host RAM, "
                                  "copied module by module before each forward",
                           "build_s": build_s, "notes": []}
    times: list[float] = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer transformers rename past_key_values
        sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        sync(dev)
        res["prefill_s"] = time.perf_counter() - t0
        logits = out.logits[0, -1].float().cpu()
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(s.hf_tokens + 1):  # the first decoded token is a warm-up
            last = times[-1] if times else res["prefill_s"]
            if i >= 2 and ctx.time_left() < 1.3 * last + 2:
                res["notes"].append(f"out of time after {len(times)} timed tokens")
                break
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            sync(dev)
            dt = time.perf_counter() - t0
            if i == 0:
                res["warmup_token_s"] = dt
            else:
                times.append(dt)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    del out, past, model
    release(dev)
    res["token_s"] = times
    res["s_per_token"] = statistics.median(times) if times else res.get("warmup_token_s")
    ours = ctx.ours.get("token_s")
    res["ours_s_per_token"] = ours
    res["ours_config"] = ctx.ours.get("config")
    res["ours_note"] = ("ours: one synchronised 1-token forward of the same model streamed through the runtime "
                        "(sweep_efficiency, first config), i.e. plain decoding without a draft")
    res["speedup"] = res["s_per_token"] / ours if ours and res["s_per_token"] else None
    mine = ctx.ours.get("prompt_logits")
    if mine is not None:
        diff = (logits - mine).abs()
        res["logits_vs_ours"] = {"max_abs_diff": float(diff.max()), "scale": float(mine.abs().max()),
                                 "argmax_equal": int(logits.argmax()) == int(mine.argmax())}
    return res


def section_planner_predictions(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.settings, ctx.device
    T, dtype, grid = s.plan_target, s.dtype, list(s.plan_grid)
    D = s.drafts[s.plan_draft_name]
    t0 = time.perf_counter()
    layer_s = hardware.layer_time_curve(T, dtype, dev, grid, prefix=s.plan_prefix, effort=s.effort, seed=s.seed)
    release(dev)
    head_s = hardware.head_time_curve(T, dtype, dev, grid, effort=s.effort, seed=s.seed)
    release(dev)
    host_s = hardware.host_time_curve(T, dev, grid, prefix=s.plan_prefix, effort=s.effort, seed=s.seed)
    if s.plan_draft_name in ctx.draft_curves:
        dgrid, dsecs = ctx.draft_curves[s.plan_draft_name]
        draft_source = "draft_levels section"
    else:
        dgrid = [w for w in grid if w <= max(s.draft_grids[s.plan_draft_name])]
        dsecs = hardware.draft_level_curve(D, dtype, dev, dgrid, prefix=s.draft_prefix, effort=s.effort, seed=s.seed)
        draft_source = "measured here"
        release(dev)
    curves_s = time.perf_counter() - t0
    p = ctx.acceptance["p"]
    table = best_trees(p, s.plan_max_tree, s.plan_max_depth)
    here_bw, bw_source = ctx.bandwidth_for("pinned_median")
    here_budget = _card_budget(ctx)
    cards = [{"name": f"this card ({ctx.card})", "bandwidth_Bps": here_bw, "bandwidth_source": bw_source,
              "budget_bytes": here_budget}]
    proj_budget = int(BUDGET_FRACTION * PROJECTED_CARD["memory_bytes"]) if not s.small else _small_budget(s, 1)
    cards.append({"name": PROJECTED_CARD["name"], "bandwidth_Bps": PROJECTED_CARD["bandwidth_Bps"],
                  "bandwidth_source": "assumed (PCIe 4.0 x16, pinned)", "budget_bytes": proj_budget})
    curves = {"layer": opt.Curve(tuple(grid), opt.suffix_min(layer_s)), "head": opt.Curve(tuple(grid), opt.suffix_min(head_s)),
              "host": opt.Curve(tuple(grid), opt.suffix_min(host_s)),
              "draft_level": opt.Curve(tuple(dgrid), opt.suffix_min(dsecs))}
    for card in cards:
        try:
            card.update(_predict(s, curves, p, table, card["bandwidth_Bps"], card["budget_bytes"], ctx.cuda))
        except ResourceError as e:
            card["error"] = str(e)
    return {"target": s.plan_target_name, "draft": s.plan_draft_name, "dtype": _dtype_name(dtype),
            "acceptance": {"p": list(p), "source": ctx.acceptance["source"], "note": ctx.acceptance["note"]},
            "curves": {"grid": grid, "layer_s": layer_s, "head_s": head_s, "host_s": host_s,
                       "draft_grid": list(dgrid), "draft_level_s": list(dsecs), "draft_source": draft_source,
                       "measured_on": ctx.card, "wall_s": curves_s},
            "cards": cards,
            "assumptions": "every card computes like this one (the curves are this card's); cards differ in copy "
                           "bandwidth and memory only. Batch 1, the runtime's residency rule, the DP's trees."}


def _card_budget(ctx: Context) -> int:
    s = ctx.settings
    if s.small or not ctx.cuda:
        return _small_budget(s, 3)
    free = ctx.gpu_free_at_start or torch.cuda.mem_get_info(ctx.device)[0]
    return int(BUDGET_FRACTION * free)


def _small_budget(s: Settings, layers: int) -> int:
    """A budget that fits the fixed needs and `layers` decoder layers (small mode has no real card)."""
    fixed = fixed_device_bytes(s.plan_target, s.dtype, draft_args=s.drafts[s.plan_draft_name], batch=1,
                               max_seq_len=s.plan_max_seq_len, tree_size=s.plan_max_tree, max_chunk=2048, slots=2,
                               on_cuda=False)
    return sum(fixed.values()) + layers * opt.layer_bytes(s.plan_target, s.dtype)


def _predict(s: Settings, curves: dict[str, opt.Curve], p: Sequence[float], table, bandwidth: float,
             budget: int, cuda: bool) -> dict[str, Any]:
    T, D, dtype = s.plan_target, s.drafts[s.plan_draft_name], s.dtype
    notes = []
    residency = None
    for seq_len in dict.fromkeys((s.plan_max_seq_len, min(s.plan_max_seq_len, 2048))):
        try:
            residency = opt.residency(T, dtype, torch.device("cuda" if cuda else "cpu"), draft=D,
                                      budget_bytes=budget, batch=1, max_seq_len=seq_len,
                                      max_tree=s.plan_max_tree, slots=2, offload=True)
            break
        except ResourceError as e:
            notes.append(f"max_seq_len {seq_len}: {e}")
    if residency is None:
        raise ResourceError("; ".join(notes))
    tm = opt.TimeModel(layer=curves["layer"], head=curves["head"], host=curves["host"],
                       draft_level=curves["draft_level"], n_layers=T.n_layers, resident=len(residency.resident),
                       layer_bytes=opt.layer_bytes(T, dtype), bandwidth=bandwidth, overlap=cuda)
    best = opt.optimize(p, tm, max_tree=s.plan_max_tree, max_depth=s.plan_max_depth, table=table, top=5)
    plain = opt.evaluate([-1], 1.0, tm)
    b = best.best.row()
    return {"max_seq_len": seq_len, "resident_layers": len(residency.resident), "n_layers": T.n_layers,
            "stream_s": tm.stream_s, "best": b, "plain_s_per_token": plain.s_per_token,
            "s_per_token": b["s_per_token"], "tokens_per_step": b["tokens_per_step"],
            "speedup_vs_plain": plain.s_per_token / b["s_per_token"],
            "top": [c.row() for c in best.ranked], "notes": notes}


def section_batch_throughput(ctx: Context) -> dict[str, Any]:
    s, dev = ctx.settings, ctx.device
    ctx.drop_host_model()
    T = s.batch_target
    need = T.n_layers * HostLayerStore(T, s.dtype, [], pin=False).layer_bytes + s.ram_headroom
    if need > ctx.host_ram()[0]:
        raise SectionSkipped(f"not enough host RAM for the batch model ({need / 2**30:.1f} GiB needed)")
    host = HostModel(T, s.dtype, dev, s.seed + 10, 1, 0)
    target = host.streamed(0, 2)
    # The draft: the target's first layers, resident, sharing its embeddings and head (a truncated copy).
    dargs = T.replace(n_layers=s.batch_draft_layers)
    dlayers = [views(host.store.buffers[i].to(dev, copy=True), host.store.layout) for i in range(dargs.n_layers)]
    draft = Transformer(dargs, host.globals, ResidentLayers(dlayers), dev)
    p = ctx.acceptance["p"]
    tree = Tree(best_tree(p, s.batch_tree_nodes, 8)[1])  # the DP: any p, sorted or not
    max_len = 8 + s.batch_new_tokens + len(tree) + 2
    g = torch.Generator().manual_seed(s.seed + 11)
    prompts = [torch.randint(0, T.vocab_size, (8,), generator=g).tolist() for _ in range(max(s.batch_sizes))]
    warm = Engine(target, draft, None, max_seq_len=max_len, batch_size=1, tree=tree, name="batch")
    warm.generate([prompts[0]], max_new_tokens=2, temperature=0, ignore_eos=True)
    del warm
    rows = []
    notes = []
    for B in s.batch_sizes:
        if rows and ctx.time_left() < 2.5 * rows[-1]["seconds"] + 2:
            notes.append(f"out of time: stopped before B = {B}")
            break
        engine = Engine(target, draft, None, max_seq_len=max_len, batch_size=B, tree=tree, name="batch")
        before = len(target.layers.history)
        sync(dev)
        t0 = time.perf_counter()
        results = engine.generate(prompts[:B], max_new_tokens=s.batch_new_tokens, temperature=0, ignore_eos=True)
        sync(dev)
        seconds = time.perf_counter() - t0
        sweeps = len(target.layers.history) - before
        tokens = sum(len(r.token_ids) for r in results)
        times = engine.decoder.times
        rows.append({"batch": B, "seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
                     "sweeps": sweeps, "sweeps_per_token": sweeps / tokens,
                     "tokens_per_step": statistics.mean(r.stats.tokens_per_step for r in results),
                     "draft_s": times.draft_s, "verify_s": times.verify_s, "other_s": times.other_s})
        del engine, results
    stats = summarise_stats(target.layers.resolve_stats())
    del target, draft, host
    release(dev)
    spt = [r["sweeps_per_token"] for r in rows]
    return {"target": s.batch_target_name, "draft_layers": s.batch_draft_layers, "tree_nodes": len(tree),
            "new_tokens_per_sequence": s.batch_new_tokens, "greedy": True, "rows": rows, "sweep_stats": stats,
            "sweeps_per_token_falls": all(b < a for a, b in zip(spt, spt[1:])), "notes": notes}


SECTION_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": section_environment, "gpu_tests": section_gpu_tests, "h2d_bandwidth": section_h2d_bandwidth,
    "sweep_efficiency": section_sweep_efficiency, "verify_scaling": section_verify_scaling,
    "draft_levels": section_draft_levels, "accelerate_baseline": section_accelerate_baseline,
    "planner_predictions": section_planner_predictions, "batch_throughput": section_batch_throughput,
}
assert tuple(SECTION_FUNCS) == SECTIONS


# --- running sections


def run_section(ctx: Context, name: str, selected: bool) -> None:
    entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "started_at_s": round(ctx.elapsed(), 2),
                             "result": None, "reason": None, "error": None, "traceback": None}
    ctx.report["sections"][name] = entry
    need = ctx.settings.need_s[name]
    if not selected:
        entry["reason"] = "not selected (--sections)"
    elif need > 0 and ctx.time_left() < need:  # need 0: always runs (the environment names the card)
        entry["reason"] = f"out of time budget ({max(0.0, ctx.time_left()):.0f} s left, needs about {need:.0f} s)"
    else:
        _log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            result = SECTION_FUNCS[name](ctx)
            entry["status"] = result.pop("_status", "ok")
            entry["result"] = result
        except SectionSkipped as e:
            entry["reason"] = str(e)
        except Exception as e:  # recorded, and the next section runs
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
        finally:
            entry["seconds"] = time.perf_counter() - t0
            try:
                release(ctx.device)
            except RuntimeError as e:  # a broken CUDA context: later sections will say so themselves
                entry.setdefault("notes", []).append(f"release failed: {e}")
        _log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s"
             + (f" ({entry['error'] or entry['reason']})" if entry["status"] != "ok" else ""))
    ctx.report["summary"][name] = headline(name, entry)
    write_report(ctx)


def write_report(ctx: Context) -> None:
    ctx.report["elapsed_s"] = ctx.elapsed()
    ctx.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ctx.report["card"] = ctx.card
    text = json.dumps(jsonable(ctx.report), indent=1) + "\n"
    for path in ctx.out_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --- the printed summary


def headline(name: str, entry: dict[str, Any]) -> str:
    if entry["status"] == "skipped":
        return f"skipped: {entry['reason']}"
    if entry["status"] == "error":
        return entry["error"] or "error"
    r = entry["result"] or {}
    try:
        return _HEADLINES[name](r)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        return f"(no headline: {type(e).__name__})"


def _h_env(r: dict) -> str:
    if r.get("torch_cuda") is None or "gpu_name" not in r:
        return f"torch {r['torch']} on the CPU, {r['threads']} threads; {r['machine']}"
    pcie = r.get("pcie") or {}
    link = (f", PCIe gen{pcie.get('pcie_gen')} x{pcie.get('pcie_width')} (max gen{pcie.get('pcie_max_gen')} "
            f"x{pcie.get('pcie_max_width')})" if pcie.get("pcie_gen") is not None else ", PCIe link unknown (no NVML)")
    return f"torch {r['torch']} CUDA {r['torch_cuda']}, driver {r.get('gpu_driver')}{link}"


def _h_tests(r: dict) -> str:
    text = f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if r.get("all_skipped"):
        text += f" ({r.get('skip_reason')})"
    if r["failing"]:
        text += "; first: " + r["failing"][0]["test"].split("::")[-1]
    return text


def _h_bw(r: dict) -> str:
    kind = "pinned" if r["pinned"] else "pageable" if r["kind"] == "host-to-device" else "memcpy"
    return (f"{kind} {_gb(r['pinned_best_Bps'])} GB/s best, {_gb(r['pinned_median_Bps'])} median "
            f"({r['bytes'] / 2**30:.2g} GiB); pageable {_gb(r['pageable_best_Bps'])} GB/s")


def _h_sweep(r: dict) -> str:
    first = [x for x in r["rows"] if (x["resident"], x["slots"]) == (r["rows"][0]["resident"], r["rows"][0]["slots"])]
    effs = ", ".join(f"{x['tokens']} tok {x['efficiency']:.2f}" for x in first)
    return (f"{r['n_layers']} layers; R={first[0]['resident']} K={first[0]['slots']}: {effs}; best "
            f"{r['best_efficiency']:.2f} (target {EFFICIENCY_TARGET}); bitwise across configs "
            f"{r['bitwise_equal_across_configs']}")


def _h_verify(r: dict) -> str:
    pts = r["points"]
    picks = [p for p in pts if p["n"] in (16, 256, 1024)] + [pts[-1]]
    seen, parts = set(), []
    for p in picks:
        if p["n"] not in seen:
            seen.add(p["n"])
            parts.append(f"n={p['n']} {p['ratio']:.2f}")
    return "T(n)/T(1): " + ", ".join(parts) + f"; T(1) {pts[0]['seconds']:.3g} s"


def _h_draft(r: dict) -> str:
    parts = []
    for name, d in r["drafts"].items():
        parts.append(f"{name} {_ms(d['seconds'][0])}..{_ms(d['seconds'][-1])} ms (w 1..{d['grid'][-1]})")
    return "; ".join(parts)


def _h_acc(r: dict) -> str:
    ours = r.get("ours_s_per_token")
    text = f"accelerate {r['s_per_token']:.3g} s/token"
    if ours:
        text += f" vs ours {ours:.3g} s/token plain ({r['speedup']:.1f}x)"
    return text + f", {r['n_layers']} layers"


def _h_plan(r: dict) -> str:
    parts = []
    for c in r["cards"]:
        label = "here" if c["name"].startswith("this card") else "24GB@25GB/s"
        if "error" in c:
            parts.append(f"{label}: does not fit")
        else:
            parts.append(f"{label} {c['s_per_token']:.3g} s/token ({c['best']['n']} nodes, "
                         f"{c['tokens_per_step']:.2f} tok/step, {c['resident_layers']} resident)")
    return f"{r['target']}: " + "; ".join(parts) + f"; p={r['acceptance']['source']}"


def _h_batch(r: dict) -> str:
    rows = r["rows"]
    tps = ", ".join(f"B{x['batch']} {x['tokens_per_s']:.3g}" for x in rows)
    return (f"tokens/s {tps}; sweeps/token {rows[0]['sweeps_per_token']:.2f} -> {rows[-1]['sweeps_per_token']:.3f}"
            f" (falls: {r['sweeps_per_token_falls']})")


_HEADLINES: dict[str, Callable[[dict], str]] = {
    "environment": _h_env, "gpu_tests": _h_tests, "h2d_bandwidth": _h_bw, "sweep_efficiency": _h_sweep,
    "verify_scaling": _h_verify, "draft_levels": _h_draft, "accelerate_baseline": _h_acc,
    "planner_predictions": _h_plan, "batch_throughput": _h_batch,
}


def detail_lines(report: dict[str, Any]) -> list[str]:
    """A few rows of numbers per section, printed before the summary table."""
    secs = report["sections"]
    lines: list[str] = []

    def ok(name: str) -> dict | None:
        e = secs.get(name) or {}
        return e.get("result") if e.get("status") in ("ok", "failed") else None

    r = ok("sweep_efficiency")
    if r:
        lines.append(f"sweeps of {r['model']} x {r['n_layers']} layers, {r['dtype']}, against "
                     f"{_gb(r['bandwidth_Bps'])} GB/s ({r['bandwidth_source']}):")
        lines.append("   R  K  tokens  sweep ms  GB/s  efficiency  copy wait ms")
        for x in r["rows"]:
            st = x["engine_stats"]
            lines.append(f"  {x['resident']:2d} {x['slots']:2d} {x['tokens']:7d} {_ms(x['sweep_s']):>9} "
                         f"{_gb(x['effective_Bps']):>5} {x['efficiency'] or 0:11.3f} {_ms(st.get('wait_s')):>13}")
    r = ok("verify_scaling")
    if r:
        lines.append("T_verify(n)/T(1): " + " ".join(f"{p['n']}:{p['ratio']:.2f}" for p in r["points"]))
    r = ok("draft_levels")
    if r:
        for name, d in r["drafts"].items():
            lines.append(f"draft {name} ms/level: " + " ".join(f"{w}:{_ms(t)}" for w, t in zip(d["grid"], d["seconds"])))
    r = ok("planner_predictions")
    if r:
        lines.append(f"planner {r['target']} + {r['draft']} ({r['dtype']}), acceptance {r['acceptance']['source']}: "
                     f"p = [{', '.join(f'{x:.3g}' for x in r['acceptance']['p'][:6])}, ...]")
        for c in r["cards"]:
            if "error" in c:
                lines.append(f"  {c['name']}: {c['error'][:160]}")
                continue
            b = c["best"]
            lines.append(f"  {c['name']}: {_gb(c['bandwidth_Bps'])} GB/s, {c['resident_layers']}/{c['n_layers']} "
                         f"resident: tree {b['n']} nodes depth {b['depth']}, {b['tokens_per_step']:.2f} tokens/step, "
                         f"step {b['step_s']:.3g} s -> {c['s_per_token']:.3g} s/token (plain "
                         f"{c['plain_s_per_token']:.3g}, x{c['speedup_vs_plain']:.1f})")
    r = ok("batch_throughput")
    if r:
        lines.append("batch  B  tokens/s  sweeps/token  tokens/step")
        for x in r["rows"]:
            lines.append(f"      {x['batch']:3d} {x['tokens_per_s']:9.3g} {x['sweeps_per_token']:13.3f} "
                         f"{x['tokens_per_step']:12.2f}")
    r = ok("gpu_tests")
    if r:
        for f in r["failing"][:5]:
            lines.append(f"FAILED {f['test']}: {f['message'][:200]}")
    return lines


def summary_table(report: dict[str, Any]) -> str:
    head = (f"device_check {report['mode']} | {report['card']} | {report['created']} | "
            f"{report['elapsed_s']:.0f} s of {report['budget_s']:.0f} s")
    width = max(len(n) for n in SECTIONS)
    rows = [head, f"{'section':<{width}}  {'status':<7}  {'time':>6}  result"]
    for name in SECTIONS:
        e = report["sections"].get(name, {})
        rows.append(f"{name:<{width}}  {e.get('status', '-'):<7}  {e.get('seconds', 0):5.1f}s  "
                    f"{report['summary'].get(name, '')[:220]}")
    return "\n".join(rows)


# --- command line


def acceptance_from(spec: str | None) -> dict[str, Any]:
    from planner.acceptance import parse_vector, read_acceptance

    if spec is None or spec == "default":
        return {"p": list(DEFAULT_ACCEPTANCE), "source": "default",
                "note": "an assumption shaped like Sequoia's Llama-2 measurements (planner.tree_search)"}
    if Path(spec).is_file():
        result = read_acceptance(spec)
        return {"p": list(result.p), "source": f"file {spec}",
                "note": f"measured: {result.steps} steps, width {result.width}, temperature {result.temperature}"}
    return {"p": parse_vector(spec), "source": "given", "note": "--acceptance on the command line"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; cpu with --small)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget in seconds (default 450; 60 small)")
    p.add_argument("--output", default=None, help="JSON report path (default ./device_check.json; $OUT/ as well)")
    p.add_argument("--sections", default=None, help=f"comma list of sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--acceptance", default=None,
                   help="acceptance vector for the planner: 0.7,0.1,..., a planner acceptance file, or 'default'")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="weights dtype (default float16)")
    p.add_argument("--host-ram-gib", type=float, default=None,
                   help="host RAM this run may use, in GiB (default: psutil's available memory)")
    p.add_argument("--max-layers", type=int, default=None, help="cap the 13B-shape model's decoder layers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --small)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.sections is not None:
        chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
        unknown = [x for x in chosen if x not in SECTIONS]
        if unknown:
            p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        args.sections = set(chosen)
    try:
        args.acceptance = acceptance_from(args.acceptance)
    except UsageError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    settings = (small_settings if args.small else full_settings)(dtype, args.seed, args.max_layers)
    device = torch.device(args.device or ("cpu" if args.small else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: run with --small (tiny shapes on the CPU) or on a GPU machine",
              file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.small:
        print("the full-size checks need a CUDA device; on the CPU run with --small", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:  # accelerate and the runtime then agree on one name
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads or args.small:
        torch.set_num_threads(args.threads or 1)
    budget = args.budget_s if args.budget_s is not None else settings.default_budget_s
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    paths = []
    if args.output is not None or out_dir is None:
        paths.append(Path(args.output or "device_check.json").resolve())
    if out_dir is not None:
        paths.append(out_dir / "device_check.json")
    ctx = Context(settings=settings, device=device, budget_s=budget, acceptance=args.acceptance,
                  host_ram_override=None if args.host_ram_gib is None else int(args.host_ram_gib * 2**30),
                  out_paths=paths, out_dir=out_dir)
    ctx.card = "cpu" if device.type == "cpu" else "unknown"
    ctx.report = {"kind": "device_check", "version": REPORT_VERSION,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None,
                  "mode": "small" if args.small else "full", "card": ctx.card, "device": str(device),
                  "budget_s": budget, "elapsed_s": None, "argv": sys.argv[1:] if argv is None else list(argv),
                  "settings": settings.describe(), "sections": {}, "summary": {}}
    for name in SECTIONS:
        run_section(ctx, name, args.sections is None or name in args.sections)
    write_report(ctx)
    sys.stderr.flush()
    print("\n".join(detail_lines(ctx.report)))
    print(f"report: {', '.join(str(p) for p in paths)}")
    print(summary_table(ctx.report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
