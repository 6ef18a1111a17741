"""Reusable CPU buffers for the temporaries of one call (dequantize + matmul), one set per thread.

On the CPU a fresh allocation of a few megabytes comes from mmap whenever glibc's malloc decides so, and then
every page of it faults on first touch. Dequantizing bench-100m's int8 layers ran at 80 or at 230 ms a token
depending only on the allocator's state (0 or 73,000 page faults a token). Writing into the same buffers at every
call takes the allocator out of the loop. CUDA's caching allocator already reuses device memory, so only CPU
tensors are pooled; elsewhere `scratch` is torch.empty.

A pooled tensor is valid until the next `scratch` call with the same role on the same thread: callers use it at
once (the dequantize + matmul of quantized_linear and ggml_linear) and never hand it out. A model's forward never runs re-entrantly on
one thread, and each thread has its own pool, so two engines in two threads never share a buffer.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Callable

import torch

_local = threading.local()

Buffer = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]  # (role, shape, dtype) -> uninitialised


def buffers(device: torch.device, reuse: bool) -> Buffer:
    """Where one call's temporaries go: this thread's scratch (`reuse`), or fresh tensors a caller may keep."""
    if reuse:
        return functools.partial(scratch, device=device)
    return lambda role, shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of `shape` for temporary `role` (one buffer per role and dtype, grown to the
    largest request and kept: the steady state holds what one call's peak held anyway)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    pool: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("pool", {})
    n = math.prod(shape)
    buffer = pool.get((role, dtype))
    if buffer is None or buffer.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: writable inside inference mode and outside it
            buffer = pool[(role, dtype)] = torch.empty(n, dtype=dtype)
    return buffer[:n].view(shape)
