"""One run on a lent GPU: correctness on CUDA, copy bandwidth, sweep efficiency, verification and draft curves,
the accelerate baseline, the planner's predictions and batch throughput, all within a wall-time budget.

    python tools/device_check.py                      # on the GPU machine (default budget 450 s)
    python tools/device_check.py --small              # the same code paths, tiny shapes, on the CPU (tests)
    python tools/device_check.py --sections h2d_bandwidth,sweep_efficiency --budget-s 200

Nothing is downloaded: every model is random weights of a published shape (weights/random.py), built on the
spot by the runtime's loader (weights/loader.py build_model) with the residency asked for, as a checkpoint is.

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

import time

_T_START = time.perf_counter()  # the budget counts from here: imports are part of the run

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import harness as h  # noqa: E402  (first: puts this checkout on sys.path, keeps transformers offline)
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from report import Column, Table  # noqa: E402

from offload_runtime.api.engine import Engine  # noqa: E402
from offload_runtime.api.home import write_json  # noqa: E402
from offload_runtime.api.machine import describe_machine, machine_fingerprint  # noqa: E402
from offload_runtime.cli import ArgumentParser  # noqa: E402
from offload_runtime.errors import ResourceError, UsageError  # noqa: E402
from offload_runtime.model.batch import ForwardBatch, RowChunk, build_forward  # noqa: E402
from offload_runtime.model.config import ModelArgs  # noqa: E402
from offload_runtime.model.kv_cache import KVCache  # noqa: E402
from offload_runtime.model.transformer import Transformer  # noqa: E402
from offload_runtime.model.tree import Tree  # noqa: E402
from offload_runtime.residency import Residency, fixed_device_bytes, spread  # noqa: E402
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_first_tree, best_tree  # noqa: E402
from offload_runtime.streaming import StreamedLayers, SweepStats  # noqa: E402
from offload_runtime.weights.layout import layer_bytes  # noqa: E402
from offload_runtime.weights.loader import build_model  # noqa: E402
from offload_runtime.weights.random import RandomWeights  # noqa: E402
from offload_runtime.weights.store import alloc_host  # noqa: E402
from planner import optimizer as opt  # noqa: E402
from planner import profile as prof  # noqa: E402

REPORT_VERSION = 1
SECTIONS = ("environment", "gpu_tests", "h2d_bandwidth", "sweep_efficiency", "int4_layers", "verify_scaling",
            "draft_levels", "accelerate_baseline", "planner_predictions", "batch_throughput")
EFFICIENCY_TARGET = 0.9
PROJECTED_CARD = {"name": "24 GB PCIe-4 card (projected)", "memory_bytes": 24 * 2**30, "bandwidth_Bps": 25e9}
BUDGET_FRACTION = 0.92  # of a card's memory, as the runtime leaves headroom for the allocator and context


class SectionSkipped(Exception):
    """A section that cannot run here; the message is the reason recorded in the report."""


# --- what each mode runs


def _pow2_grid(top: int) -> tuple[int, ...]:
    return tuple(2 ** k for k in range(int(math.log2(top)) + 1))


# llama-68m (JackFram) and TinyLlama-1.1B: the small drafts Sequoia and SpecExec pair with Llama-2 targets.
LLAMA_68M = ModelArgs(dim=768, n_layers=2, n_heads=12, n_kv_heads=12, head_dim=64, intermediate_size=3072,
                      vocab_size=32000, max_position_embeddings=2048)
TINYLLAMA_1B = ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64, intermediate_size=5632,
                         vocab_size=32000, max_position_embeddings=2048)
LLAMA_7B = ModelArgs.from_name("llama-2-7b")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Shapes, grids and repeats of one run: the defaults are the GPU run's, small_settings the CPU test's."""

    small: bool = False
    dtype: torch.dtype
    seed: int
    # the sweep model: a published shape (13B), random weights, streamed
    target_name: str = "llama-2-13b"
    target: ModelArgs
    min_layers: int = 4  # fewer than this fit in host RAM: the sweep sections are skipped
    ram_headroom: int = 8 * 2**30  # host bytes left free for everything else
    prefix: int = 64  # cached tokens every timed forward attends to
    sweep_configs: tuple[tuple[int, int], ...] = ((0, 2), (0, 3), (2, 2))  # (resident layers, slots K)
    sweep_tokens: tuple[int, ...] = (1, 128)
    sweep_repeats: int = 3
    verify_grid: tuple[int, ...] = _pow2_grid(2048)
    verify_repeats: int = 2
    copy_bytes: int = 2 * 2**30  # bandwidth
    copy_repeats: int = 5
    drafts: dict[str, ModelArgs] = field(default_factory=lambda: {  # resident
        "llama-68m": LLAMA_68M, "tinyllama-1.1b": TINYLLAMA_1B, "llama-2-7b": LLAMA_7B})
    draft_grids: dict[str, tuple[int, ...]] = field(default_factory=lambda: {
        "llama-68m": _pow2_grid(256), "tinyllama-1.1b": _pow2_grid(256), "llama-2-7b": _pow2_grid(512)})
    draft_prefix: int = prof.DEFAULT_PREFIX
    effort: prof.Effort = prof.Effort(min_time=0.05, max_repeats=10)
    hf_tokens: int = 3  # accelerate
    prompt_len: int = 16
    plan_target_name: str = "llama-2-70b"  # planner
    plan_target: ModelArgs = ModelArgs.from_name("llama-2-70b")
    plan_draft_name: str = "llama-2-7b"  # a key of `drafts`: its measured curve is reused
    plan_grid: tuple[int, ...] = _pow2_grid(2048)
    plan_prefix: int = prof.DEFAULT_PREFIX
    plan_max_tree: int = 1024
    plan_max_depth: int = 16
    plan_max_seq_len: int = 4096
    batch_target_name: str = "llama-2-7b shape, 8 layers"  # batches
    batch_target: ModelArgs = LLAMA_7B.replace(n_layers=8)
    batch_draft_layers: int = 1
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    batch_new_tokens: int = 16
    batch_tree_nodes: int = 32
    need_s: dict[str, float] = field(default_factory=lambda: {  # the least each section needs to start
        "environment": 0, "gpu_tests": 25, "h2d_bandwidth": 5, "sweep_efficiency": 60, "int4_layers": 30,
        "verify_scaling": 25, "draft_levels": 10, "accelerate_baseline": 45, "planner_predictions": 15,
        "batch_throughput": 25})
    pytest_timeout_s: float = 180  # the gpu pytest's own limit
    default_budget_s: float = 450

    def describe(self) -> dict[str, Any]:
        """Every setting as plain JSON (shapes as ModelArgs fields)."""
        return jsonable(asdict(self))


def full_settings(dtype: torch.dtype, seed: int, max_layers: int | None) -> Settings:
    target = ModelArgs.from_name("llama-2-13b")
    return Settings(dtype=dtype, seed=seed, target=target if max_layers is None else
                    target.replace(n_layers=min(target.n_layers, max_layers)))


def small_settings(dtype: torch.dtype, seed: int, max_layers: int | None) -> Settings:
    tiny = ModelArgs.from_name("tiny")
    return Settings(
        small=True, dtype=dtype, seed=seed, target_name="tiny",
        target=tiny.replace(n_layers=6 if max_layers is None else max(1, min(6, max_layers))), min_layers=1,
        ram_headroom=256 * 2**20, prefix=8, sweep_tokens=(1, 16), sweep_repeats=2, verify_grid=_pow2_grid(32),
        copy_bytes=16 * 2**20, copy_repeats=3, drafts={"tiny-draft": tiny.replace(n_layers=1)},
        draft_grids={"tiny-draft": _pow2_grid(8)}, draft_prefix=16, effort=prof.Effort.quick(), hf_tokens=2,
        plan_target_name="tiny, 8 layers", plan_target=tiny.replace(n_layers=8), plan_draft_name="tiny-draft",
        plan_grid=_pow2_grid(16), plan_prefix=16, plan_max_tree=64, plan_max_depth=6, plan_max_seq_len=256,
        batch_target_name="tiny, 4 layers", batch_target=tiny.replace(n_layers=4), batch_sizes=(1, 2, 4),
        batch_new_tokens=4, batch_tree_nodes=8, need_s={name: 0.5 for name in SECTIONS} | {"environment": 0},
        pytest_timeout_s=90, default_budget_s=60)


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
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failing: list[dict[str, str]] = []
    skips: list[str | None] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failing += [{"test": name, "kind": el.tag, "message": (el.get("message") or el.text or "")[:600]}
                    for el in case if el.tag in ("failure", "error")]
        skips += [el.get("message") or el.text for el in case.findall("skipped")]
    return {**counts, "failing": failing, "skip_reason": next((r for r in skips if r is not None), None)}


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
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:  # informational only: a torch without these counters must not cost the section
        return None
    keys = ("allocated_bytes.current", "active_bytes.current", "num_host_alloc", "host_alloc_time.total")
    return {k: stats.get(k) for k in keys}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, *, each: bool = True) -> list[float]:
    """Seconds of `repeats` calls of fn after one warm-up call: each synchronised on its own (one time per call),
    or all enqueued back to back and waited for once (one figure: the mean per call)."""
    fn()
    sync(device)
    times = []
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
        if each:
            sync(device)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    sync(device)
    return times if each else [(time.perf_counter() - t0) / repeats]


def copy_rates(dst: torch.Tensor, src: torch.Tensor, repeats: int, non_blocking: bool) -> list[float]:
    """Bytes per second of each of `repeats` copies src -> dst, synchronised around each copy."""
    return [src.nbytes / t for t in timed(lambda: dst.copy_(src, non_blocking=non_blocking), dst.device, repeats)]


def time_forwards(model: Transformer, batch: ForwardBatch, cache: KVCache, repeats: int, *,
                  back_to_back: bool = True) -> tuple[float, list[SweepStats]]:
    """Seconds per forward after one warm-up, and the streamer's SweepStats of the timed sweeps.

    back_to_back: the host enqueues every forward before waiting once, so the copy engine runs on from one sweep
    into the next (the steady state of decoding); otherwise each forward is synchronised on its own and the
    median is returned (what one plain decoding token costs when the host waits after every step).
    """
    times = timed(lambda: model.forward(batch, cache), model.device, repeats, each=not back_to_back)
    layers = model.layers  # one sweep per forward: the timed ones are the last `repeats`
    return statistics.median(times), layers.resolve_stats()[-repeats:] if isinstance(layers, StreamedLayers) else []


def summarise_stats(stats: Sequence[SweepStats]) -> dict[str, Any]:
    if not stats:
        return {}
    return {"sweeps": len(stats), "bytes": statistics.mean(s.bytes for s in stats),
            "wall_s": statistics.mean(s.wall_s for s in stats), "wait_s": statistics.mean(s.wait_s for s in stats),
            "GBps": statistics.mean(s.gbps for s in stats), "layers": stats[0].layers}


def streamed_model(weights: RandomWeights, device: torch.device, dtype: torch.dtype, resident: int,
                   slots: int) -> Transformer:
    """The model through the runtime's loader: `resident` layers spread over the model stay on the device, the
    rest are packed in the host store (pinned on CUDA) and stream through `slots` device slots."""
    return build_model(weights, device, dtype, Residency(True, spread(weights.args.n_layers, resident), slots, None))


# --- the run's shared state


@dataclass
class Context:
    """The run's shared state: arguments, the report so far, and what sections measure for later ones."""

    settings: Settings
    device: torch.device
    budget_s: float
    acceptance: dict[str, Any]
    host_ram_override: int | None
    out_paths: list[Path]
    out_dir: Path | None
    report: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)  # printed before the summary table
    card: str = "unknown"
    gpu_free_at_start: int | None = None
    compute_mode: str | None = None  # NVML's, when it answers: "exclusive process" keeps a second process off
    bandwidth: dict[str, float] = field(default_factory=dict)  # pinned_best, pinned_median (bytes/s)
    layer_plan: dict[str, Any] | None = None
    build_s: float | None = None  # seconds the loader took to build the benchmark model the first time
    cache: KVCache | None = None  # one for every build, so forwards read the same K/V
    batches: dict[int, ForwardBatch] = field(default_factory=dict)
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

    def host_ram(self) -> tuple[int, str]:
        if self.host_ram_override is not None:
            return self.host_ram_override, "--host-ram-gib"
        return int(psutil.virtual_memory().available), "psutil available"

    def plan_layers(self) -> dict[str, Any]:
        """The benchmark model's layer count, decided once from host RAM."""
        if self.layer_plan is None:
            s, args = self.settings, self.settings.target
            per_layer = layer_bytes(args, s.dtype)  # the streamer pins exactly (cudaHostRegister): no rounding
            globals_bytes = args.global_numel() * s.dtype.itemsize
            available, source = self.host_ram()
            n = host_layers_that_fit(args.n_layers, per_layer, per_layer, globals_bytes, available, s.ram_headroom)
            note = None if n == args.n_layers else (
                f"host RAM ({available / 2**30:.1f} GiB by {source}) holds {n} of {args.n_layers} layers twice "
                f"(pinned + pageable {per_layer / 2**20:.0f} MiB each, {s.ram_headroom / 2**30:.1f} GiB kept "
                f"free): both models use {n} layers")
            self.layer_plan = {"n_layers": n, "wanted_layers": args.n_layers, "layer_bytes": per_layer,
                               "pinned_layer_bytes": per_layer, "globals_bytes": globals_bytes,
                               "host_ram_available": available, "host_ram_source": source,
                               "headroom": s.ram_headroom, "reduced": n < args.n_layers, "note": note}
        return self.layer_plan

    def weights(self) -> RandomWeights:
        """The benchmark model's weights; every decoder layer a copy of layer 0, so building a 13B shape costs one
        layer of random draws."""
        plan = self.plan_layers()
        if plan["n_layers"] < self.settings.min_layers:
            raise SectionSkipped(f"not enough host RAM for the benchmark model: {plan['n_layers']} layers fit "
                                 f"({plan['host_ram_available'] / 2**30:.1f} GiB by {plan['host_ram_source']}); "
                                 f"pass --host-ram-gib if that figure is wrong")
        args = self.settings.target.replace(n_layers=plan["n_layers"])
        return RandomWeights(args, self.settings.seed, distinct_layers=False)

    def streamed(self, resident: int, slots: int) -> Transformer:
        """The benchmark model with this residency. Callers hold one at a time: host RAM fits it once."""
        release(self.device)  # the previous one's pinned blocks go first
        s, weights = self.settings, self.weights()
        if self.cache is None:
            longest = max(max(s.verify_grid), max(s.sweep_tokens), s.prompt_len)
            self.cache = KVCache(weights.args, 1, s.prefix + longest + 1, s.dtype, self.device)
        t0 = time.perf_counter()
        model = streamed_model(weights, self.device, s.dtype, resident, slots)
        self.build_s = self.build_s or time.perf_counter() - t0
        return model

    def forward_batch(self, start: int, tree: Tree, tokens: list[int], logits_at: Sequence[int]) -> ForwardBatch:
        row = RowChunk(start, tree, tokens, range(len(tokens)), logits_at)
        return build_forward([row], self.cache.scratch_slot, self.settings.target.sliding_window, self.device)

    def batch(self, n: int) -> ForwardBatch:
        """n new tokens in the tree plans use (best-first under DEFAULT_ACCEPTANCE) against `prefix` cached ones,
        logits at every node; built once."""
        if n not in self.batches:
            s = self.settings
            g = torch.Generator().manual_seed(s.seed + 2 + n)
            tokens = torch.randint(0, s.target.vocab_size, (n,), generator=g).tolist()
            tree = Tree([-1]) if n == 1 else best_first_tree(DEFAULT_ACCEPTANCE, n, 16)[1]
            self.batches[n] = self.forward_batch(s.prefix, tree, tokens, range(n))
        return self.batches[n]

    def prompt_logits(self, model: Transformer) -> torch.Tensor:
        """Next-token logits after the prompt from position 0 (float32, host); the cache is left zeroed."""
        prompt = self.prompt()
        self.cache.kv.zero_()
        batch = self.forward_batch(0, Tree.chain(len(prompt)), prompt, [len(prompt) - 1])
        logits = model.forward(batch, self.cache)[0, 0].float().cpu()
        self.cache.kv.zero_()
        return logits

    def bandwidth_for(self, key: str) -> tuple[float, str]:
        """A measured pinned bandwidth from h2d_bandwidth, or a quick one measured now if that section did not run."""
        if key in self.bandwidth:
            return self.bandwidth[key], f"h2d_bandwidth {key}"
        quick = prof.Effort(min_time=0.02, max_repeats=5, copy_bytes=min(self.settings.copy_bytes, 512 * 2**20))
        bw = prof.measure_bandwidth(self.device, quick)
        self.bandwidth.setdefault("pinned_best", bw)
        self.bandwidth.setdefault("pinned_median", bw)
        return bw, "measured here (h2d_bandwidth did not run)"


@dataclass
class Outcome:
    """What a section returns: its numbers (the JSON result), a one-line headline and a few printed lines."""

    result: dict[str, Any]
    headline: str
    details: list[str] = field(default_factory=list)
    status: str = "ok"  # "failed": a check the section makes did not pass


# --- sections


def section_environment(ctx: Context) -> Outcome:
    dev, vm = ctx.device, psutil.virtual_memory()
    res: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "device": str(dev), "threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "host_ram_override": ctx.host_ram_override}
    res |= {f"version_{pkg}": _package_version(pkg) for pkg in ("transformers", "accelerate", "pynvml", "nvidia-ml-py")}
    res |= {"host_ram_total": int(vm.total), "host_ram_available": int(vm.available)}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        ctx.card, ctx.gpu_free_at_start = props.name, int(free)
        res.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, gpu_memory_total=int(total), gpu_memory_free=int(free),
                   cudnn=torch.backends.cudnn.version())
        ctx.compute_mode = res["compute_mode"] = _compute_mode(dev)
    try:
        fp = machine_fingerprint(dev)
    except Exception as e:  # NVML trouble must not cost the card's name: torch gave it above
        fp = {"gpu_name": res.get("gpu_name"), "cpu_model": platform.processor(), "error": f"{type(e).__name__}: {e}"}
    res["fingerprint"] = fp
    res["machine"] = describe_machine(fp) if "error" not in fp else fp["error"]
    if not ctx.cuda:
        ctx.card = res["card"] = f"cpu ({fp.get('cpu_model')})"
        return Outcome(res, f"torch {res['torch']} on the CPU, {res['threads']} threads; {res['machine']}")
    ctx.card = res["card"] = fp.get("gpu_name") or ctx.card
    pcie = res["pcie"] = {k: fp.get(k) for k in ("pcie_gen", "pcie_width", "pcie_max_gen", "pcie_max_width")}
    res["gpu_driver"] = fp.get("gpu_driver")
    link = (f", PCIe gen{pcie['pcie_gen']} x{pcie['pcie_width']} (max gen{pcie['pcie_max_gen']} "
            f"x{pcie['pcie_max_width']})" if pcie["pcie_gen"] is not None else ", PCIe link unknown (no NVML)")
    return Outcome(res, f"torch {res['torch']} CUDA {res['torch_cuda']}, driver {res['gpu_driver']}{link}")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
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
    return {0: "default", 1: "exclusive thread", 2: "prohibited", 3: "exclusive process"}.get(int(mode), str(mode))


def section_gpu_tests(ctx: Context) -> Outcome:
    s = ctx.settings
    later = sum(s.need_s[n] for n in SECTIONS[SECTIONS.index("gpu_tests") + 1:])
    timeout = min(s.pytest_timeout_s, ctx.time_left() - min(later, 0.5 * ctx.time_left()))
    if timeout < min(10.0, s.pytest_timeout_s):
        raise SectionSkipped(f"out of time budget ({ctx.time_left():.0f} s left) for the GPU tests")
    if ctx.compute_mode == "exclusive process":
        raise SectionSkipped("the GPU is in exclusive-process compute mode and this process holds it, so the GPU "
                             "tests (a second process) cannot start; run `python -m pytest -m gpu tests`")
    if importlib.util.find_spec("pytest") is None:
        raise SectionSkipped(f"pytest is not installed for {sys.executable}; `pip install pytest` to run the GPU tests")
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        # Every gpu-marked test of the suite (CUDA paths of the model, streaming, quantized layers, the disk tier
        # and the fault handling), deselected everywhere else.
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(h.REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=h.REPO, env=env, capture_output=True, text=True, timeout=timeout)
            output, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
        except subprocess.TimeoutExpired as e:
            output, rc, timed_out = _text(e.stdout) + _text(e.stderr), None, True
        if ctx.out_dir is not None:
            (ctx.out_dir / "gpu_tests.log").write_text(output)
        res: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": rc, "timeout_s": round(timeout, 1),
                               "timed_out": timed_out, "wall_s": time.perf_counter() - t0,
                               "output_tail": output[-3000:]}
        if timed_out:
            raise RuntimeError(f"the GPU tests ran past their {timeout:.0f} s limit; output ends: {output[-400:]!r}")
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report (exit {rc}); output ends: {output[-600:]!r}")
        res.update(parse_junit(junit))
    if res["tests"] == 0:
        raise RuntimeError(f"pytest collected no GPU tests (exit {rc}); output ends: {output[-600:]!r}")
    res["all_skipped"] = res["skipped"] == res["tests"]
    line = f"{res['passed']} passed, {res['failures']} failed, {res['errors']} errors, {res['skipped']} skipped"
    line += f" ({res['skip_reason']})" if res["all_skipped"] else ""
    line += ("; first: " + res["failing"][0]["test"].split("::")[-1]) if res["failing"] else ""
    return Outcome(res, line, [f"FAILED {f['test']}: {f['message'][:200]}" for f in res["failing"][:5]],
                   "failed" if res["failures"] or res["errors"] else "ok")


def _text(x: bytes | str | None) -> str:
    """A timed-out run's output: bytes even with text=True, or None."""
    if x is None:
        return ""
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def section_h2d_bandwidth(ctx: Context) -> Outcome:
    s, dev, n = ctx.settings, ctx.device, ctx.settings.copy_bytes
    per_layer = layer_bytes(s.target, s.dtype)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    src, pinned = alloc_host(n, torch.uint8, pin=ctx.cuda)
    src.fill_(1)
    rates = copy_rates(dst, src, s.copy_repeats, non_blocking=True)
    # a slice of the pinned block is pinned memory too
    layer = copy_rates(dst[:per_layer], src[:per_layer], s.copy_repeats, non_blocking=True) if per_layer <= n else None
    del src
    pageable = torch.empty(n, dtype=torch.uint8)
    pageable.fill_(1)  # fault the pages in before timing
    pageable_rates = copy_rates(dst, pageable, max(2, s.copy_repeats // 2), non_blocking=False)
    del pageable, dst
    res = {"bytes": n, "pinned": pinned, "kind": "host-to-device" if ctx.cuda else "memcpy (no GPU)",
           "pinned_Bps": rates, "pinned_best_Bps": max(rates), "pinned_median_Bps": statistics.median(rates),
           "pageable_Bps": pageable_rates, "pageable_best_Bps": max(pageable_rates),
           "layer_copy": None if layer is None else {"bytes": per_layer, "median_Bps": statistics.median(layer),
                                                     "best_Bps": max(layer)}}
    if not pinned and ctx.cuda:
        res["note"] = "pinned host memory was refused: the 'pinned' figures are pageable copies"
    ctx.bandwidth["pinned_best"], ctx.bandwidth["pinned_median"] = res["pinned_best_Bps"], res["pinned_median_Bps"]
    kind = "pinned" if pinned else "pageable" if ctx.cuda else "memcpy"
    return Outcome(res, f"{kind} {_gb(res['pinned_best_Bps'])} GB/s best, {_gb(res['pinned_median_Bps'])} median "
                        f"({n / 2**30:.2g} GiB); pageable {_gb(res['pageable_best_Bps'])} GB/s")


def section_sweep_efficiency(ctx: Context) -> Outcome:
    s = ctx.settings
    rss0 = psutil.Process().memory_info().rss
    bw, bw_source = ctx.bandwidth_for("pinned_best")
    rows: list[dict[str, Any]] = []
    reference, bitwise, notes = None, True, []
    res: dict[str, Any] = {"model": s.target_name, "layer_plan": ctx.plan_layers(), "dtype": _dtype_name(s.dtype),
                           "bandwidth_Bps": bw, "bandwidth_source": bw_source}
    for resident, slots in s.sweep_configs:
        if rows and ctx.time_left() < 3 * rows[-1]["sweep_s"] * (s.sweep_repeats + 1) * len(s.sweep_tokens) + 5:
            notes.append(f"out of time: stopped before resident={resident}, K={slots}")
            break
        model = ctx.streamed(resident, slots)
        layers: StreamedLayers = model.layers  # type: ignore[assignment]
        if not rows:
            res.update(n_layers=model.args.n_layers, pinned=layers.store.pinned, build_s=ctx.build_s,
                       store_bytes=layers.store.nbytes, rss_growth_bytes=psutil.Process().memory_info().rss - rss0,
                       pinned_allocator=pinned_host_stats() if ctx.cuda else None)
        for n in s.sweep_tokens:
            sweep_s, stats = time_forwards(model, ctx.batch(n), ctx.cache, s.sweep_repeats)
            st = summarise_stats(stats)
            moved = st.get("bytes", layers.bytes_per_sweep)
            eff = sweep_efficiency(moved, bw, sweep_s) if moved else None
            rows.append({"resident": resident, "slots": slots, "tokens": n, "streamed_layers": len(layers.streamed),
                         "streamed_bytes": moved, "sweep_s": sweep_s, "efficiency": eff,
                         "effective_Bps": moved / sweep_s, "engine_stats": st,
                         "meets_target": eff is not None and eff >= EFFICIENCY_TARGET})
        # One plain decoding token as the engine pays it: the host waits after every forward.
        token_s, _ = time_forwards(model, ctx.batch(1), ctx.cache, s.sweep_repeats, back_to_back=False)
        rows[-len(s.sweep_tokens)]["synced_token_s"] = token_s
        logits = model.forward(ctx.batch(1), ctx.cache)[0, 0].float().cpu()
        if reference is None:
            reference = logits
            ctx.ours.update(token_s=token_s, config={"resident": resident, "slots": slots},
                            prompt_logits=ctx.prompt_logits(model))
        else:
            bitwise = bitwise and torch.equal(logits.view(torch.int32), reference.view(torch.int32))  # NaN-proof
        del model, layers
    effs = [r["efficiency"] for r in rows if r["efficiency"] is not None]
    res.update(rows=rows, notes=notes, target=EFFICIENCY_TARGET, best_efficiency=max(effs, default=None),
               worst_efficiency=min(effs, default=None), meets_target=bool(effs) and max(effs) >= EFFICIENCY_TARGET,
               bitwise_equal_across_configs=bitwise,
               logits_finite=None if reference is None else bool(torch.isfinite(reference).all()))
    first = [r for r in rows if (r["resident"], r["slots"]) == s.sweep_configs[0]]
    table = Table(f"sweeps of {s.target_name} x {res['n_layers']} layers, {res['dtype']}, against {_gb(bw)} GB/s "
                  f"({bw_source})",
                  [Column("resident", "R"), Column("slots", "K"), Column("tokens", "tokens"),
                   Column("sweep_s", "sweep ms", report.ms), Column("effective_Bps", "GB/s", _gb),
                   Column("efficiency", "efficiency", ".3f"), Column("wait_s", "copy wait ms", report.ms)],
                  [r | {"wait_s": r["engine_stats"].get("wait_s")} for r in rows])
    return Outcome(res, f"{res['n_layers']} layers; R={first[0]['resident']} K={first[0]['slots']}: "
                        + ", ".join(f"{x['tokens']} tok {x['efficiency']:.2f}" for x in first)
                        + f"; best {res['best_efficiency']:.2f} (target {EFFICIENCY_TARGET}); bitwise across configs "
                          f"{bitwise}", [report.to_text(table)], "ok" if bitwise else "failed")


def section_int4_layers(ctx: Context) -> Outcome:
    """int4 (g128) vs 16-bit layers of the sweep model: bytes per sweep, sweep time and efficiency, and the int4
    kernel against dequantize + matmul at a few token counts (tools/bench_quant.py int4_rows)."""
    from bench_quant import int4_rows

    s = ctx.settings
    bw, bw_source = ctx.bandwidth_for("pinned_best")
    args = s.target.replace(n_layers=min(s.target.n_layers, 8))  # a sweep's ratios need only a few layers
    group = 128 if not s.small else 32  # the tiny shape's widths are 64 and 128
    rows = int4_rows(args, ctx.device, bw, repeats=s.sweep_repeats, float_dtype=s.dtype,
                     grid=(1, 64, 512) if not s.small else (1, 4, 16), group_size=group)
    res = {"model": s.target_name, "n_layers": args.n_layers, "bandwidth_Bps": bw, "bandwidth_source": bw_source,
           "rows": rows}
    q = next(r for r in res["rows"] if r["format"] == f"int4 g{group}" and "sweep_ms" in r)
    table = Table(f"int4 vs {_dtype_name(s.dtype)}: {s.target_name} shape, {args.n_layers} layers",
                  [Column("format", "format"), Column("bytes_per_sweep", "bytes/sweep", ".4g"),
                   Column("sweep_ms", "sweep ms", ".4g"), Column("efficiency", "efficiency", ".3f"),
                   Column("kernel_us", "kernel us", ".4g"), Column("dequant_matmul_us", "dequant+mm us", ".4g")],
                  res["rows"])
    return Outcome(res, f"int4 sweep {q['sweep_vs_fp16']:.2f}x the {_dtype_name(s.dtype)} sweep's time, "
                        f"efficiency {q['efficiency']:.2f}", [report.to_text(table)])


def section_verify_scaling(ctx: Context) -> Outcome:
    s = ctx.settings
    model = ctx.streamed(0, 2)
    points: list[dict[str, Any]] = []
    notes = []
    for n in s.verify_grid:
        if points and ctx.time_left() < points[-1]["seconds"] * (s.verify_repeats + 1) * 1.5 + 2:
            notes.append(f"out of time: stopped before n = {n}")
            break
        seconds, stats = time_forwards(model, ctx.batch(n), ctx.cache, s.verify_repeats)
        points.append({"n": n, "seconds": seconds, "engine_stats": summarise_stats(stats)})
    for p in points:
        p["ratio"] = p["seconds"] / points[0]["seconds"]
    picks = {p["n"]: p for p in points if p["n"] in (16, 256, 1024)} | {points[-1]["n"]: points[-1]}
    return Outcome({"model": s.target_name, "n_layers": model.args.n_layers, "resident": 0, "slots": 2,
                    "prefix": s.prefix, "tree": "best-first under DEFAULT_ACCEPTANCE, depth <= 16", "points": points,
                    "grid": [p["n"] for p in points], "ratios": [p["ratio"] for p in points], "notes": notes},
                   "T(n)/T(1): " + ", ".join(f"n={n} {p['ratio']:.2f}" for n, p in picks.items())
                   + f"; T(1) {points[0]['seconds']:.3g} s",
                   ["T_verify(n)/T(1): " + " ".join(f"{p['n']}:{p['ratio']:.2f}" for p in points)])


def section_draft_levels(ctx: Context) -> Outcome:
    s = ctx.settings
    out: dict[str, Any] = {"drafts": {}, "notes": [], "prefix": s.draft_prefix}
    # The planner's draft first: the planner section needs its curve.
    for name in [s.plan_draft_name] + [n for n in s.drafts if n != s.plan_draft_name]:
        if out["drafts"] and ctx.time_left() < (0.5 if s.small else 10):
            out["notes"].append(f"out of time: {name} not timed")
            continue
        args, grid = s.drafts[name], list(s.draft_grids[name])
        t0 = time.perf_counter()
        secs = prof.draft_level_curve(args, s.dtype, ctx.device, grid, prefix=s.draft_prefix, effort=s.effort,
                                      seed=s.seed)
        ctx.draft_curves[name] = (grid, secs)
        out["drafts"][name] = {"params": args.n_params(), "grid": grid, "seconds": secs,
                               "ms_per_level": {str(w): t * 1e3 for w, t in zip(grid, secs)},
                               "wall_s": time.perf_counter() - t0}
        release(ctx.device)
    d = out["drafts"].items()
    return Outcome(out, "; ".join(f"{n} {report.ms(x['seconds'][0])}..{report.ms(x['seconds'][-1])} ms "
                                  f"(w 1..{x['grid'][-1]})" for n, x in d),
                   [f"draft {n} ms/level: " + " ".join(f"{w}:{report.ms(t)}" for w, t in zip(x["grid"], x["seconds"]))
                    for n, x in d])


def section_accelerate_baseline(ctx: Context) -> Outcome:
    s, dev = ctx.settings, ctx.device
    try:
        from accelerate import cpu_offload
    except ImportError as e:
        raise SectionSkipped(f"accelerate is not installed here ({e})") from None
    t0 = time.perf_counter()
    model = h.hf_model(ctx.weights(), s.dtype)
    res: dict[str, Any] = {"model": s.target_name, "n_layers": model.config.num_hidden_layers,
                           "dtype": _dtype_name(s.dtype), "build_s": time.perf_counter() - t0, "notes": [],
                           "how": "accelerate.cpu_offload(model, execution_device): weights in pageable host RAM, "
                                  "copied module by module before each forward"}
    cpu_offload(model, execution_device=dev)
    times: list[float] = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer transformers rename past_key_values
        out, nxt = None, torch.tensor([ctx.prompt()], device=dev)
        for i in range(s.hf_tokens + 2):  # the prefill, then a warm-up token, then the timed ones
            if i >= 3 and ctx.time_left() < 1.3 * times[-1] + 2:
                res["notes"].append(f"out of time after {len(times)} timed tokens")
                break
            sync(dev)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=None if out is None else out.past_key_values, use_cache=True)
            sync(dev)
            dt = time.perf_counter() - t0
            if i == 0:
                res["prefill_s"], logits = dt, out.logits[0, -1].float().cpu()
            elif i == 1:
                res["warmup_token_s"] = dt
            else:
                times.append(dt)
            nxt = out.logits[:, -1:].argmax(-1)
    del out, model
    release(dev)
    ours = ctx.ours.get("token_s")
    res.update(token_s=times, s_per_token=statistics.median(times) if times else res.get("warmup_token_s"),
               ours_s_per_token=ours, ours_config=ctx.ours.get("config"),
               ours_note="ours: one synchronised 1-token forward of the same model streamed through the runtime "
                         "(sweep_efficiency, first config), i.e. plain decoding without a draft")
    res["speedup"] = res["s_per_token"] / ours if ours and res["s_per_token"] else None
    mine = ctx.ours.get("prompt_logits")
    if mine is not None:
        res["logits_vs_ours"] = {"max_abs_diff": float((logits - mine).abs().max()), "scale": float(mine.abs().max()),
                                 "argmax_equal": int(logits.argmax()) == int(mine.argmax())}
    line = f"accelerate {res['s_per_token']:.3g} s/token"
    line += f" vs ours {ours:.3g} s/token plain ({res['speedup']:.1f}x)" if ours else ""
    return Outcome(res, line + f", {res['n_layers']} layers")


def section_planner_predictions(ctx: Context) -> Outcome:
    s, dev = ctx.settings, ctx.device
    T, dtype, grid = s.plan_target, s.dtype, list(s.plan_grid)
    t0 = time.perf_counter()
    layer_s = prof.layer_time_curve(T, dtype, dev, grid, prefix=s.plan_prefix, effort=s.effort, seed=s.seed)
    release(dev)
    head_s = prof.head_time_curve(T, dtype, dev, grid, effort=s.effort, seed=s.seed)
    release(dev)
    host_s = prof.host_time_curve(T, dev, grid, prefix=s.plan_prefix, effort=s.effort, seed=s.seed)
    draft_source = "draft_levels section"
    if s.plan_draft_name not in ctx.draft_curves:
        dgrid = [w for w in grid if w <= max(s.draft_grids[s.plan_draft_name])]
        ctx.draft_curves[s.plan_draft_name] = dgrid, prof.draft_level_curve(
            s.drafts[s.plan_draft_name], dtype, dev, dgrid, prefix=s.draft_prefix, effort=s.effort, seed=s.seed)
        draft_source = "measured here"
        release(dev)
    dgrid, dsecs = ctx.draft_curves[s.plan_draft_name]
    curves = {key: opt.Curve(tuple(g), opt.suffix_min(secs)) for key, g, secs in (
        ("layer", grid, layer_s), ("head", grid, head_s), ("host", grid, host_s), ("draft_level", dgrid, dsecs))}
    p = ctx.acceptance["p"]
    here_bw, bw_source = ctx.bandwidth_for("pinned_median")
    if s.small or not ctx.cuda:
        here_budget = _small_budget(s, 3)
    else:
        here_budget = int(BUDGET_FRACTION * (ctx.gpu_free_at_start or torch.cuda.mem_get_info(dev)[0]))
    cards = [{"name": f"this card ({ctx.card})", "bandwidth_Bps": here_bw, "bandwidth_source": bw_source,
              "budget_bytes": here_budget},
             {"name": PROJECTED_CARD["name"], "bandwidth_Bps": PROJECTED_CARD["bandwidth_Bps"],
              "bandwidth_source": "assumed (PCIe 4.0 x16, pinned)",
              "budget_bytes": _small_budget(s, 1) if s.small else int(BUDGET_FRACTION * PROJECTED_CARD["memory_bytes"])}]
    parts, lines = [], [f"planner {s.plan_target_name} + {s.plan_draft_name} ({_dtype_name(dtype)}), acceptance "
                        f"{ctx.acceptance['source']}: p = [{', '.join(f'{x:.3g}' for x in p[:6])}, ...]"]
    for c in cards:
        label = "here" if c["name"].startswith("this card") else "24GB@25GB/s"
        try:
            c.update(predict(s, curves, p, c["bandwidth_Bps"], c["budget_bytes"], ctx.cuda))
        except ResourceError as e:
            c["error"] = str(e)
            parts.append(f"{label}: does not fit")
            lines.append(f"  {c['name']}: {c['error'][:160]}")
            continue
        b = c["best"]
        parts.append(f"{label} {c['s_per_token']:.3g} s/token ({b['n']} nodes, {c['tokens_per_step']:.2f} tok/step, "
                     f"{c['resident_layers']} resident)")
        lines.append(f"  {c['name']}: {_gb(c['bandwidth_Bps'])} GB/s, {c['resident_layers']}/{c['n_layers']} "
                     f"resident: tree {b['n']} nodes depth {b['depth']}, {b['tokens_per_step']:.2f} tokens/step, "
                     f"step {b['step_s']:.3g} s -> {c['s_per_token']:.3g} s/token (plain {c['plain_s_per_token']:.3g}, "
                     f"x{c['speedup_vs_plain']:.1f})")
    res = {"target": s.plan_target_name, "draft": s.plan_draft_name, "dtype": _dtype_name(dtype),
           "acceptance": {"p": list(p), "source": ctx.acceptance["source"], "note": ctx.acceptance["note"]},
           "curves": {"grid": grid, "layer_s": layer_s, "head_s": head_s, "host_s": host_s, "draft_grid": list(dgrid),
                      "draft_level_s": list(dsecs), "draft_source": draft_source, "measured_on": ctx.card,
                      "wall_s": time.perf_counter() - t0},
           "cards": cards,
           "assumptions": "every card computes like this one (the curves are this card's); cards differ in copy "
                          "bandwidth and memory only. Batch 1, the runtime's residency rule, the DP's trees."}
    return Outcome(res, f"{s.plan_target_name}: " + "; ".join(parts) + f"; p={ctx.acceptance['source']}", lines)


def _small_budget(s: Settings, layers: int) -> int:
    """A budget that fits the fixed needs and `layers` decoder layers (small mode has no real card)."""
    fixed = fixed_device_bytes(s.plan_target, s.dtype, draft_args=s.drafts[s.plan_draft_name], batch=1,
                               max_seq_len=s.plan_max_seq_len, tree_size=s.plan_max_tree, max_chunk=2048, slots=2,
                               on_cuda=False)
    return sum(fixed.values()) + layers * layer_bytes(s.plan_target, s.dtype)


def predict(s: Settings, curves: dict[str, opt.Curve], p: Sequence[float], bandwidth: float, budget: int,
            cuda: bool) -> dict[str, Any]:
    """The planner's pick for the plan target on a card with this copy bandwidth and memory budget, over the time
    model of these curves; if a context window of plan_max_seq_len does not fit beside the draft, 2048 is tried."""
    T = s.plan_target
    tm = opt.TimeModel(layer=curves["layer"], head=curves["head"], host=curves["host"],
                       draft_level=curves["draft_level"], n_layers=T.n_layers, resident=0,
                       layer_bytes=layer_bytes(T, s.dtype), bandwidth=bandwidth, overlap=cuda)
    notes = []
    for seq_len in dict.fromkeys((s.plan_max_seq_len, min(s.plan_max_seq_len, 2048))):
        try:
            choice, tm = h.search_card(p, tm, (s.plan_target_name, T, None),
                                       (s.plan_draft_name, s.drafts[s.plan_draft_name], None), s.dtype, cuda=cuda,
                                       budget=budget, max_seq_len=seq_len, max_tree=s.plan_max_tree,
                                       max_depth=s.plan_max_depth)
            break
        except ResourceError as e:
            notes.append(f"max_seq_len {seq_len}: {e}")
    else:
        raise ResourceError("; ".join(notes))
    best, plain = choice.optimum.best.row(), opt.evaluate([-1], 1.0, tm)
    return {"max_seq_len": seq_len, "resident_layers": len(choice.residency.resident), "n_layers": T.n_layers,
            "stream_s": tm.stream_s, "best": best, "plain_s_per_token": plain.s_per_token,
            "s_per_token": best["s_per_token"], "tokens_per_step": best["tokens_per_step"],
            "speedup_vs_plain": plain.s_per_token / best["s_per_token"],
            "top": [c.row() for c in choice.optimum.ranked], "notes": notes}


def section_batch_throughput(ctx: Context) -> Outcome:
    s, dev, T = ctx.settings, ctx.device, ctx.settings.batch_target
    need = T.n_layers * layer_bytes(T, s.dtype) + s.ram_headroom
    if need > ctx.host_ram()[0]:
        raise SectionSkipped(f"not enough host RAM for the batch model ({need / 2**30:.1f} GiB needed)")
    # The draft: the target's first layers, resident (same seed, so the same weights: a truncated copy).
    target = streamed_model(RandomWeights(T, s.seed + 10, distinct_layers=False), dev, s.dtype, 0, 2)
    dargs = T.replace(n_layers=s.batch_draft_layers)
    draft = build_model(RandomWeights(dargs, s.seed + 10, distinct_layers=False), dev, s.dtype,
                        Residency(False, tuple(range(dargs.n_layers)), 0, None))
    tree = best_tree(ctx.acceptance["p"], s.batch_tree_nodes, 8)[1]  # the DP: any p, sorted or not
    max_len = 8 + s.batch_new_tokens + len(tree) + 2
    g = torch.Generator().manual_seed(s.seed + 11)
    prompts = [torch.randint(0, T.vocab_size, (8,), generator=g).tolist() for _ in range(max(s.batch_sizes))]

    def engine(batch_size: int) -> Engine:
        return Engine(target, draft, None, max_seq_len=max_len, batch_size=batch_size, trees=tree, name="batch")

    engine(1).generate([prompts[0]], max_new_tokens=2, temperature=0, ignore_eos=True)  # warm-up
    rows, notes, sweeps = [], [], []
    for B in s.batch_sizes:
        if rows and ctx.time_left() < 2.5 * rows[-1]["seconds"] + 2:
            notes.append(f"out of time: stopped before B = {B}")
            break
        run = engine(B)
        sync(dev)
        t0 = time.perf_counter()
        results = run.generate(prompts[:B], max_new_tokens=s.batch_new_tokens, temperature=0, ignore_eos=True)
        sync(dev)
        seconds, call = time.perf_counter() - t0, results.stats
        tokens = sum(len(r.token_ids) for r in results)
        sweeps += call.sweeps
        rows.append({"batch": B, "seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
                     "sweeps": len(call.sweeps), "sweeps_per_token": len(call.sweeps) / tokens,
                     "tokens_per_step": statistics.mean(r.stats.tokens_per_step for r in results),
                     "draft_s": call.draft_s, "verify_s": call.sweep_s, "other_s": call.host_s})
        del run, results
    spt = [r["sweeps_per_token"] for r in rows]
    res = {"target": s.batch_target_name, "draft_layers": s.batch_draft_layers, "tree_nodes": len(tree),
           "new_tokens_per_sequence": s.batch_new_tokens, "greedy": True, "rows": rows,
           "sweep_stats": summarise_stats(sweeps), "sweeps_per_token_falls": all(b < a for a, b in zip(spt, spt[1:])),
           "notes": notes}
    table = Table("batches", [Column("batch", "B"), Column("tokens_per_s", "tokens/s", ".3g"),
                              Column("sweeps_per_token", "sweeps/token", ".3f"),
                              Column("tokens_per_step", "tokens/step", ".2f")], rows)
    return Outcome(res, "tokens/s " + ", ".join(f"B{x['batch']} {x['tokens_per_s']:.3g}" for x in rows)
                   + f"; sweeps/token {spt[0]:.2f} -> {spt[-1]:.3f} (falls: {res['sweeps_per_token_falls']})",
                   [report.to_text(table)])
# each section is the function section_NAME above
SECTION_FUNCS: dict[str, Callable[[Context], Outcome]] = {name: globals()[f"section_{name}"] for name in SECTIONS}


# --- running sections


def run_section(ctx: Context, name: str, selected: bool) -> None:
    entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "started_at_s": round(ctx.elapsed(), 2),
                             "result": None, "reason": None, "error": None, "traceback": None}
    ctx.report["sections"][name] = entry
    need = ctx.settings.need_s[name]
    headline = None
    if not selected:
        entry["reason"] = "not selected (--sections)"
    elif need > 0 and ctx.time_left() < need:  # need 0: always runs (the environment names the card)
        entry["reason"] = f"out of time budget ({max(0.0, ctx.time_left()):.0f} s left, needs about {need:.0f} s)"
    else:
        _log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            out = SECTION_FUNCS[name](ctx)
            entry["status"], entry["result"], headline = out.status, out.result, out.headline
            ctx.details += out.details
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
             + (f" ({entry['error'] or entry['reason']})" if entry["status"] not in ("ok", "failed") else ""))
    ctx.report["summary"][name] = headline or entry["error"] or f"skipped: {entry['reason']}"
    write_report(ctx)


def write_report(ctx: Context) -> None:
    ctx.report.update(elapsed_s=ctx.elapsed(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), card=ctx.card)
    for path in ctx.out_paths:
        write_json(path, jsonable(ctx.report))


def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def summary_table(report_: dict[str, Any]) -> Table:
    rows = [{"section": name, "status": e.get("status"), "seconds": e.get("seconds", 0.0),
             "result": report_["summary"].get(name, "")[:220]} for name, e in report_["sections"].items()]
    return Table(f"device_check {report_['mode']} | {report_['card']} | {report_['created']} | "
                 f"{report_['elapsed_s']:.0f} s of {report_['budget_s']:.0f} s",
                 [Column("section", "section"), Column("status", "status", left=True),
                  Column("seconds", "time", lambda x: f"{x:.1f}s"), Column("result", "result", left=True)], rows)


# --- command line


def acceptance_from(spec: str | None) -> dict[str, Any]:
    from planner.acceptance import parse_vector, read_acceptance

    if spec is None or spec == "default":
        return {"p": list(DEFAULT_ACCEPTANCE), "source": "default",
                "note": "an assumption shaped like Sequoia's Llama-2 measurements (offload_runtime.spec.tree_search)"}
    if Path(spec).is_file():
        result = read_acceptance(spec)
        return {"p": list(result.p), "source": f"file {spec}",
                "note": f"measured: {result.steps} steps, width {result.width}, temperature {result.temperature}"}
    return {"p": parse_vector(spec), "source": "given", "note": "--acceptance on the command line"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; cpu with --small)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget in seconds (default 450; 60 small)")
    p.add_argument("--output", type=h.output_file, default=None,
                   help="JSON report path (default ./device_check.json; $OUT/ as well)")
    p.add_argument("--sections", type=h.csv(str), default=None,
                   help=f"comma list of sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--acceptance", default=None,
                   help="acceptance vector for the planner: 0.7,0.1,..., a planner acceptance file, or 'default'")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="weights dtype (default float16)")
    p.add_argument("--host-ram-gib", type=float, default=None,
                   help="host RAM this run may use, in GiB (default: psutil's available memory)")
    p.add_argument("--max-layers", type=int, default=None, help="cap the 13B-shape model's decoder layers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --small)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = [x for x in args.sections or () if x not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
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
    paths = [Path(args.output or "device_check.json").resolve()] if args.output is not None or out_dir is None else []
    paths += [out_dir / "device_check.json"] if out_dir is not None else []
    ctx = Context(settings=settings, device=device, budget_s=budget, acceptance=args.acceptance,
                  host_ram_override=None if args.host_ram_gib is None else int(args.host_ram_gib * 2**30),
                  out_paths=paths, out_dir=out_dir, card="cpu" if device.type == "cpu" else "unknown")
    ctx.report = {"kind": "device_check", "version": REPORT_VERSION,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None,
                  "mode": "small" if args.small else "full", "card": ctx.card, "device": str(device),
                  "budget_s": budget, "elapsed_s": None, "argv": sys.argv[1:] if argv is None else list(argv),
                  "settings": settings.describe(), "sections": {}, "summary": {}}
    for name in SECTIONS:
        run_section(ctx, name, args.sections is None or name in args.sections)
    write_report(ctx)
    sys.stderr.flush()
    print("\n".join(ctx.details))
    print(f"report: {', '.join(str(p) for p in paths)}")
    print(report.to_text(summary_table(ctx.report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
