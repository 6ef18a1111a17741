"""Which decoder layers stay on the device and which stream from host RAM, from the device budget."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ResourceError
from .memory import DeviceBudget, activation_bytes, device_free_memory, fmt_bytes
from .model.config import ModelArgs
from .model.quantization import QuantSpec
from .model.transformer import folds_groups
from .weights.layout import layer_bytes, model_bytes


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
                       max_seq_len: int, tree_size: int, max_chunk: int, slots: int, on_cuda: bool,
                       quant: QuantSpec | None = None, draft_quant: QuantSpec | None = None) -> dict[str, int]:
    """Everything the device holds besides resident target layers; `quant` / `draft_quant`: the target's and the
    draft's packed formats (None: float layers)."""
    size = dtype.itemsize
    tokens = max(tree_size, min(max_chunk, max_seq_len))
    act = activation_bytes(args, tokens, max_seq_len, dtype, batch)
    if on_cuda:  # the memory-efficient kernel never forms the score matrix (model.py: attention masks)
        act -= batch * args.n_heads * tokens * max_seq_len * 4
        if folds_groups(args, torch.device("cuda")):
            act += batch * (args.n_heads // args.n_kv_heads) * tokens * max_seq_len * size  # the folded mask
    fixed = {
        "embeddings and head": args.global_numel() * size,
        "target KV cache": args.kv_bytes_per_token(dtype) * batch * (max_seq_len + 1),
        "staging slots": slots * layer_bytes(args, dtype, quant),
        "activations": act,
    }
    if quant is not None or draft_quant is not None:
        # Dequantize + matmul holds the widest linear dequantized (worked in float32, then in the dtype).
        widest = max(math.prod(s) for a in (args, draft_args) if a is not None for s in a.layer_shapes().values())
        fixed["dequantize scratch"] = widest * (4 + size)
    if draft_args is not None:
        fixed["draft"] = model_bytes(draft_args, dtype, draft_quant)
        fixed["draft KV cache"] = draft_args.kv_bytes_per_token(dtype) * batch * (max_seq_len + 1)
    return fixed


def choose_residency(args: ModelArgs, dtype: torch.dtype, device: torch.device, *, offload: bool | None,
                     budget_bytes: int | None, fixed: dict[str, int], slots: int,
                     resident_layers: int | None = None, quant: QuantSpec | None = None) -> Residency:
    """Decide whether to stream and how many layers stay resident.

    offload=None decides by itself: stream when the whole target does not fit the budget (the given
    gpu_memory, else the device's free memory; on the CPU without a budget nothing streams).
    """
    per_layer = layer_bytes(args, dtype, quant)
    if budget_bytes is None and device.type == "cuda":
        budget_bytes = int(device_free_memory(device) * 0.92)  # headroom for the allocator and CUDA context
    no_slots = {k: v for k, v in fixed.items() if k != "staging slots"}
    if offload is None:
        whole = sum(no_slots.values()) + args.n_layers * per_layer
        offload = budget_bytes is not None and whole > budget_bytes
    if not offload:
        budget = DeviceBudget(budget_bytes or 0, no_slots, per_layer) if budget_bytes is not None else None
        if budget is not None and device.type == "cuda" and budget.layers_that_fit() < args.n_layers:
            raise ResourceError(
                f"the model does not fit the GPU ({budget.describe()}; {args.n_layers} layers needed); "
                f"turn offloading on (offload=True / drop --no-offload)"
            )
        return Residency(False, tuple(range(args.n_layers)), 0, budget)
    budget = DeviceBudget(budget_bytes if budget_bytes is not None else 0, fixed, per_layer)
    if budget_bytes is not None and budget.fixed_bytes > budget_bytes:
        raise ResourceError(
            f"not enough GPU memory to stream this model: it needs {fmt_bytes(budget.fixed_bytes)} besides the "
            f"layers ({budget.describe()}) but the budget is {fmt_bytes(budget_bytes)}; lower max_seq_len or "
            f"batch_size, use a smaller draft, or raise --gpu-memory"
        )
    if resident_layers is None:
        resident_layers = min(args.n_layers, budget.layers_that_fit()) if budget_bytes is not None else 0
    return Residency(True, spread(args.n_layers, resident_layers), slots, budget)
