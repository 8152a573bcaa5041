"""End-to-end extraction throughput: the Ray job with 1 and 2 actors vs a naive single-process per-image loop.

    python benchmarks/extract.py [--samples 96] [--size tiny|full] [--actors 1,2] [--batch-size N]
                                 [--gpus-per-actor F] [--work-dir DIR]

Builds a LLaVA-format sample dataset and teachers of the chosen size (`tiny`: the random-weight stand-ins;
`full`: real-size architectures with random weights, saved as checkpoints first -- a few GB), then measures:
  * naive:  one process, one image at a time: decode, the recipe's resizes, three forwards with batch 1 (how the
            original computes targets inside every training step), no writing;
  * ray xN: `python -m pipeline.extract_teachers` with N actors on a local Ray, writing a full store; samples/s
            over the run (start-up and model loading excluded, as the job reports them), actor busy fraction
            (1.0 = the teachers never waited for decoded input) and decode CPU ms per sample.
Prints one table with the ratios: vs naive, and the scale-out from 1 to 2 actors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.imageops import decode_rgb, read_image_bytes  # noqa: E402
from pipeline.llava import load_records  # noqa: E402
from pipeline.sample import generate  # noqa: E402
from pipeline.teacher_manifest import load_manifest  # noqa: E402
from teachers.base import preprocess  # noqa: E402
from teachers.registry import load_teachers  # noqa: E402


def full_size_teachers(out: Path, dtype: torch.dtype) -> Path:
    """Real-size architectures with random weights, saved like the hub checkpoints, and a manifest."""
    import yaml
    from transformers import (
        CLIPVisionModelWithProjection,
        DepthAnythingForDepthEstimation,
        OneFormerForUniversalSegmentation,
    )

    from teachers import depth, gen, seg
    from teachers.tiny import DEFAULT_MANIFEST

    data = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    for task, cls, cfg in (("gen", CLIPVisionModelWithProjection, gen.full_config()),
                           ("depth", DepthAnythingForDepthEstimation, depth.full_config()),
                           ("seg", OneFormerForUniversalSegmentation, seg.full_config())):
        if not (out / task / "config.json").exists():
            torch.manual_seed(0)
            cls(cfg).to(dtype).save_pretrained(out / task)
        data["teachers"][task]["weights"] = {"path": task}
    data["name"] = "ola_vlm_full_size_random"
    (out / "teachers.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "teachers.yaml"


def naive(json_path: Path, images: Path, manifest_path: Path, device: str, dtype: torch.dtype, n: int) -> float:
    """The original's way: everything per image, synchronously."""
    manifest = load_manifest(manifest_path)
    teachers = load_teachers(manifest, ["gen", "depth", "seg"], device=device, dtype=dtype)
    records, _ = load_records(json_path)
    done, t0 = 0, None
    for k, rec in enumerate(records):
        if k == 2:  # warm-up excluded
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        try:
            rgb = decode_rgb(read_image_bytes(images, rec.image)) if rec.image else None
        except Exception:
            rgb = None
        if rgb is not None:
            for t in teachers.values():
                t(torch.from_numpy(np.ascontiguousarray(preprocess(t.spec, rgb)))[None].to(device)).cpu()
        done += k >= 2
        if done >= n:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def ray_run(json_path, images, manifest_path, out, actors, batch, gpus_per_actor, extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.extract_teachers", "--data-path", str(json_path), "--image-folder",
           str(images), "--output", str(out), "--teachers-manifest", str(manifest_path), "--shard-size", str(4 * batch),
           "--batch-size", str(batch), "--actors", str(actors), "--no-progress"]
    if gpus_per_actor is not None:
        cmd += ["--gpus-per-actor", str(gpus_per_actor)]
    t = time.perf_counter()
    p = subprocess.run(cmd + extra, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"extraction failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    log = p.stdout
    get = lambda pat: float(re.search(pat, log).group(1))  # noqa: E731
    return {"samples_per_s": get(r"throughput\s+([\d.]+) samples/s"), "wall": wall,
            "busy": get(r"actors busy ([\d.]+)"), "decode_ms": get(r"decode\s+([\d.]+) CPU ms/sample"),
            "teacher_ms": get(r"teachers\s+([\d.]+) ms/sample")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--actors", default="1,2", help="comma list of actor counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 with a GPU (0.5 for 2 actors on 1)")
    p.add_argument("--naive-samples", type=int, default=None, help="images for the naive loop (default: all, 24 on CPU full)")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch = args.batch_size or (64 if cuda else 8)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="olaf-bench-extract-"))
    json_path = generate(work / "data", args.samples, seed=0)
    images = work / "data" / "images"
    if args.size == "tiny":
        from teachers.tiny import build

        manifest_path = build(work / "teachers")
    else:
        manifest_path = full_size_teachers(work / "teachers_full", torch.bfloat16 if cuda else torch.float32)
    dev = torch.cuda.get_device_name() if cuda else f"CPU x{os.cpu_count()}"
    print(f"# extraction benchmark: {args.samples} samples, {args.size} teachers, {dev}, batch {batch}")
    n_naive = args.naive_samples or (24 if (args.size == "full" and not cuda) else args.samples - 2)
    base = naive(json_path, images, manifest_path, device, dtype, n_naive)
    print(f"{'mode':<10} {'samples/s':>10} {'vs naive':>9} {'scale-out':>10} {'actors busy':>12} "
          f"{'decode ms/smp':>14} {'teacher ms/smp':>15} {'wall s':>7}")
    print(f"{'naive':<10} {base:10.2f} {1.0:8.2f}x {'':>10} {'':>12} {'':>14} {'':>15} {'':>7}")
    first = None
    for n in [int(x) for x in args.actors.split(",")]:
        gpa = args.gpus_per_actor if args.gpus_per_actor is not None else ((1.0 / n if n > 1 else 1.0) if cuda else None)
        # on a small CPU box the actors and the decoders share the cores: reserve fractions so both can run
        cpus = os.cpu_count() or 2
        extra = [] if cuda else ["--torch-threads", str(max(1, cpus // (2 * n))), "--cpus-per-actor",
                                 str(round(cpus / (2 * n), 2)), "--decode-cpus", str(round(cpus / 4, 2))]
        r = ray_run(json_path, images, manifest_path, work / f"store{n}", n, batch, gpa, extra)
        first = first or r["samples_per_s"]
        print(f"{'ray x' + str(n):<10} {r['samples_per_s']:10.2f} {r['samples_per_s'] / base:8.2f}x "
              f"{r['samples_per_s'] / first:9.2f}x {r['busy']:12.2f} {r['decode_ms']:14.1f} {r['teacher_ms']:15.1f} "
              f"{r['wall']:7.1f}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
