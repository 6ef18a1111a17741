"""How fast this machine runs one model pair: copy bandwidth and time curves (the fingerprint of the machine is
the runtime's, offload_runtime/api/machine.py).

Everything here measures; nothing decides. The optimiser (planner/optimizer.py) turns a profile into a plan.

A *profile* holds, for one (machine, device, dtype, target shape, draft shape):
- the host-to-device copy figures: bandwidth of large pinned copies (a plain memcpy on the CPU) and the time
  of one copy of a packed target layer (what a sweep moves, layer by layer);
- T_layer(n): one target decoder layer on the target's real shapes (random weights) for n new tokens
  against a prefix, at a grid of n;
- T_head(n): the target's embedding, final norm, lm_head and probability warp over n tokens;
- T_host(n): host-side work of one step for a tree of n nodes (the forward's inputs, the verification walk);
- T_level(w): one draft forward over w tokens plus drawing their children, as the engine grows a tree level.
Timings synchronise CUDA (events around every call); on the CPU they are wall-clock.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from offload_runtime.api.home import short_hash, store_dir
from offload_runtime.api.machine import machine_fingerprint
from offload_runtime.errors import UsageError
from offload_runtime.timer import median_seconds
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import KernelChoice, QuantSpec, exact_kernel_choice, measure_kernel_times
from offload_runtime.residency import Residency
from offload_runtime.weights.layout import layer_bytes, layer_layout
from offload_runtime.weights.loader import build_model, device_spec, load_globals
from offload_runtime.weights.quantized import QuantizedSource, quant_spec_for
from offload_runtime.weights.random import RandomWeights
from offload_runtime.weights.store import fill_layer

PROFILE_VERSION = 3  # 2: warp_s (top-p warping cost per row count); 3: effort (a quick profile is told apart)

# 1, 2, 3, 4, 6, 8, 12, ... 4096: powers of two and the points halfway between them (in log scale), so a
# kernel's tile steps show up and linear interpolation between grid points stays close.
DEFAULT_GRID: tuple[int, ...] = tuple(sorted({1, *(2 ** k for k in range(13)), *(3 * 2 ** k for k in range(11))}))
QUICK_GRID: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_PREFIX = 512  # cached tokens the timed tokens attend to (a typical prompt plus some reply)


# --- timing


def time_call(fn: Callable[[], Any], device: torch.device, *, min_time: float, max_repeats: int,
              warmup: int = 1) -> float:
    """Median seconds of fn(), repeated until `min_time` has passed or `max_repeats` runs (offload_runtime/timer.py)."""
    return median_seconds(fn, device, min_time=min_time, max_repeats=max_repeats, warmup=warmup)


@dataclass(frozen=True)
class Effort:
    """How hard to measure: minimum seconds per point, most repeats, size of the bandwidth copies."""

    min_time: float = 0.25
    max_repeats: int = 20
    copy_bytes: int = 512 * 2 ** 20

    @classmethod
    def quick(cls) -> "Effort":
        return cls(min_time=0.01, max_repeats=3, copy_bytes=16 * 2 ** 20)

    def at_least(self, other: "Effort") -> bool:
        """Measured at least as carefully as `other` asks, on every count."""
        return (self.min_time >= other.min_time and self.max_repeats >= other.max_repeats
                and self.copy_bytes >= other.copy_bytes)


# --- bandwidth


def _host_buffer(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        except RuntimeError:
            print("warning: pinned host memory was refused; measuring pageable copies", file=sys.stderr)
    return torch.empty(numel, dtype=dtype)


def copy_time(nbytes: int, device: torch.device, effort: Effort) -> float:
    """Seconds for one host-to-device copy of `nbytes` from pinned memory (a memcpy when the device is the CPU)."""
    n = max(1, nbytes)
    src = _host_buffer(n, torch.uint8, pin=device.type == "cuda")
    src.fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    copy = (lambda: dst.copy_(src, non_blocking=True)) if device.type == "cuda" else (lambda: dst.copy_(src))
    return time_call(copy, device, min_time=effort.min_time, max_repeats=max(3, effort.max_repeats))


def measure_bandwidth(device: torch.device, effort: Effort) -> float:
    """Bytes per second of large host-to-device copies (pinned on CUDA; memcpy on the CPU)."""
    return effort.copy_bytes / copy_time(effort.copy_bytes, device, effort)


def disk_read_bandwidth(directory: Path, effort: Effort, threads: Sequence[int] = (1, 2, 4, 8)) -> dict[str, Any]:
    """The direct-I/O read bandwidth a disk store in `directory` reaches with each reader thread count: a scratch
    file of random bytes (4x the copy size; random, so no storage layer can shortcut zeros) written there, read
    whole by DiskReader's own reading function, deleted."""
    from offload_runtime.weights import disk

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = disk.padded_bytes(4 * effort.copy_bytes)
    raw = disk.page_aligned(nbytes)
    block = torch.randint(0, 256, (min(nbytes, 64 << 20),), dtype=torch.uint8)
    for a in range(0, nbytes, block.numel()):
        raw[a: a + block.numel()] = block[: nbytes - a]
    path = directory / f".bandwidth-probe-{os.getpid()}.bin"
    disk.write_file(path, raw)
    del raw
    try:
        runs = [disk.measure_read_bandwidth([path], t) for t in threads]
    finally:
        path.unlink(missing_ok=True)
    return {"dir": str(directory), "bytes": nbytes, "direct": runs[0].direct, "threads": list(threads),
            "Bps": [r.bytes_per_s for r in runs]}


def read_threads_for(disk_profile: dict[str, Any], within: float = 0.95) -> tuple[int, float]:
    """(threads, bytes/s): the fewest reader threads that reach `within` of the best bandwidth measured."""
    best = max(disk_profile["Bps"])
    t, bw = next((t, bw) for t, bw in zip(disk_profile["threads"], disk_profile["Bps"]) if bw >= within * best)
    return int(t), float(bw)


# --- random weights of a model's real shapes


def random_layer(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int,
                 index: int = 0, quant: QuantSpec | None = None) -> dict[str, torch.Tensor]:
    """One decoder layer of random weights in one packed buffer on `device`, as a streamed layer sits in its slot
    (quantized on the fly when `quant` is given)."""
    quant = device_spec(quant, device)
    layout = layer_layout(args, dtype, quant)
    source = RandomWeights(args, seed) if quant is None else QuantizedSource(RandomWeights(args, seed), quant)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    fill_layer(source, index, layout, buffer)
    return layout.views(buffer.to(device))


def kernel_times(args: ModelArgs, quant: QuantSpec | None, dtype: torch.dtype, device: torch.device):
    """The int kernel against dequantize + matmul on the model's MLP linear (None for float models)."""
    if quant is None or quant.act_order:
        return None
    return measure_kernel_times(args.intermediate_size, args.dim, quant, dtype, device)


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _copies_for_timing(args: ModelArgs, dtype: torch.dtype, device: torch.device,
                       quant: QuantSpec | None = None) -> int:
    """Distinct layer copies to cycle through, so weights are not cache-hot in a way a sweep never is."""
    budget = 2 ** 30 if device.type == "cuda" else 512 * 2 ** 20
    return max(1, min(args.n_layers, 8, budget // max(1, layer_bytes(args, dtype, quant))))


# --- the target's curves


def _chain_mask(prefix: int, n: int, device: torch.device) -> torch.Tensor:
    """[1, 1, n, prefix + n]: every token sees the prefix and the tokens before it (a dense mask like a tree's)."""
    mask = torch.ones(n, prefix + n, dtype=torch.bool)
    mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool).tril_()
    return mask[None, None].to(device)


def layer_time_curve(args: ModelArgs, dtype: torch.dtype, device: torch.device, grid: Sequence[int], *,
                     prefix: int = DEFAULT_PREFIX, effort: Effort = Effort(), seed: int = 0,
                     progress: Callable[[int], None] | None = None, quant: QuantSpec | None = None,
                     kernel: KernelChoice | None = None) -> list[float]:
    """T_layer(n) for n in `grid`: seconds of one decoder layer over n new tokens against `prefix` cached ones
    (quantized layers: by the path `kernel` chooses for n tokens, as the engine runs them)."""
    from offload_runtime.model.transformer import decoder_layer, layer_mask, rope_cos_sin, rope_inv_freq

    grid = _check_grid(grid)
    g = _device_generator(device, seed)
    m = _copies_for_timing(args, dtype, device, quant)
    layers = [random_layer(args, dtype, device, seed, i, quant) for i in range(m)]
    S = prefix + max(grid) + 1
    caches = [(torch.zeros(1, args.n_kv_heads, S, args.head_dim, dtype=dtype, device=device),
               torch.zeros(1, args.n_kv_heads, S, args.head_dim, dtype=dtype, device=device)) for _ in range(m)]
    inv_freq = rope_inv_freq(args, device)
    out: list[float] = []
    with torch.inference_mode():
        for n in grid:
            x = torch.randn(n, args.dim, generator=g, device=device, dtype=torch.float32).to(dtype)
            positions = torch.arange(prefix, prefix + n, device=device)[None]
            cos, sin = rope_cos_sin(inv_freq, positions, dtype)
            mask = layer_mask(args, _chain_mask(prefix, n, device), dtype)

            def run() -> None:
                for w, (k, v) in zip(layers, caches):
                    decoder_layer(args, w, x, cos, sin, mask, k, v, positions, kernel)

            out.append(time_call(run, device, min_time=effort.min_time, max_repeats=effort.max_repeats) / m)
            if progress:
                progress(1)
    return out


def head_time_curve(args: ModelArgs, dtype: torch.dtype, device: torch.device, grid: Sequence[int], *,
                    effort: Effort = Effort(), seed: int = 0,
                    progress: Callable[[int], None] | None = None) -> list[float]:
    """T_head(n): embedding lookup, final norm and lm_head for n tokens (warping is warp_s: only walked rows)."""
    from offload_runtime.model.transformer import rms_norm

    grid = _check_grid(grid)
    g = _device_generator(device, seed)
    gw = load_globals(RandomWeights(args, seed), dtype, device)
    out: list[float] = []
    with torch.inference_mode():
        for n in grid:
            tokens = torch.randint(0, args.vocab_size, (1, n), generator=g, device=device)

            def run() -> None:
                x = F.embedding(tokens, gw.embed)
                F.linear(rms_norm(x, gw.norm, args.rms_norm_eps), gw.lm_head)

            out.append(time_call(run, device, min_time=effort.min_time, max_repeats=effort.max_repeats))
            if progress:
                progress(1)
    return out


def warp_time_curve(vocab_size: int, device: torch.device, grid: Sequence[int], *, effort: Effort = Effort(),
                    seed: int = 0, progress: Callable[[int], None] | None = None) -> list[float]:
    """T_warp(rows): temperature and top-p warping of `rows` distributions over the vocabulary.

    Measured with top-p on (its vocabulary-wide sort is the cost); the optimiser adds it to each draft level and to
    the verifier's walk when a plan samples with top-p < 1.
    """
    from offload_runtime.spec.sampling import warp_probs

    grid = _check_grid(grid)
    g = _device_generator(device, seed)
    out: list[float] = []
    for rows in grid:
        logits = torch.randn(rows, vocab_size, generator=g, device=device)
        out.append(time_call(lambda: warp_probs(logits, 0.7, 0.9), device, min_time=effort.min_time,
                             max_repeats=effort.max_repeats))
        if progress:
            progress(1)
    return out


def host_time_curve(args: ModelArgs, device: torch.device, grid: Sequence[int], *, prefix: int = DEFAULT_PREFIX,
                    effort: Effort = Effort(), seed: int = 0,
                    progress: Callable[[int], None] | None = None) -> list[float]:
    """T_host(n): the step's host work for a tree of n nodes: the target forward's inputs and the verification walk.

    The trees are the best-first trees of the default acceptance vector (the shapes plans use); the walk runs
    Sequoia's verifier on random P and Q of the target's vocabulary, which visits about as many nodes as a
    real step (a few children per level, down a short path).
    """
    from offload_runtime.model.batch import RowChunk, build_forward
    from offload_runtime.model.tree import Tree
    from offload_runtime.spec.methods import verify
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_first_tree

    grid = _check_grid(grid)
    g = torch.Generator().manual_seed(seed)
    out: list[float] = []
    for n in grid:
        tree = best_first_tree(DEFAULT_ACCEPTANCE, n, 16)[1] if n > 1 else Tree([-1])
        tokens = torch.randint(0, args.vocab_size, (len(tree),), generator=g).tolist()
        # One row broadcast to every node: the walk reads rows one at a time, and [n, V] of real rows
        # would take gigabytes for large vocabularies and trees.
        P = torch.rand(args.vocab_size, generator=g).softmax(-1).to(device).expand(len(tree), -1)
        Q = torch.rand(args.vocab_size, generator=g).softmax(-1).to(device).expand(len(tree), -1)
        rng = torch.Generator().manual_seed(seed + n)

        def run() -> None:
            build_forward([RowChunk(prefix, tree, tokens, range(len(tree)), range(len(tree)))], prefix + len(tree),
                          args.sliding_window, device)
            verify("sequoia", tree, tokens, P, Q, rng)

        out.append(time_call(run, device, min_time=effort.min_time, max_repeats=effort.max_repeats))
        if progress:
            progress(1)
    return out


# --- the draft's curve


def draft_level_curve(args: ModelArgs, dtype: torch.dtype, device: torch.device, grid: Sequence[int], *,
                      prefix: int = DEFAULT_PREFIX, effort: Effort = Effort(), seed: int = 0,
                      progress: Callable[[int], None] | None = None, quant: QuantSpec | None = None) -> list[float]:
    """T_level(w): one draft forward over w tree nodes of one level, then drawing their children, as the engine does.

    The whole draft is built (random weights, every layer distinct: it is resident in a real run too).
    """
    from offload_runtime.model.batch import RowChunk, build_forward
    from offload_runtime.model.kv_cache import KVCache
    from offload_runtime.model.tree import Tree
    from offload_runtime.spec.sampling import gumbel_top_k, warp_probs

    grid = _check_grid(grid)
    g = _device_generator(device, seed)
    model = build_model(RandomWeights(args, seed), device, dtype, Residency(False, tuple(range(args.n_layers)), 0, None),
                        quant=quant)
    cache = KVCache(args, 1, prefix + max(grid) + 2, dtype, device)
    out: list[float] = []
    for w in grid:
        tree = Tree([-1] + [0] * w)  # the level's w nodes; siblings or cousins cost the same
        tokens = torch.randint(0, args.vocab_size, (w + 1,), generator=torch.Generator().manual_seed(w)).tolist()
        row = RowChunk(prefix, tree, tokens, range(1, w + 1), range(w))

        def run() -> None:
            batch = build_forward([row], cache.scratch_slot, args.sliding_window, device)
            logits = model.forward(batch, cache)
            probs = warp_probs(logits[0], 1.0, 1.0).float()
            gumbel_top_k(probs, [2] * w, g).tolist()  # .tolist(): the engine reads the children on the host

        out.append(time_call(run, device, min_time=effort.min_time, max_repeats=effort.max_repeats))
        if progress:
            progress(1)
    return out


def _check_grid(grid: Iterable[int]) -> list[int]:
    grid = [int(n) for n in grid]
    if not grid or any(n < 1 for n in grid) or grid != sorted(set(grid)):
        raise UsageError(f"a grid of token counts must be increasing whole numbers >= 1, got {grid}")
    return grid


def parse_grid(text: str) -> list[int]:
    """'1,2,4,8' or '1-64' (powers of two from 1 to 64)."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            if lo < 1 or hi < lo:
                raise ValueError
            grid = sorted({lo, hi, *(2 ** k for k in range(int(math.log2(hi)) + 1) if lo <= 2 ** k <= hi)})
        else:
            grid = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"cannot read grid {text!r}; write it like 1,2,4,8 or 1-4096") from None
    return _check_grid(grid)


# --- a whole profile


def shape_fields(args: ModelArgs) -> dict[str, Any]:
    """The fields of ModelArgs that decide timings (not rope, eps or token ids)."""
    keys = ("model_type", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
            "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "sliding_window")
    return {k: getattr(args, k) for k in keys}


def shape_id(args: ModelArgs) -> str:
    return short_hash(shape_fields(args), 12)


def profile_path(machine: str, device: torch.device, dtype: torch.dtype, target: ModelArgs,
                 draft: ModelArgs | None, quant: QuantSpec | None = None,
                 draft_quant: QuantSpec | None = None) -> Path:
    dname = str(dtype).replace("torch.", "")
    quant = quant or quant_spec_for(target, None, None, "target")
    draft_quant = draft_quant or (quant_spec_for(draft, None, None, "draft") if draft is not None else None)
    formats = "".join(f"-{q.label}" if q else "-fp" for q in (quant, draft_quant)) if quant or draft_quant else ""
    return store_dir("profiles") / (f"{machine[:12]}-{device.type}-{dname}-{shape_id(target)}-"
                                    f"{shape_id(draft) if draft is not None else 'nodraft'}{formats}.json")


def run_profile(target: ModelArgs, draft: ModelArgs | None, device: torch.device, dtype: torch.dtype, *,
                grid: Sequence[int] = DEFAULT_GRID, prefix: int = DEFAULT_PREFIX, effort: Effort = Effort(),
                names: tuple[str, str | None] = ("target", None), progress: bool = False,
                log: Callable[[str], None] = lambda s: None, quant: QuantSpec | None = None,
                draft_quant: QuantSpec | None = None) -> dict[str, Any]:
    """Measure everything a plan needs for this machine and model pair; returns the profile as a JSON dict.

    Quantized models (an AWQ / GPTQ checkpoint's own format, or `quant` / `draft_quant` for quantizing on
    load): layer bytes are the packed ones, and the layer curve runs the path the engine picks per token count,
    from the int kernel against dequantize + matmul timings stored as `quant_kernel`."""
    grid = _check_grid(grid)
    if prefix < 0:
        raise UsageError(f"prefix must be >= 0, got {prefix}")
    quant = quant or quant_spec_for(target, None, None, names[0])
    if draft is not None:
        draft_quant = draft_quant or quant_spec_for(draft, None, None, str(names[1]))
    fp = machine_fingerprint(device)
    layer_b = layer_bytes(target, dtype, quant)
    steps = 4 * len(grid) + (len(grid) if draft is not None else 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="profiling", unit="point", leave=False, file=sys.stderr)
    tick = bar.update if bar is not None else None
    try:
        log(f"measuring {'pinned host-to-device' if device.type == 'cuda' else 'memcpy'} bandwidth")
        bandwidth = measure_bandwidth(device, effort)
        layer_copy = copy_time(layer_b, device, effort)
        times = kernel_times(target, quant, dtype, device)
        # The path the engine will take for each token count (model/quantization.py), so the curves time it.
        kernel = exact_kernel_choice(times.choice("planner profile"), dtype, device) if times is not None else None
        log(f"timing one {names[0]} decoder layer for {grid[0]}..{grid[-1]} tokens")
        layer_s = layer_time_curve(target, dtype, device, grid, prefix=prefix, effort=effort, progress=tick,
                                   quant=quant, kernel=kernel)
        head_s = head_time_curve(target, dtype, device, grid, effort=effort, progress=tick)
        host_s = host_time_curve(target, device, grid, prefix=prefix, effort=effort, progress=tick)
        warp_s = warp_time_curve(target.vocab_size, device, grid, effort=effort, progress=tick)
        level_s = None
        if draft is not None:
            log(f"timing the draft {names[1]} per tree level")
            level_s = draft_level_curve(draft, dtype, device, grid, prefix=prefix, effort=effort, progress=tick,
                                        quant=draft_quant)
    finally:
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "kind": "profile",
        "version": PROFILE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": fp,
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "target": {"name": names[0], "shape": shape_fields(target), "shape_id": shape_id(target)},
        "draft": None if draft is None else {"name": names[1], "shape": shape_fields(draft), "shape_id": shape_id(draft)},
        "bandwidth_Bps": bandwidth,
        "bandwidth_copy_bytes": effort.copy_bytes,
        "pinned": device.type == "cuda",
        "layer_bytes": layer_b,
        "quant": quant.label if quant else None,
        "draft_quant": draft_quant.label if draft_quant else None,
        "quant_kernel": None if times is None else {**times.to_json(), "max_tokens": kernel.max_tokens},
        "layer_copy_s": layer_copy,
        "prefix": prefix,
        "threads": torch.get_num_threads(),
        "effort": asdict(effort),
        "grid": grid,
        "layer_s": layer_s,
        "head_s": head_s,
        "host_s": host_s,
        "warp_s": warp_s,
        "draft_level_s": level_s,
    }


def check_profile(profile: dict[str, Any], device: torch.device, dtype: torch.dtype, target: ModelArgs,
                  draft: ModelArgs | None, where: str) -> None:
    """A profile given by hand must describe the device, dtype and model shapes being planned for."""
    want = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "target": shape_id(target),
            "draft": shape_id(draft) if draft is not None else None}
    have = {"device": profile.get("device"), "dtype": profile.get("dtype"),
            "target": (profile.get("target") or {}).get("shape_id"),
            "draft": (profile.get("draft") or {}).get("shape_id")}
    wrong = [f"{k} {have[k]} (need {want[k]})" for k in want if have[k] != want[k]]
    if wrong:
        raise UsageError(f"profile {where} does not fit this plan: {', '.join(wrong)}; profile again with "
                         f"`python -m planner profile` and the same --model, --draft, --device and --dtype")


def read_profile(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read profile {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not a planner profile (not JSON); give one made by `python -m planner profile`") \
            from None
    need = ("grid", "layer_s", "head_s", "host_s", "warp_s", "layer_bytes", "layer_copy_s", "machine", "device",
            "dtype")
    missing = [k for k in need if k not in data] if isinstance(data, dict) else list(need)
    if missing or data.get("kind") != "profile":
        raise UsageError(f"{path} is not a planner profile (missing {', '.join(missing) or 'kind'}); "
                         f"give one made by `python -m planner profile`")
    return data


def is_current(profile: dict[str, Any]) -> bool:
    """Made by this version of the profiler (older ones lack curves the optimiser now uses)."""
    return profile.get("version") == PROFILE_VERSION


def shortfall(profile: dict[str, Any], grid: Sequence[int], prefix: int, effort: Effort) -> str | None:
    """Why a current profile does not answer a request (None: it does): token counts of `grid` it did not time,
    another prefix, or less effort (a --quick profile, which shares the full one's path in the store)."""
    assert is_current(profile), profile.get("version")
    missing = sorted(set(grid) - set(profile["grid"]))
    if missing:
        return f"has no timings for {', '.join(map(str, missing[:6]))}{' ...' if len(missing) > 6 else ''} tokens"
    if profile.get("prefix") != prefix:
        return f"was timed against a prefix of {profile.get('prefix')} tokens, not {prefix}"
    try:
        done = Effort(**profile["effort"])
    except (KeyError, TypeError):
        return "does not record how carefully it was measured"
    return None if done.at_least(effort) else "is a quick one (--quick)"
