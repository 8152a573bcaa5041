"""Part `recipes`: the device recipes against Pillow on the CPU, and their bit-identity."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from benchmarks.gpu_proof.runner import Proof
from benchmarks.gpu_proof.setup import Setup
from benchmarks.timing import median_seconds
from recipes.manifest import TASKS, load_manifest


def part_recipes(proof: Proof, s: Setup) -> None:
    """The recipes on the device (what `--resize-on device` runs in the actor) against Pillow on the CPU."""
    from pipeline.sample import draw_scene, random_scene
    from recipes import pil_exact
    from recipes.preprocess import preprocess, preprocess_on_device

    specs = load_manifest().teachers
    rng = random.Random(1)
    images = [draw_scene(random_scene(rng)) for _ in range(s.recipe_images)]
    arrays = [np.array(im) for im in images]  # writable: torch warns on read-only
    out = {"images": len(images), "pillow": pil_exact.pillow_version(), "per_task": {}}
    for task in TASKS:
        proof.check(f"recipe {task}")
        spec = specs[task]
        t0 = time.process_time()
        want = [preprocess(spec, im) for im in images]
        cpu_ms = 1e3 * (time.process_time() - t0) / len(images)
        got = []

        def on_device(spec=spec, got=got):
            got.clear()
            got.extend(preprocess_on_device(spec, torch.from_numpy(a).to(s.device)) for a in arrays)

        secs = median_seconds(on_device, s.device, min_calls=2, min_s=0.2, max_calls=5)
        same = sum(np.array_equal(g.cpu().numpy(), w) for g, w in zip(got, want, strict=True))
        out["per_task"][task] = {"device_ms_per_image": round(1e3 * secs / len(images), 3),
                                 "pillow_cpu_ms_per_image": round(cpu_ms, 3), "bit_identical": same}
        proof.put("recipes", out)
    proof.check("pil_exact.self_check")
    failed = pil_exact.self_check({t: specs[t].preprocess.ops for t in TASKS}, s.device)
    out["self_check_failed"] = failed
    out["all_bit_identical"] = not failed and all(r["bit_identical"] == len(images) for r in out["per_task"].values())
    out["device_ms_per_image_all"] = round(sum(r["device_ms_per_image"] for r in out["per_task"].values()), 3)
    out["pillow_cpu_ms_per_image_all"] = round(sum(r["pillow_cpu_ms_per_image"] for r in out["per_task"].values()), 3)
    proof.put("recipes", out)
