"""The work of one shard, without Ray: the pieces that the Ray job distributes and the single-process path runs
in a loop. decode (CPU) -> teachers (device) -> encode -> assemble in dataset order -> store.commit_shard."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline import encodings, store
from pipeline.decode import DecodedBatch


@dataclass
class BatchTargets:
    """Encoded targets of the good samples of one decoded batch (rows in the order of those samples)."""

    values: dict[str, np.ndarray]
    scales: dict[str, np.ndarray | None]
    errors: dict[str, dict[int, str]]  # task -> {row among the good samples: reason}
    seconds: float  # device time, for the starvation report


def compute_batch(teacher_set, pixels: dict[str, np.ndarray], encoding_by_task: dict[str, str]) -> BatchTargets:
    t0 = time.perf_counter()
    outs, errors = teacher_set.run(pixels)
    values, scales = {}, {}
    for task, out in outs.items():
        values[task], scales[task] = encodings.encode(out, encoding_by_task[task])
    return BatchTargets(values, scales, errors, time.perf_counter() - t0)


def assemble_shard(manifest: dict, shard: int, tasks: tuple[str, ...], batches: list[DecodedBatch],
                   targets: list[BatchTargets], seconds: float = 0.0) -> store.ShardResult:
    """Scatter the batches' good rows back to their places in the shard; invalid rows stay zero."""
    samples = [s for b in batches for s in b.samples]
    n = len(samples)
    values, scales, valid, task_errors = {}, {}, {}, {}
    for t in tasks:
        layout = manifest["tasks"][t]
        enc = encodings.get(layout["encoding"])
        values[t] = np.zeros((n, *layout["shape"]), dtype=enc.values_dtype)
        scales[t] = np.zeros((n, layout["shape"][0]), dtype=np.float32) if enc.scaled else None
        valid[t] = np.zeros(n, dtype=bool)
        task_errors[t] = {}
    pos = 0
    for b, bt in zip(batches, targets, strict=True):
        good = [pos + k for k, s in enumerate(b.samples) if s.error is None]
        for t in tasks:
            if not good:
                continue
            values[t][good] = bt.values[t]
            if scales[t] is not None:
                scales[t][good] = bt.scales[t]
            valid[t][good] = True
            for row, reason in bt.errors.get(t, {}).items():
                valid[t][good[row]] = False
                values[t][good[row]] = 0
                task_errors[t][good[row]] = reason
        pos += len(b.samples)
    return store.ShardResult(shard, tasks, samples, values, scales, valid, task_errors, seconds)


def batches_of(records: list, batch_size: int) -> list[list]:
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
