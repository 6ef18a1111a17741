"""Where each decoder layer lives: on the device (resident), in host RAM, or in the disk store, from the device
budget and the host budget. Every layer has exactly one source."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import ResourceError, UsageError
from .memory import DeviceBudget, activation_bytes, device_free_memory, fmt_bytes
from .model.config import ModelArgs
from .model.quantization import QuantSpec
from .model.transformer import packs_head
from .weights.disk import DEFAULT_PREFETCH, padded_bytes
from .weights.layout import layer_bytes, model_bytes


@dataclass(frozen=True)
class Residency:
    offload: bool
    resident: tuple[int, ...]  # decoder layers kept on the device
    slots: int
    budget: DeviceBudget | None
    host: tuple[int, ...] = ()  # streamed layers held in host RAM
    disk: tuple[int, ...] = ()  # streamed layers read from the disk store every sweep
    prefetch: int = 0  # staging buffers the disk layers are read ahead into (0: no disk tier)

    def __post_init__(self) -> None:
        assert not set(self.resident) & set(self.host) and not set(self.host) & set(self.disk) \
            and not set(self.resident) & set(self.disk), "a layer has one source"
        assert (self.prefetch >= 1) == bool(self.disk), (self.prefetch, self.disk)

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(sorted(self.host + self.disk))

    def split(self, n_layers: int) -> "Residency":
        """This residency with every layer's source named: one made without a host/disk split (host and disk
        empty, as before the disk tier) streams every non-resident layer from host RAM."""
        if not self.offload or self.host or self.disk:
            return self
        return replace(self, host=tuple(i for i in range(n_layers) if i not in self.resident))


def split_host_disk(streamed: tuple[int, ...], layer_b: int, host_budget: int | None,
                    prefetch: int = DEFAULT_PREFETCH) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(host layers, disk layers, staging buffers) of the streamed layers under a host budget.

    All stay in RAM when they fit. Otherwise the budget holds the disk tier's `prefetch` staging buffers first
    and as many layers as fit beside them; the disk layers are spread among the streamed ones, so compute on
    host layers keeps the readers busy between disk layers.
    """
    if host_budget is None or len(streamed) * layer_b <= host_budget:
        return tuple(streamed), (), 0
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise UsageError(f"prefetch (staging buffers for disk layers) must be a whole number >= 1, got {prefetch!r}")
    per_file = padded_bytes(layer_b)
    ring = prefetch * per_file
    if host_budget < ring:
        raise ResourceError(
            f"a host memory budget of {fmt_bytes(host_budget)} is too small for the {prefetch} staging buffers the "
            f"disk layers are read through ({fmt_bytes(ring)}); give --host-memory (host_memory=) at least "
            f"{fmt_bytes(ring)} (each {fmt_bytes(per_file)} more keeps one more layer in RAM)"
            + (", or lower prefetch (prefetch=, in Python)" if prefetch > 1 else ""))
    n_disk = len(streamed) - (host_budget - ring) // per_file
    disk = tuple(streamed[k] for k in spread(len(streamed), n_disk))
    return tuple(i for i in streamed if i not in disk), disk, prefetch


def spread(n_layers: int, count: int) -> tuple[int, ...]:
    """`count` layer indices spread evenly over the model, so resident layers interleave with streamed ones."""
    count = max(0, min(count, n_layers))
    return tuple(int((k + 0.5) * n_layers / count) for k in range(count))


def fixed_device_bytes(args: ModelArgs, dtype: torch.dtype, *, draft_args: ModelArgs | None, batch: int,
                       max_seq_len: int, tree_size: int, max_chunk: int, slots: int, on_cuda: bool,
                       quant: QuantSpec | None = None, draft_quant: QuantSpec | None = None,
                       draft_shares_globals: bool = False) -> dict[str, int]:
    """Everything the device holds besides resident target layers; `quant` / `draft_quant`: the target's and the
    draft's packed formats (None: float layers); `draft_shares_globals`: the draft uses the target's embedding, norm
    and head (a self-draft), so only its layers count."""
    size = dtype.itemsize
    tokens = max(tree_size, min(max_chunk, max_seq_len))
    act = activation_bytes(args, tokens, max_seq_len, dtype, batch)
    if on_cuda:  # the memory-efficient kernel never forms the score matrix (model.py: attention masks)
        act -= batch * args.n_heads * tokens * max_seq_len * 4
        act += batch * (args.n_heads // args.n_kv_heads) * tokens * max_seq_len * size  # the folded mask
    fixed = {
        "embeddings and head": args.global_numel() * size,
        "target KV cache": args.kv_bytes_per_token(dtype) * batch * (max_seq_len + 1),
        "staging slots": slots * layer_bytes(args, dtype, quant),
        "activations": act,
    }
    head_copy = packs_head(dtype, "cuda" if on_cuda else "cpu")  # the head again, pre-blocked (packed_head)
    if head_copy:
        fixed["head, pre-blocked copy"] = args.vocab_size * args.dim * size
    if quant is not None or draft_quant is not None:
        # Dequantize + matmul holds the widest linear dequantized (worked in float32, then in the dtype).
        widest = max(math.prod(s) for a in (args, draft_args) if a is not None for s in a.layer_shapes().values())
        fixed["dequantize scratch"] = widest * (4 + size)
    if draft_args is not None:
        fixed["draft"] = draft_args.n_layers * layer_bytes(draft_args, dtype, draft_quant) if draft_shares_globals \
            else model_bytes(draft_args, dtype, draft_quant)
        fixed["draft KV cache"] = draft_args.kv_bytes_per_token(dtype) * batch * (max_seq_len + 1)
        if head_copy and not draft_shares_globals:
            fixed["draft head, pre-blocked copy"] = draft_args.vocab_size * draft_args.dim * size
    return fixed


def device_budget_bytes(budget_bytes: int | None, device: torch.device) -> int | None:
    """The device memory a load may plan with: the given budget, else (CUDA) the free memory less headroom for
    the allocator and the CUDA context; None on the CPU without a budget (no limit is simulated)."""
    if budget_bytes is None and device.type == "cuda":
        return int(device_free_memory(device) * 0.92)
    return budget_bytes


def choose_residency(args: ModelArgs, dtype: torch.dtype, device: torch.device, *, offload: bool | None,
                     budget_bytes: int | None, fixed: dict[str, int], slots: int,
                     resident_layers: int | None = None, host_budget: int | None = None,
                     prefetch: int = DEFAULT_PREFETCH, quant: QuantSpec | None = None) -> Residency:
    """Decide whether to stream, how many layers stay resident, and which streamed layers the host budget keeps in
    RAM (the rest are read from the disk store, split_host_disk). `quant`: the target's packed format.

    offload=None decides by itself: stream when the whole target does not fit the budget (the given
    gpu_memory, else the device's free memory; on the CPU without a budget nothing streams unless the decoder
    layers exceed the host budget).
    """
    per_layer = layer_bytes(args, dtype, quant)
    budget_bytes = device_budget_bytes(budget_bytes, device)
    no_slots = {k: v for k, v in fixed.items() if k != "staging slots"}
    if offload is None:
        whole = sum(no_slots.values()) + args.n_layers * per_layer
        offload = (budget_bytes is not None and whole > budget_bytes) or \
            (device.type == "cpu" and host_budget is not None and args.n_layers * per_layer > host_budget)
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
        if device.type != "cuda":  # the budget only simulates a device's memory here: the CPU holds it all
            raise ResourceError(
                f"the --gpu-memory budget {fmt_bytes(budget_bytes)} is too small to stream this model on the CPU: "
                f"it needs {fmt_bytes(budget.fixed_bytes)} besides the layers ({budget.describe()}); on the CPU "
                f"leave --gpu-memory out (every layer stays in RAM), or raise it"
            )
        raise ResourceError(
            f"not enough GPU memory to stream this model: it needs {fmt_bytes(budget.fixed_bytes)} besides the "
            f"layers ({budget.describe()}) but the budget is {fmt_bytes(budget_bytes)}; lower max_seq_len or "
            f"batch_size, use a smaller draft, or raise --gpu-memory"
        )
    if resident_layers is None:
        resident_layers = min(args.n_layers, budget.layers_that_fit()) if budget_bytes is not None else 0
    resident = spread(args.n_layers, resident_layers)
    host, disk, ring = split_host_disk(tuple(i for i in range(args.n_layers) if i not in resident), per_layer,
                                       host_budget, prefetch)
    return Residency(True, resident, slots, budget, host, disk, ring)
