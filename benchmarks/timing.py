"""The benchmarks' one way to time a repeated call: warm-up calls, then the median of timed calls, each ended by a
device synchronisation (a CUDA kernel launch returns before the work is done); what a call takes (the next
batch) is prepared before its timer starts. A stage that runs once (a plan, an index build, a job) is timed by the
wall clock around it, where it runs."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, min_calls: int = 3, min_s: float = 0.0, max_calls: int = 20, warmup: int = 1,
                   prepare=None) -> float:
    """Median seconds of `fn()` (`fn(prepare())` with `prepare`, called untimed) after `warmup` calls (kernels,
    caches, the allocator), over `min_calls` calls or more: calls go on until `min_s` has passed or `max_calls`
    were made."""
    def args() -> tuple:
        return (prepare(),) if prepare is not None else ()

    for _ in range(warmup):
        fn(*args())
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < min_s and len(times) < max_calls):
        a = args()
        sync(device)
        t0 = time.perf_counter()
        fn(*a)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
