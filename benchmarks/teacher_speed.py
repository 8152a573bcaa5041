"""Teacher throughput: batched adapters vs the original's per-image loop, same models, side by side.

    python -m benchmarks.teacher_speed [--sizes tiny,full] [--device cpu|cuda] [--dtype float32|bfloat16]
                                  [--images 32] [--batch-size 16] [--peak-tflops 790]

For each teacher and for all three together it prints images/s of
  * per-image: what the original does inside every training step, one image at a time (PIL recipe,
    normalise, forward with batch 1, synchronously);
  * batched:   olaf's device side: uint8 batches (preprocessed by CPU workers in the pipeline) normalised
    and run in one forward;
and their ratio, the batched rate with this process's own CPU preprocessing added (a like-for-like
single-process figure), plus the CPU preprocessing cost per image (what the decode workers must keep up with), the
FLOPs per image and, on CUDA, the achieved TFLOP/s and MFU against --peak-tflops. Random weights, real configs
(`full`: ViT-H/14, DINOv2-L, Swin-L) or the tiny stand-ins (`tiny`). Timings are medians of repeats.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.timing import median_seconds
from pipeline import sample
from recipes.manifest import load_manifest
from recipes.preprocess import preprocess
from teachers import depth, gen, seg
from teachers.registry import ADAPTERS
from teachers.tiny import output_width

MODULES = {"gen": gen, "depth": depth, "seg": seg}


def make_teachers(size: str, device: str, dtype: torch.dtype | dict[str, torch.dtype]):
    """Random-weight teachers from the real configs (`full`) or the tiny stand-ins' (`tiny`); `dtype`: one for
    all, or one per task."""
    manifest = load_manifest()
    out = {}
    for task, mod in MODULES.items():
        spec = manifest.teachers[task]
        cfg = mod.full_config() if size == "full" else mod.tiny_model().config
        spec = replace(spec, output_shape=(spec.output_shape[0], output_width(task, cfg)))
        out[task] = ADAPTERS[spec.architecture].random(
            spec, cfg, device=device, dtype=dtype[task] if isinstance(dtype, dict) else dtype)
    return out


def flops_per_image(teacher, pixels):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        teacher(pixels[:1])
    return fc.get_total_flops()


def run(size, device, dtype, n_images, batch_size, peak_tflops, repeats):
    rng = random.Random(0)
    images = [sample.draw_scene(sample.random_scene(rng)) for _ in range(n_images)]
    teachers = make_teachers(size, device, dtype)
    rows = []
    pre_all = 0.0
    per_all = bat_all = 0.0
    for task, teacher in teachers.items():
        t = time.perf_counter()
        arrays = [preprocess(teacher.spec, im) for im in images]
        pre_ms = (time.perf_counter() - t) / n_images * 1e3
        pre_all += pre_ms
        pixels = torch.from_numpy(np.stack(arrays)).to(device)

        def per_image(teacher=teacher):
            for im in images:  # the original: PIL ops, tensor, forward, one image at a time
                x = torch.from_numpy(preprocess(teacher.spec, im))[None].to(device)
                teacher(x).cpu()

        def batched(teacher=teacher, pixels=pixels):
            for i in range(0, n_images, batch_size):
                teacher(pixels[i:i + batch_size]).cpu()

        t_per = median_seconds(per_image, device, repeats)
        t_bat = median_seconds(batched, device, repeats)
        flops = flops_per_image(teacher, pixels)
        per_all += t_per
        bat_all += t_bat
        with_prep = n_images / (t_bat + pre_ms * n_images / 1e3)
        rows.append((task, n_images / t_per, n_images / t_bat, t_per / t_bat, with_prep, pre_ms, flops,
                     n_images / t_bat * flops))
    with_prep = n_images / (bat_all + pre_all * n_images / 1e3)
    rows.append(("all3", n_images / per_all, n_images / bat_all, per_all / bat_all, with_prep, pre_all,
                 sum(r[6] for r in rows), n_images / bat_all * sum(r[6] for r in rows)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,full", help="comma list of tiny,full (default both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--images", type=int, default=None, help="images per measurement (default 256 CUDA, 16 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 64 CUDA, 8 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3 CUDA, 1 CPU)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H100 measured: 790)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    n = args.images or (256 if cuda else 16)
    bs = args.batch_size or (64 if cuda else 8)
    repeats = args.repeats or (3 if cuda else 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# teachers benchmark: {dev_name}, {dtype}, {n} images, batch {bs}, median of {repeats}")
    print(f"{'size':<5} {'teacher':<6} {'per-image img/s':>16} {'batched img/s':>14} {'speed-up':>9} "
          f"{'batched+prep img/s':>19} {'CPU prep ms/img':>16} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes.split(","):
        for task, per, bat, ratio, with_prep, pre_ms, flops, fps in run(size, args.device, dtype, n, bs,
                                                                        args.peak_tflops, repeats):
            mfu = f"{fps / 1e12 / args.peak_tflops:6.1%}" if cuda else "   n/a"
            print(f"{size:<5} {task:<6} {per:16.1f} {bat:14.1f} {ratio:8.2f}x {with_prep:19.1f} {pre_ms:16.2f} "
                  f"{flops / 1e9:10.1f} {fps / 1e12:8.3f} {mfu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
