"""What a run that trains some tasks reads per sample, against one that trains all three, on a local store and on an
S3 server (SeaweedFS on loopback).

    python -m benchmarks.task_reads [--samples 256] [--shard 64] [--micro 16]

The store: benchmarks/loader.py's, at the real target shapes in fp16 (gen 1 x 1024, depth 576 x 1024, seg 576 x
1536) with a 60 kB image a sample. Each row streams the same global batches through `store.TargetStream` (one
process, no workers) with the tasks it names; `bytes/sample` is what the stream fetched (its own count), samples/s
the wall rate of the whole pass. The trainer reads a sample's json and image members and the trained tasks' only
(store.index's task columns; docs/format.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import loader
from recipes.manifest import TASKS

ROWS = (list(TASKS), ["gen"], ["depth"], ["seg"], ["gen", "seg"], [])


def measure(url: str, tasks: list[str], micro: int, n: int) -> tuple[float, float]:
    """(bytes fetched a sample, samples/s) of one pass over the store's first n // micro micro-batches."""
    import store

    s = store.TargetStream(url, tasks, global_batch=micro, micro_batch=micro, seed=0, stop_step=n // micro)
    t0 = time.perf_counter()
    count = sum(len(b["rows"]) for b in s)
    return s.bytes_read / count, count / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--shard", type=int, default=64)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--no-s3", action="store_true", help="the local store only")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="olaf-bench-task-reads-"))
    urls = {"local": str(work / "store")}
    server = None
    if not a.no_s3:
        from support.s3server import bucket_for_benchmark

        server, urls["s3"] = bucket_for_benchmark(work / "seaweedfs")
    try:
        print(f"# bytes a sample the stream fetches, by the tasks it reads ({a.samples} samples, shards of {a.shard}, "
              f"micro-batches of {a.micro}; real target shapes, fp16, a 60 kB image)")
        print(f"{'backend':<8} {'tasks':<16} {'bytes/sample':>13} {'x all three':>12} {'samples/s':>10} "
              f"{'x all three':>12}")
        for backend, url in urls.items():
            loader.build(url, a.samples, a.shard)
            ref = None
            for tasks in ROWS:
                per, rate = measure(url, tasks, a.micro, a.samples)
                ref = ref or (per, rate)
                print(f"{backend:<8} {','.join(tasks) or '(none)':<16} {per:>13,.0f} {per / ref[0]:>11.3f}x "
                      f"{rate:>10.1f} {rate / ref[1]:>11.2f}x")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
