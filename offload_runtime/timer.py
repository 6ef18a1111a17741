"""Timing one piece of work, for measurements (the planner's profile, the kernel choice at load): the median of
repeated runs, timed by CUDA events on the compute stream (waiting on the end event only, never on the whole
device) or by perf_counter on the CPU. Decoding steps are timed apart, without waiting (decode/timing.py)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def median_seconds(fn: Callable[[], Any], device: torch.device, *, min_time: float = 0.0, max_repeats: int = 3,
                   warmup: int = 1) -> float:
    """Median seconds of fn(), repeated until `min_time` has passed (at least once) or `max_repeats` runs."""
    assert max_repeats >= 1
    for _ in range(warmup):
        fn()
    cuda = torch.device(device).type == "cuda"
    times: list[float] = []
    while len(times) < max_repeats and (sum(times) < min_time or not times):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
