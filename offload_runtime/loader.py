"""Build a Transformer from a checkpoint: which decoder layers stay on the device, which stream from host RAM."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .config import ModelArgs
from .errors import ResourceError
from .memory import DeviceBudget, activation_bytes, check_host_memory, device_free_memory, fmt_bytes, itemsize
from .model import ResidentLayers, Transformer, folds_groups
from .streaming import HostLayerStore, StreamedLayers, layer_layout
from .weights import load_globals, load_layer


@dataclass(frozen=True)
class Residency:
    offload: bool
    resident: tuple[int, ...]  # decoder layers kept on the device
    slots: int
    budget: DeviceBudget | None


def spread(n_layers: int, count: int) -> tuple[int, ...]:
    """`count` layer indices spread evenly over the model, so resident layers interleave with streamed ones."""
    count = max(0, min(count, n_layers))
    return tuple(int((k + 0.5) * n_layers / count) for k in range(count))


def fixed_device_bytes(args: ModelArgs, dtype: torch.dtype, *, draft_args: ModelArgs | None, batch: int,
                       max_seq_len: int, tree_size: int, max_chunk: int, slots: int, on_cuda: bool) -> dict[str, int]:
    """Everything the device holds besides resident target layers."""
    size = itemsize(dtype)
    layer_bytes = layer_layout(args, dtype)[1] * size
    tokens = max(tree_size, min(max_chunk, max_seq_len))
    act = activation_bytes(args, tokens, max_seq_len, dtype, batch)
    if on_cuda:  # the memory-efficient kernel never forms the score matrix (model.py: attention masks)
        act -= batch * args.n_heads * tokens * max_seq_len * 4
        if folds_groups(args, torch.device("cuda")):
            act += batch * (args.n_heads // args.n_kv_heads) * tokens * max_seq_len * size  # the folded mask
    fixed = {
        "embeddings and head": args.global_numel() * size,
        "target KV cache": args.kv_bytes_per_token(dtype) * batch * (max_seq_len + 1),
        "staging slots": slots * layer_bytes,
        "activations": act,
    }
    if draft_args is not None:
        fixed["draft"] = draft_args.n_params() * size
        fixed["draft KV cache"] = draft_args.kv_bytes_per_token(dtype) * batch * (max_seq_len + 1)
    return fixed


def choose_residency(args: ModelArgs, dtype: torch.dtype, device: torch.device, *, offload: bool | None,
                     budget_bytes: int | None, fixed: dict[str, int], slots: int,
                     resident_layers: int | None = None) -> Residency:
    """Decide whether to stream and how many layers stay resident.

    offload=None decides by itself: stream when the whole target does not fit the budget (the given
    gpu_memory, else the device's free memory; on the CPU without a budget nothing streams).
    """
    layer_bytes = layer_layout(args, dtype)[1] * itemsize(dtype)
    if budget_bytes is None and device.type == "cuda":
        budget_bytes = int(device_free_memory(device) * 0.92)  # headroom for the allocator and CUDA context
    no_slots = {k: v for k, v in fixed.items() if k != "staging slots"}
    if offload is None:
        whole = sum(no_slots.values()) + args.n_layers * layer_bytes
        offload = budget_bytes is not None and whole > budget_bytes
    if not offload:
        budget = DeviceBudget(budget_bytes or 0, no_slots, layer_bytes) if budget_bytes is not None else None
        if budget is not None and device.type == "cuda" and budget.layers_that_fit() < args.n_layers:
            raise ResourceError(
                f"the model does not fit the GPU ({budget.describe()}; {args.n_layers} layers needed); "
                f"turn offloading on (offload=True / drop --no-offload)"
            )
        return Residency(False, tuple(range(args.n_layers)), 0, budget)
    budget = DeviceBudget(budget_bytes if budget_bytes is not None else 0, fixed, layer_bytes)
    if budget_bytes is not None and budget.fixed_bytes > budget_bytes:
        raise ResourceError(
            f"not enough GPU memory to stream this model: it needs {fmt_bytes(budget.fixed_bytes)} besides the "
            f"layers ({budget.describe()}) but the budget is {fmt_bytes(budget_bytes)}; lower max_seq_len or "
            f"batch_size, use a smaller draft, or raise --gpu-memory"
        )
    if resident_layers is None:
        resident_layers = min(args.n_layers, budget.layers_that_fit()) if budget_bytes is not None else 0
    return Residency(True, spread(args.n_layers, resident_layers), slots, budget)


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, residency: Residency,
                progress=None) -> Transformer:
    """Load globals and resident layers onto the device; pack the rest into the host store."""
    args = ckpt.args
    tick = (lambda n: progress.update(n)) if progress is not None else None
    store = None
    if residency.offload:
        store = HostLayerStore(args, dtype, [i for i in range(args.n_layers) if i not in residency.resident],
                               pin=device.type == "cuda")
    # Checked before anything is allocated; on the CPU the "device" part lives in RAM too.
    on_host = 0 if device.type == "cuda" else (args.global_numel() + len(residency.resident) * args.layer_numel()) * itemsize(dtype)
    check_host_memory(on_host + (store.nbytes if store else 0),
                      f"{'streaming' if store else 'loading'} {ckpt.path.name} ({args.n_layers} layers, {dtype})")
    resident = {}
    for i in residency.resident:
        resident[i] = load_layer(ckpt, i, dtype, device)
        if tick:
            tick(1)
    globals_ = load_globals(ckpt, dtype, device)
    if store is None:
        return Transformer(args, globals_, ResidentLayers([resident[i] for i in range(args.n_layers)]), device)
    store.fill_from_checkpoint(ckpt, tick)
    return Transformer(args, globals_, StreamedLayers(args.n_layers, resident, store, device, residency.slots), device)
