"""Phase timing of decoding steps without waiting for the device.

A device-wide `torch.cuda.synchronize` per phase would also wait for the copy stream, which by design is
already moving the next sweep's first layers while the host verifies and the draft drafts: timing would
serialise what streaming overlaps. So on CUDA a step's phase boundaries are events recorded on the compute
stream and read back later, once they have completed (`resolve`); on the CPU they are perf_counter readings.

    clock = StepClock(device)
    marks = clock.start()
    ...draft...;  marks.mark()
    ...sweep...;  marks.mark()
    ...commit...; marks.mark()
    clock.finish(marks, on_resolved)       # on_resolved(StepTimes) runs when the times are known
    clock.resolve(block=True)              # before reading statistics
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepTimes:
    draft_s: float = 0.0  # growing the trees
    sweep_s: float = 0.0  # the target's forward
    host_s: float = 0.0  # verification walk, cache compaction, bookkeeping
    steps: int = 0

    @property
    def total_s(self) -> float:
        return self.draft_s + self.sweep_s + self.host_s

    def add(self, other: "StepTimes") -> None:
        self.draft_s += other.draft_s
        self.sweep_s += other.sweep_s
        self.host_s += other.host_s
        self.steps += other.steps


class Marks:
    """The boundaries of one step's phases, in order."""

    def __init__(self, event_factory: Callable[[], object] | None):
        self._event = event_factory
        self.points: list = []
        self.mark()

    def mark(self) -> None:
        if self._event is None:
            self.points.append(time.perf_counter())
        else:
            e = self._event()
            e.record()  # on the current (compute) stream: no host wait
            self.points.append(e)


class StepClock:
    def __init__(self, device: torch.device, event_factory: Callable[[], object] | None = None):
        if event_factory is None and torch.device(device).type == "cuda":
            event_factory = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        self._event = event_factory
        self._pending: list[tuple[Marks, Callable[[StepTimes], None]]] = []

    @property
    def uses_events(self) -> bool:
        return self._event is not None

    def start(self) -> Marks:
        self.resolve(block=False)  # keep only the steps still in flight
        return Marks(self._event)

    def finish(self, marks: Marks, on_resolved: Callable[[StepTimes], None]) -> None:
        assert len(marks.points) == 4, "a step has three phases"
        self._pending.append((marks, on_resolved))
        if self._event is None:
            self.resolve(block=False)

    def resolve(self, block: bool) -> None:
        """Deliver the times of finished steps, oldest first; with `block`, wait for the ones in flight."""
        while self._pending:
            marks, deliver = self._pending[0]
            p = marks.points
            if self._event is None:
                d = [b - a for a, b in zip(p, p[1:])]
            else:
                if not block and not p[-1].query():
                    return
                p[-1].synchronize()  # this event only: the copy stream is not waited for
                d = [a.elapsed_time(b) / 1e3 for a, b in zip(p, p[1:])]
            self._pending.pop(0)
            deliver(StepTimes(draft_s=d[0], sweep_s=d[1], host_s=d[2], steps=1))
