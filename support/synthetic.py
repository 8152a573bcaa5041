"""Synthetic stores at any size, made without data: the run manifest, a record per shard (ids, byte ranges, a few bad
images), and each shard's tar as a sparse file of its recorded size in which only the samples asked for are
written, through the writer's low-level entry for such fixtures (StoreWriter.commit_sparse, fill_sparse). What the trainer reads at start (records or the index, the order, a first batch) is then real, at 30M
samples, in a few GB of disk. For the scale benchmark and tests; the targets are one gen token of 16 values."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

import store
from store import layout, tar
from store.codec import sample_members, sample_meta

TASK, SHAPE = "gen", (1, 16)
BAD_EVERY = 997  # every 997th sample's image was bad at extraction: never trained on
TEACHERS = {"format": 1, "name": "synthetic", "teachers": {}}


def sample_id(j: int) -> str:
    return f"{j:010d}"


def sample_bytes(j: int, shard: int) -> bytes:
    """Sample j's tar members (its json and its target), as the store's tar writer lays them out: the same number
    of bytes for every sample, so the records' byte ranges are arithmetic."""
    values = np.full(SHAPE, j % 1000, dtype=np.float16)  # the fp16 encoding stores the values as they are
    meta = sample_meta(sample_id(j), j, shard, {"id": sample_id(j)}, None, {TASK: True}, None)
    return tar.sample_bytes(sample_members(meta, None, {TASK: (values, None)}))


SAMPLE_BYTES = len(sample_bytes(0, 0))


def synthetic_store(path: Path, num_samples: int, shard_size: int = 256) -> Path:
    """The manifest, teachers.yaml and every shard's record and sparse tar (nothing of a sample is written:
    `materialize` writes the ones a reader will read)."""
    path = Path(path)
    m = store.RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=num_samples,
                          shard_size=shard_size, formats=["wds"],
                          tasks={TASK: store.TaskLayout(SHAPE, "fp16")})
    w = store.StoreWriter.create(str(path), m, TEACHERS)
    for i in range(m.num_shards):
        a, b = m.shard_range(i)
        n = b - a
        bad = [j for j in range(a, b) if j % BAD_EVERY == BAD_EVERY - 1]
        tar_bytes = n * SAMPLE_BYTES + 2 * tarfile.BLOCKSIZE
        rec = store.ShardRecord(
            shard=i, start=a, stop=b, tasks=[TASK], valid={TASK: n - len(bad)}, bad_images=len(bad),
            files={layout.tar_name(i): {"bytes": tar_bytes, "sha256": "0" * 64,
                                        "samples": [[k * SAMPLE_BYTES, SAMPLE_BYTES] for k in range(n)]}},
            errors=[{"id": sample_id(j), "index": j, "shard": i, "image": f"{j}.jpg", "task": None,
                     "reason": "synthetic"} for j in bad],
            ids=[sample_id(j) for j in range(a, b)], store_id=m.store_id)
        w.commit_sparse(rec)
    return path


def materialize(path: Path, indices, shard_size: int = 256) -> None:
    """Write the samples of global `indices` into their shards' sparse tars, at their recorded offsets."""
    w = store.StoreWriter.open(str(path))
    for j in sorted(int(x) for x in indices):
        shard, pos = divmod(j, shard_size)
        w.fill_sparse(shard, pos * SAMPLE_BYTES, sample_bytes(j, shard))
