"""Stream decoder layers from host memory through K device slots, each copy overlapped with compute.

Host side: every streamed layer is one contiguous (pinned) buffer holding all its tensors at aligned offsets
(weights/store.py), so one copy moves a layer. Device side: K slots the size of a layer. Streamed layers are
loaded in a cyclic order that runs across sweeps: load number t goes to slot t % K, and is issued as soon as the compute that used that
slot (load t - K) is enqueued. So when a sweep's last layers compute, the first layers of the next sweep are
already copying while the host verifies and the draft grows the next tree.

On CUDA: copies run on their own stream; "copy t done" and "slot free" are events; the host never waits inside
a sweep and nothing moves device-to-host. On the CPU the same schedule runs with synchronous copies, so the slot
logic is exercised by tests on machines without a GPU.

Disk layers (weights/disk.py) take the same slot path from a staging buffer instead of a host buffer: their
reads run ahead in reader threads (DiskReader), so a load whose bytes are not in yet is left pending and
copied as soon as they are, at the latest just before the layer computes. The host waits for the disk only
there (`disk_wait_s`), never at the end of a sweep: the next sweep's first disk layers keep reading while the
draft grows the tree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .model.transformer import LayerWeights
from .weights.disk import DiskReader, DiskTier
from .weights.store import HostLayerStore


@dataclass
class SweepStats:
    bytes: int = 0  # host-to-device bytes copied for this sweep's layers
    wall_s: float = 0.0
    wait_s: float = 0.0  # time the compute stream stood waiting for copies
    layers: int = 0
    disk_bytes: int = 0  # read from the disk store for this sweep's layers
    disk_wait_s: float = 0.0  # time the sweep stood waiting for disk reads
    _events: list = field(default_factory=list, repr=False)

    @property
    def gbps(self) -> float:
        return self.bytes / self.wall_s / 1e9 if self.wall_s > 0 else 0.0


class StreamedLayers:
    """A LayerSource whose non-resident layers arrive through K device slots, from host buffers (`store`) or from
    the disk store's staging buffers (`disk`)."""

    def __init__(self, n_layers: int, resident: dict[int, dict[str, torch.Tensor]], store: HostLayerStore,
                 device: torch.device, slots: int = 2, disk: DiskTier | None = None):
        assert slots >= 1
        self.n_layers = n_layers
        self.resident = resident
        self.store = store
        self.device = torch.device(device)
        self.streamed = [i for i in range(n_layers) if i not in resident]
        disk_layers = list(disk.layers) if disk is not None else []
        assert sorted(self.streamed) == sorted(store.layer_ids + disk_layers), \
            "every layer must be resident, in the host store or on disk"
        self.K = min(slots, max(1, len(self.streamed)))
        self.cuda = self.device.type == "cuda"
        self.disk: DiskReader | None = None
        if disk_layers:
            # With a slot per streamed layer, each is loaded once and stays: nothing to read after the first pass.
            self.disk = DiskReader(disk.files, [i for i in self.streamed if i in disk_layers], depth=disk.prefetch,
                                   threads=disk.threads, pin=self.cuda, repeat=self.K < len(self.streamed))
        self.slot_buffers = [torch.empty(store.layout.nbytes, dtype=torch.uint8, device=self.device)
                             for _ in range(self.K if self.streamed else 0)]
        self.slot_views = [store.layout.views(b) for b in self.slot_buffers]
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
        self._disk_issued = 0  # disk loads issued so far (DiskReader's load numbers)
        self._staged: dict[int, int] = {}  # load t -> its disk load, while its bytes are not yet in the slot
        self._disk_bytes: dict[int, int] = {}  # load t -> bytes read from disk for it
        if self.streamed:
            for t in range(self.K):
                self._issue(t)

    @property
    def bytes_per_sweep(self) -> int:
        return sum(self._layer_bytes(i) for i in self.streamed)

    def _layer_bytes(self, layer: int) -> int:
        return self.store.layout_of(layer).nbytes if layer in self.store.layouts else self.store.layer_bytes

    @property
    def disk_bytes_per_sweep(self) -> int:
        return len(self.disk.layers) * self.disk.files.file_bytes if self.disk is not None else 0

    def _issue(self, t: int) -> None:
        assert t == self._issued
        slot, layer = t % self.K, self.streamed[t % len(self.streamed)]
        self._issued += 1
        self.slot_copied[slot] = self.slot_layer[slot] != layer
        if not self.slot_copied[slot]:
            return  # already there (as many slots as streamed layers): nothing to move
        self.slot_layer[slot] = layer
        if self.store.args.ggml_types is not None:  # GGUF layers may differ in layout: the slot's views follow
            layout = self.store.layout_of(layer)
            self.slot_views[slot] = layout.views(self.slot_buffers[slot][: layout.nbytes])
        if self.disk is not None and layer in self.disk.layers:
            self._staged[t] = self._disk_issued
            self._disk_issued += 1
            self._fill_staged(block_until=None)
            return
        self._copy(slot, self.store.buffers[layer])

    def _copy(self, slot: int, src: torch.Tensor) -> None:
        dst = self.slot_buffers[slot][: src.numel()]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.slot_free[slot])
                dst.copy_(src, non_blocking=True)
                self.copy_done[slot].record(self.copy_stream)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            self._pending_copy_s += time.perf_counter() - t0

    def _fill_staged(self, block_until: int | None) -> float:
        """Copy pending disk loads whose bytes are in into their slots, oldest first; wait for the disk for loads up
        to `block_until`. Returns the seconds waited."""
        waited = 0.0
        for t in sorted(self._staged):
            d = self._staged[t]
            if not (block_until is not None and t <= block_until) and not self.disk.ready(d):
                break
            staged = self.disk.wait(d)
            assert staged.layer == self.slot_layer[t % self.K], (staged.layer, t)
            waited += staged.wait_s
            self._copy(t % self.K, staged.buffer)
            after = None
            if self.cuda:
                after = torch.cuda.Event()
                after.record(self.copy_stream)
            self.disk.release(d, after)
            self._disk_bytes[t] = staged.nbytes
            del self._staged[t]
        return waited

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
        self._skip_abandoned(compute if self.cuda else None)
        for i in range(self.n_layers):
            if i in self.resident:
                yield i, self.resident[i]
                continue
            t = self._t
            slot = t % self.K
            assert self.slot_layer[slot] == i and self._issued > t
            if self.disk is not None:
                stats.disk_wait_s += self._fill_staged(block_until=t)
                stats.disk_bytes += self._disk_bytes.pop(t, 0)
            if self.cuda:
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before.record(compute)
                compute.wait_event(self.copy_done[slot])
                after.record(compute)
                stats._events.append((before, after))
            else:
                wait_s += self._pending_copy_s
                self._pending_copy_s = 0.0
            stats.bytes += self._layer_bytes(i) if self.slot_copied[slot] else 0
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

    def _skip_abandoned(self, compute: "torch.cuda.Stream | None") -> None:
        """A forward that raised left its sweep part-way through the cycle of loads: pass over that sweep's
        remaining loads (each slot freed and refilled as if computed), so this sweep starts at its first layer."""
        while self.streamed and self._t % len(self.streamed):
            t = self._t
            if compute is not None:
                self.slot_free[t % self.K].record(compute)
            self._t += 1
            self._issue(t + self.K)

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
