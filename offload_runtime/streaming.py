"""Stream decoder layers from host memory through K device slots, each copy overlapped with compute.

Host side: every streamed layer is one contiguous (pinned) buffer holding all its tensors at aligned offsets, so
one copy moves a layer. Device side: K slots the size of a layer. Streamed layers are loaded in a cyclic order
that runs across sweeps: load number t goes to slot t % K, and is issued as soon as the compute that used that
slot (load t - K) is enqueued. So when a sweep's last layers compute, the first layers of the next sweep are
already copying while the host verifies and the draft grows the next tree.

On CUDA: copies run on their own stream; "copy t done" and "slot free" are events; the host never waits inside
a sweep and nothing moves device-to-host. On the CPU the same schedule runs with synchronous copies, so the slot
logic is exercised by tests on machines without a GPU.
"""
from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from .checkpoint import Checkpoint
from .config import ModelArgs
from .memory import itemsize
from .model import LayerWeights

ALIGN_BYTES = 256


# --- host store


def layer_layout(args: ModelArgs, dtype: torch.dtype) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """name -> (element offset, shape) inside one packed layer buffer, and the buffer's length in elements."""
    align = max(1, ALIGN_BYTES // itemsize(dtype))
    layout: dict[str, tuple[int, tuple[int, ...]]] = {}
    offset = 0
    for name, shape in args.layer_shapes().items():
        layout[name] = (offset, shape)
        numel = 1
        for s in shape:
            numel *= s
        offset += -(-numel // align) * align
    return layout, offset


def views(buffer: torch.Tensor, layout: Mapping[str, tuple[int, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (offset, shape) in layout.items():
        numel = 1
        for s in shape:
            numel *= s
        out[name] = buffer[offset: offset + numel].view(shape)
    return out


def alloc_host(numel: int, dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host tensor of exactly `numel` elements, page-locked when asked and allowed: (tensor, pinned).

    PyTorch's pinned allocator rounds every block up to a power of two (a 1.6 GiB 70B layer would take 2 GiB), so
    the buffer is allocated pageable and then registered with the driver (cudaHostRegister), which pins exactly
    its own pages; it is unregistered when the tensor is freed. Where registration is refused, the caching
    allocator's pinned memory is the fallback, then pageable memory.
    """
    buf = torch.empty(numel, dtype=dtype)
    if not pin or numel == 0:
        return buf, False
    try:
        cudart = torch.cuda.cudart()
        nbytes = numel * buf.element_size()
        if int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
            weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
            return buf, True
        _consume_cuda_error()
    except (RuntimeError, AttributeError, AssertionError):
        pass
    try:
        return torch.empty(numel, dtype=dtype, pin_memory=True), True
    except RuntimeError:
        return buf, False


def _consume_cuda_error() -> None:
    """A refused runtime call leaves its error pending in the thread, and torch would report it at its next
    kernel launch, wherever that is; torch binds no cudaGetLastError, so a throwaway launch takes it here."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


class HostLayerStore:
    """Decoder layers packed one contiguous buffer per layer in host memory (pinned when it can be)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, layer_ids: list[int], pin: bool):
        self.args, self.dtype = args, dtype
        self.layout, self.layer_numel = layer_layout(args, dtype)
        self.layer_ids = list(layer_ids)
        self.buffers: dict[int, torch.Tensor] = {}
        self.pinned = pin
        self._want_pin = pin

    @property
    def layer_bytes(self) -> int:
        return self.layer_numel * itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.layer_bytes * len(self.layer_ids)

    def _new_buffer(self) -> torch.Tensor:
        buf, pinned = alloc_host(self.layer_numel, self.dtype, self._want_pin)
        if self._want_pin and not pinned:
            warnings.warn("pinned host memory was refused; streaming from pageable memory (slower copies)",
                          RuntimeWarning, stacklevel=3)
            self._want_pin = self.pinned = False
        return buf

    def fill_from_checkpoint(self, ckpt: Checkpoint, progress: Callable[[int], None] | None = None) -> None:
        """Read each layer's tensors straight into its buffer: the model is never held twice."""
        for i in self.layer_ids:
            buf = self._new_buffer()
            for name, tensor in views(buf, self.layout).items():
                ckpt.read_into(f"model.layers.{i}.{name}", tensor)
            self.buffers[i] = buf
            if progress:
                progress(1)

    def fill_random(self, seed: int, std: float = 0.02) -> None:
        """Random weights (benchmarks of published shapes without files): one layer drawn, the rest copies."""
        g = torch.Generator().manual_seed(seed)
        first = None
        for i in self.layer_ids:
            buf = self._new_buffer()
            if first is None:
                for name, t in views(buf, self.layout).items():
                    if name.endswith("layernorm.weight"):
                        t.fill_(1.0)
                    else:
                        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)
                first = buf
            else:
                buf.copy_(first)
            self.buffers[i] = buf


# --- the sweep


@dataclass
class SweepStats:
    bytes: int = 0  # host-to-device bytes copied for this sweep's layers
    wall_s: float = 0.0
    wait_s: float = 0.0  # time the compute stream stood waiting for copies
    layers: int = 0
    _events: list = field(default_factory=list, repr=False)

    @property
    def gbps(self) -> float:
        return self.bytes / self.wall_s / 1e9 if self.wall_s > 0 else 0.0


class StreamedLayers:
    """A LayerSource whose non-resident layers arrive through K device slots."""

    def __init__(self, n_layers: int, resident: dict[int, dict[str, torch.Tensor]], store: HostLayerStore,
                 device: torch.device, slots: int = 2):
        assert slots >= 1
        self.n_layers = n_layers
        self.resident = resident
        self.store = store
        self.device = torch.device(device)
        self.streamed = [i for i in range(n_layers) if i not in resident]
        assert sorted(self.streamed) == sorted(store.layer_ids), "every layer must be resident or in the store"
        self.K = min(slots, max(1, len(self.streamed)))
        self.cuda = self.device.type == "cuda"
        self.slot_buffers = [torch.empty(store.layer_numel, dtype=store.dtype, device=self.device)
                             for _ in range(self.K if self.streamed else 0)]
        self.slot_views = [views(b, store.layout) for b in self.slot_buffers]
        self.slot_layer: list[int | None] = [None] * len(self.slot_buffers)
        self.slot_copied = [False] * len(self.slot_buffers)  # did the load now in the slot move bytes?
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            # The slots come from the compute stream's memory pool: copies start after what it has queued, and
            # the allocator keeps a freed slot until the copies into it are done.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            for b in self.slot_buffers:
                b.record_stream(self.copy_stream)
            self.copy_done = [torch.cuda.Event() for _ in self.slot_buffers]
            self.slot_free = [torch.cuda.Event() for _ in self.slot_buffers]
        self._t = 0  # the next load to compute
        self._issued = 0  # loads issued so far
        self.history: list[SweepStats] = []
        self._resolved = 0  # history[:_resolved] holds seconds, no events
        self._current: SweepStats | None = None
        self._pending_copy_s = 0.0  # CPU: copy time spent ahead of the sweep that uses it
        if self.streamed:
            for t in range(self.K):
                self._issue(t)

    @property
    def bytes_per_sweep(self) -> int:
        return len(self.streamed) * self.store.layer_bytes

    def _issue(self, t: int) -> None:
        assert t == self._issued
        slot, layer = t % self.K, self.streamed[t % len(self.streamed)]
        self._issued += 1
        self.slot_copied[slot] = self.slot_layer[slot] != layer
        if not self.slot_copied[slot]:
            return  # already there (as many slots as streamed layers): nothing to move
        self.slot_layer[slot] = layer
        src, dst = self.store.buffers[layer], self.slot_buffers[slot]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.slot_free[slot])
                dst.copy_(src, non_blocking=True)
                self.copy_done[slot].record(self.copy_stream)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            self._pending_copy_s += time.perf_counter() - t0

    def sweep(self) -> Iterator[tuple[int, LayerWeights]]:
        self._resolve(block=False)  # so a long session holds events only for sweeps still in flight
        stats = SweepStats()
        t_start = time.perf_counter()
        wait_s = self._pending_copy_s
        self._pending_copy_s = 0.0
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            start.record(compute)
        for i in range(self.n_layers):
            if i in self.resident:
                yield i, self.resident[i]
                continue
            t = self._t
            slot = t % self.K
            assert self.slot_layer[slot] == i and self._issued > t
            if self.cuda:
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before.record(compute)
                compute.wait_event(self.copy_done[slot])
                after.record(compute)
                stats._events.append((before, after))
            else:
                wait_s += self._pending_copy_s
                self._pending_copy_s = 0.0
            stats.bytes += self.store.layer_bytes if self.slot_copied[slot] else 0
            yield i, self.slot_views[slot]
            # The consumer has enqueued every kernel that reads this slot: free it, refill it.
            if self.cuda:
                self.slot_free[slot].record(compute)
            self._t += 1
            self._issue(t + self.K)
            stats.layers += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(compute)
            stats._events.insert(0, (start, end))
        else:
            stats.wall_s = time.perf_counter() - t_start
            stats.wait_s = wait_s
        self.history.append(stats)

    def _resolve(self, block: bool) -> None:
        """Turn recorded CUDA events into seconds, oldest sweep first; without `block`, only finished sweeps."""
        while self._resolved < len(self.history):
            s = self.history[self._resolved]
            if s._events:
                (start, end), waits = s._events[0], s._events[1:]
                if not block and not end.query():
                    return
                end.synchronize()
                s.wall_s = start.elapsed_time(end) / 1e3
                s.wait_s = sum(b.elapsed_time(a) for b, a in waits) / 1e3
                s._events = []
            self._resolved += 1

    def resolve_stats(self) -> list[SweepStats]:
        """Every sweep's stats, in seconds (waits for the sweeps still running on the device)."""
        self._resolve(block=True)
        return self.history
