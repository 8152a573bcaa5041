"""The single-process reference store: the straightforward way to compute a store (one process, shard after shard,
batch after batch), which the Ray job must equal byte for byte. The tests compare against it; the benchmarks
build their stores with it."""

from __future__ import annotations

from pathlib import Path

import torch

import store
from pipeline.extract.compute import assemble_shard, compute_shard
from pipeline.extract.plan import make_plan
from recipes.manifest import TASKS, load_manifest
from recipes.weights_files import manifest_files_sha256

BATCH = 4  # images per teacher batch


def reference_store(path: Path, dataset, manifest_path: Path, tasks=TASKS, shard: int = 8,
                    teachers_yaml: bool = False) -> Path:
    """The straightforward way: one process, shard after shard, batch after batch."""
    from teachers.registry import TeacherSet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's actors (--torch-threads 1): the same kernels, the same bytes
    try:
        json_path, images = dataset
        plan = make_plan(json_path, images, shard)
        manifest = load_manifest(manifest_path)
        teachers = TeacherSet.load(manifest, tasks)
        layouts = {t: store.TaskLayout.for_shape(manifest.teachers[t].output_shape, "fp16") for t in tasks}
        m = store.RunManifest(dataset=plan.source.dataset_info(), num_samples=plan.num_samples, shard_size=shard,
                              formats=["zarr", "wds"], tasks=layouts)
        # teachers.yaml as the Ray job records it; the extraction tests compare data files only
        identity = manifest.identity(list(tasks), teachers.weights_sha256(),
                                     files_sha256=manifest_files_sha256(manifest, tasks)) if teachers_yaml else None
        w = store.StoreWriter.create(path, m, identity)
        specs = [manifest.teachers[t] for t in tasks]
        for i in range(plan.num_shards):
            metas, targets = compute_shard(plan.shard_records(i), specs, teachers,
                                           dict.fromkeys(tasks, "fp16"), BATCH)
            w.commit_shard(assemble_shard(m, i, tuple(tasks), metas, targets))
        return path
    finally:
        torch.set_num_threads(threads)
