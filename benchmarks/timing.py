"""The benchmarks' one way to time a call: a warm-up call, then the median of timed calls, each ended by a device
synchronisation (a CUDA kernel launch returns before the work is done)."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, min_calls: int = 3, min_s: float = 0.0, max_calls: int = 20) -> float:
    """Median seconds of `fn()` after one warm-up call (kernels, caches, the allocator), over `min_calls` calls or
    more: calls go on until `min_s` has passed or `max_calls` were made."""
    fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < min_s and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
