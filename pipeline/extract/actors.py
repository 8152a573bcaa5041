"""The bodies Ray runs: the teacher actor (one per GPU), the decode task, the writer task, the verify task. Each
is plain code over pipeline.extract.decode / compute and the store; Ray only places and retries them."""

from __future__ import annotations

import os
import time

from pipeline.extract.compute import BatchTargets, assemble_shard, compute_batch
from pipeline.extract.decode import DecodedBatch, decode_batch
from store import ShardRecord, StoreWriter, check_files


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class TeacherActor:
    """Holds every teacher of the run on one device; `run` takes one decoded batch's pixels."""

    def __init__(self, manifest_path: str, fidelity: str, tasks: list[str], device: str, dtype: dict[str, str],
                 threads: int, encoding_by_task: dict[str, str], resize_on: str = "cpu"):
        import torch

        from recipes.manifest import load_manifest
        from teachers.registry import TeacherSet

        _quiet_transformers()
        torch.set_num_threads(max(1, threads))
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        manifest = load_manifest(manifest_path, fidelity=fidelity)
        self.teachers = TeacherSet.load(manifest, tasks, device=device,
                                        dtype={t: getattr(torch, d) for t, d in dtype.items()})
        self.encoding_by_task = encoding_by_task
        if resize_on == "device":  # the recipes will run here: prove them equal to this node's Pillow first
            from recipes import pil_exact

            bad = pil_exact.self_check({t: manifest.teachers[t].preprocess.ops for t in tasks}, device)
            if bad:
                raise RuntimeError(f"the device resizes of {', '.join(bad)} differ from this node's Pillow "
                                   f"{pil_exact.pillow_version()}; run with --resize-on cpu")
        self.busy = 0.0
        self.first = self.last = None
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({threads} threads)"

    def info(self) -> dict:
        return {"weights_sha256": self.teachers.weights_sha256(), "files_sha256": self.teachers.files_sha256,
                "pid": os.getpid(), "device": self.device_name}

    def run(self, payload: dict, tasks: list[str]) -> BatchTargets:
        """payload: {"ids": [...], "pixels": {task: uint8 (n, H, W, 3)}} or {"ids", "images"} (row k is sample
        ids[k])."""
        t = time.perf_counter()
        self.first = self.first or t
        subset = self.teachers.subset(tasks)
        if "pixels" in payload:
            payload = {"ids": payload["ids"], "pixels": {k: payload["pixels"][k] for k in tasks}}
        out = compute_batch(subset, payload, self.encoding_by_task)
        self.last = time.perf_counter()
        self.busy += self.last - t
        return out

    def utilisation(self) -> dict:
        span = (self.last - self.first) if self.first and self.last else 0.0
        return {"busy_s": self.busy, "span_s": span, "busy_fraction": self.busy / span if span else None}


def decode_task(records, specs, max_pixels, resize_on):
    b = decode_batch(records, specs, max_pixels, resize_on)
    return b.pixel_payload(), b.without_pixels()  # pixels (keyed by id) go to the actor, the rest to the writer


def write_task(writer: StoreWriter, shard: int, tasks: tuple[str, ...], previous: ShardRecord | None,
               meta_refs: list, target_refs: list, keep_images: bool = False) -> ShardRecord:
    """Join the shard's batches on sample ids and write its data (`keep_images`: a verified shard gaining tasks
    keeps the images it holds); the driver commits the record."""
    import ray

    metas: list[DecodedBatch] = ray.get(meta_refs)
    targets: list[BatchTargets] = ray.get(target_refs)
    result = assemble_shard(writer.manifest, shard, tasks, metas, targets, seconds=sum(t.seconds for t in targets))
    record = writer.write(result, previous, keep_images)
    record.extra.update(decode_cpu_s=sum(m.seconds for m in metas), teacher_s=sum(t.seconds for t in targets))
    return record


def verify_task(loc, record: ShardRecord, full: bool) -> list[str]:
    return check_files(loc, record, full=full)
