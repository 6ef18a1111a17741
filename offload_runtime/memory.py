"""Memory sizes: parsing budgets, what a configuration needs on the device, what the host has."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import psutil
import torch

from .model.config import ModelArgs
from .errors import ResourceError, UsageError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int | float) -> int:
    """'20GiB', '512MB', '1.5GB' or a number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"a memory size cannot be negative: {value}; give bytes, or a size like 20GiB")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read memory size {value!r}; write it like 20GiB, 512MB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def available_host_memory() -> int:
    """Bytes of host RAM that can be allocated without swapping or the OOM killer.

    OFFLOAD_RUNTIME_MAX_HOST_MEMORY (e.g. "48GiB") caps it, for machines shared with other jobs.
    """
    available = psutil.virtual_memory().available
    cap = os.environ.get("OFFLOAD_RUNTIME_MAX_HOST_MEMORY")
    if not cap:
        return available
    try:
        return min(available, parse_bytes(cap))
    except UsageError as e:
        raise UsageError(f"OFFLOAD_RUNTIME_MAX_HOST_MEMORY={cap!r}: {e}; or unset it") from None


def check_host_memory(need: int, what: str, fix: str) -> None:
    """Stop with a clear error, before allocating, when `need` bytes of RAM are not there; `fix` says what to do."""
    have = available_host_memory()
    if need > have:
        raise ResourceError(f"{what} needs {fmt_bytes(need)} of host RAM but only {fmt_bytes(have)} is available; "
                            f"{fix}")


def device_free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available_host_memory()


def activation_bytes(args: ModelArgs, tokens: int, context: int, dtype: torch.dtype, batch: int = 1) -> int:
    """A generous bound on the temporaries of one forward over `tokens` new tokens per row against `context`."""
    size = dtype.itemsize
    T = tokens * batch
    hidden = T * (6 * args.dim + 3 * args.intermediate_size + args.q_size + 2 * args.kv_size) * size
    scores = batch * args.n_heads * tokens * context * 4  # a math-path attention matrix in float32
    logits = T * args.vocab_size * 4 * 3  # logits, P and Q rows in float32
    return hidden + scores + logits


@dataclass(frozen=True)
class DeviceBudget:
    """What the device must hold besides the target's decoder layers, and how many layers fit beside it."""

    total: int
    fixed: dict[str, int]  # name -> bytes: globals, draft, caches, slots, activations
    layer_bytes: int

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    def layers_that_fit(self) -> int:
        return max(0, (self.total - self.fixed_bytes) // self.layer_bytes) if self.layer_bytes else 0

    def describe(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.fixed.items() if v)
        return f"budget {fmt_bytes(self.total)}: {parts}; {fmt_bytes(self.layer_bytes)} per decoder layer"
