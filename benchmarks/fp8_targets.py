"""What fp8 targets do to PT: the demo's training on fp16 vs fp8 stored targets, side by side.

    python -m benchmarks.fp8_targets [--samples 48] [--steps 40] [--work-dir DIR]

Builds the demo's sample data and tiny teachers, computes the targets once and stores them twice (fp16, lossless
for the teachers' half-precision outputs; fp8 e4m3 with a per-token scale, half the bytes), trains the same tiny
PT model from each with the same seed and data order, and prints the loss curves side by side (total and per
task) with their ratio, plus the stored bytes per sample. fp8 is an opt-in disk saving: this shows what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import store
from pipeline.extract.compute import assemble_shard, batches_of, compute_batch
from pipeline.extract.decode import decode_batch
from pipeline.extract.plan import make_plan
from pipeline.sample import generate
from recipes.manifest import TASKS, load_manifest

REPO = Path(__file__).resolve().parents[1]



def build_stores(work: Path, json_path: Path, images: Path, manifest_path: Path, encodings: list[str]) -> dict:
    """The teachers run once; their outputs are stored under each encoding."""
    from teachers.registry import TeacherSet

    plan = make_plan(json_path, images, 16)
    manifest = load_manifest(manifest_path)
    teachers = TeacherSet.load(manifest, TASKS)
    specs = [manifest.teachers[t] for t in TASKS]
    decoded = {i: [decode_batch(c, specs) for c in batches_of(plan.shard_records(i), 8)]
               for i in range(plan.num_shards)}
    outs = {i: [teachers.run(d.pixels) for d in ds] for i, ds in decoded.items()}
    paths = {}
    for enc in encodings:
        loc = store.Location(work / f"store-{enc}")
        m = store.RunManifest(dataset=plan.source.dataset_info(), num_samples=plan.num_samples, shard_size=16,
                              formats=["wds"],
                              tasks={t: store.TaskLayout.for_shape(manifest.teachers[t].output_shape, enc) for t in TASKS})
        w = store.StoreWriter.create(loc, m, manifest.identity(list(TASKS), teachers.weights_sha256()))
        for i, ds in decoded.items():
            targets = [compute_batch(_Replay(o, teachers), d, dict.fromkeys(TASKS, enc))
                       for d, o in zip(ds, outs[i], strict=True)]
            w.commit_shard(assemble_shard(m, i, TASKS, ds, targets))
        paths[enc] = loc.url
    return paths


class _Replay:
    """The teachers' outputs computed once, handed to compute_batch again for another encoding."""

    def __init__(self, result, teachers):
        self.result, self.teachers = result, teachers

    def run(self, pixels):
        return self.result

    def provenance(self) -> dict:
        return self.teachers.provenance()


def train(store_url: str, models_cfg: Path, teachers_yaml: Path, out: Path, steps: int) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer.pt", "--store", store_url, "--config", str(models_cfg), "--teachers-manifest",
           str(teachers_yaml), "--output-dir", str(out), "--max-steps", str(steps), "--set", "learning_rate=3e-3",
           "--set", "log_every=1", "--set", "tensorboard=false"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0:
        raise SystemExit(f"training failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--work-dir", default=None)
    a = p.parse_args(argv)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="olaf-bench-fp8-"))
    try:
        from teachers.tiny import build as build_teachers
        from trainer.tiny import build as build_models

        json_path = generate(work / "data", a.samples, seed=0)
        teachers_yaml = build_teachers(work / "teachers")
        models_cfg = build_models(work / "models", captions_json=json_path, lm_steps=200)
        stores = build_stores(work, json_path, work / "data" / "images", teachers_yaml, ["fp16", "fp8"])
        logs = {enc: train(url, models_cfg, teachers_yaml, work / f"run-{enc}", a.steps) for enc, url in stores.items()}
        size = {enc: store.Location(url).du("wds") / a.samples for enc, url in stores.items()}
        print(f"# PT on fp16 vs fp8 stored targets: {a.samples} samples, {a.steps} steps, tiny models (demo setup)")
        print(f"stored WebDataset bytes per sample: fp16 {size['fp16']:.0f}, fp8 {size['fp8']:.0f} "
              f"({size['fp8'] / size['fp16']:.2f}x)")
        keys = ["loss", *TASKS]
        print(f"{'step':>5} " + " ".join(f"{k + ' fp16':>10} {k + ' fp8':>10}" for k in keys))
        for i in range(0, a.steps, max(1, a.steps // 10)):
            print(f"{i + 1:>5} " + " ".join(f"{logs['fp16'][i][k]:10.4f} {logs['fp8'][i][k]:10.4f}" for k in keys))
        last = max(1, a.steps // 8)
        for k in keys:
            m16 = sum(r[k] for r in logs["fp16"][-last:]) / last
            m8 = sum(r[k] for r in logs["fp8"][-last:]) / last
            print(f"mean of the last {last} steps, {k:<5}: fp16 {m16:.4f}  fp8 {m8:.4f}  fp8/fp16 {m8 / m16:.3f}")
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
