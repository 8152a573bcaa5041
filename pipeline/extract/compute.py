"""The work of one shard, without Ray: the pieces that the Ray job distributes and the single-process path runs
in a loop. decode (CPU) -> teachers (device) -> encode -> join on sample ids -> store writer.

The sample id travels with the data at every step: a decoded batch names the id of every pixel row, the teachers'
targets come back with those ids, and the shard is assembled by joining on ids, asserting that every sample is
accounted for exactly once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.extract.decode import DecodedBatch, decode_batch
from store import RunManifest, ShardResult, encodings


@dataclass
class BatchTargets:
    """Encoded targets of the good samples of one decoded batch: row k of every array belongs to ids[k]."""

    ids: list[str]
    values: dict[str, np.ndarray]
    scales: dict[str, np.ndarray | None]
    errors: dict[str, dict[str, str]]  # task -> {sample id: reason} for targets that are not valid
    seconds: float  # device time, for the starvation report
    teachers: dict[str, dict] = field(default_factory=dict)  # task -> what computed it (TeacherSet.provenance)


def compute_batch(teacher_set, batch: DecodedBatch | dict, encoding_by_task: dict[str, str]) -> BatchTargets:
    """Run the teachers on a decoded batch's pixels (or its `pixel_payload()`; decoded images get the recipes
    on the teachers' device first) and encode the outputs."""
    payload = batch.pixel_payload() if isinstance(batch, DecodedBatch) else batch
    ids = payload["ids"]
    t0 = time.perf_counter()
    pixels = teacher_set.run_recipes(payload["images"]) if "images" in payload else payload["pixels"]
    outs, row_errors = teacher_set.run(pixels)
    values, scales = {}, {}
    for task, out in outs.items():
        if len(out) != len(ids):
            raise RuntimeError(f"{task}: the teacher returned {len(out)} rows for {len(ids)} samples")
        values[task], scales[task] = encodings.encode(out, encoding_by_task[task])
    errors = {t: {ids[row]: reason for row, reason in errs.items()} for t, errs in row_errors.items()}
    prov = teacher_set.provenance()
    return BatchTargets(list(ids), values, scales, errors, time.perf_counter() - t0,
                        {t: prov[t] for t in outs if t in prov})


def assemble_shard(manifest: RunManifest, shard: int, tasks: tuple[str, ...], batches: list[DecodedBatch],
                   targets: list[BatchTargets], seconds: float = 0.0) -> ShardResult:
    """Join the batches' targets to the shard's samples on their ids. Every sample of the shard must come
    exactly once, every good one with exactly one target row per task, and no target may name a sample that
    is not in the shard or failed to decode; anything else is a bug upstream and fails the shard loudly."""
    samples = sorted((s for b in batches for s in b.samples), key=lambda s: s.index)
    start, stop = manifest.shard_range(shard)
    if [s.index for s in samples] != list(range(start, stop)):
        raise RuntimeError(f"shard {shard}: the decoded samples are not exactly indices {start}..{stop - 1}")
    row_of = {s.id: pos for pos, s in enumerate(samples)}
    if len(row_of) != len(samples):
        raise RuntimeError(f"shard {shard}: a sample id occurs twice")
    good = {s.id for s in samples if s.error is None}
    n = len(samples)
    values, scales, valid, task_errors = {}, {}, {}, {}
    for t in tasks:
        lay = manifest.tasks[t]
        enc = encodings.get(lay.encoding)
        values[t] = np.zeros((n, *lay.shape), dtype=enc.values_dtype)
        scales[t] = np.zeros((n, lay.shape[0]), dtype=np.float32) if enc.scaled else None
        valid[t] = np.zeros(n, dtype=bool)
        task_errors[t] = {}
        seen: set[str] = set()
        for bt in targets:
            for k, sid in enumerate(bt.ids):
                if sid not in good:
                    raise RuntimeError(f"shard {shard} {t}: a target for {sid!r}, which is not a good sample of "
                                       f"this shard")
                if sid in seen:
                    raise RuntimeError(f"shard {shard} {t}: two targets for sample {sid!r}")
                seen.add(sid)
                pos = row_of[sid]
                reason = bt.errors.get(t, {}).get(sid)
                if reason is not None:
                    task_errors[t][pos] = reason
                    continue
                values[t][pos] = bt.values[t][k]
                if scales[t] is not None:
                    scales[t][pos] = bt.scales[t][k]
                valid[t][pos] = True
        if seen != good:
            raise RuntimeError(f"shard {shard} {t}: no target for {sorted(good - seen)[:5]}")
    return ShardResult(shard, tasks, samples, values, scales, valid, task_errors, seconds, made_by(shard, targets))


def made_by(shard: int, targets: list[BatchTargets]) -> dict[str, dict]:
    """What computed each task of the shard; every batch of a task must name the same teacher."""
    out: dict[str, dict] = {}
    for bt in targets:
        for t, prov in bt.teachers.items():
            if out.setdefault(t, prov) != prov:
                raise RuntimeError(f"shard {shard} {t}: its batches were computed by different teachers ({out[t]} "
                                   f"and {prov})")
    return out


def batches_of(records: list, batch_size: int) -> list[list]:
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


def compute_shard(records: list, specs: list, teacher_set, encoding_by_task: dict[str, str], batch_size: int,
                  resize_on: str = "cpu") -> tuple[list[DecodedBatch], list[BatchTargets]]:
    """One shard in one process, batch after batch: what the Ray job distributes (decode tasks, actors), as
    the single-process reference, the tests and the benchmarks run it. Join with `assemble_shard`."""
    metas, targets = [], []
    for chunk in batches_of(records, batch_size):
        d = decode_batch(chunk, specs, resize_on=resize_on)
        metas.append(d)
        targets.append(compute_batch(teacher_set, d, encoding_by_task))
    return metas, targets
