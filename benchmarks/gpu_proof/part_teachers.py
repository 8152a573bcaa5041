"""Part `teachers`: each teacher's FLOPs and batch sweep, the three together as the actor runs them, the original's
per-image loop, then SDPA off, channels_last and torch.compile one at a time."""

from __future__ import annotations

import functools
import time

import torch

from benchmarks import teacher_speed
from benchmarks.gpu_proof.runner import Proof, fits
from benchmarks.gpu_proof.setup import Setup, in_step_targets, jpegs, teacher_models, throughput
from benchmarks.timing import median_seconds, sync


def part_teachers(proof: Proof, s: Setup) -> None:
    """The most wanted figures first: every teacher's batch sweep, the three together and the original's loop;
    then the switches, torch.compile (whose compilation takes longest) last."""
    bench = teacher_speed
    teachers = teacher_models(s)
    proof.put("dtypes", {t: str(d).removeprefix("torch.") for t, d in s.teacher_dtypes().items()})
    per, g = {}, torch.Generator().manual_seed(0)
    pixels = {t: torch.randint(0, 256, (max(s.batches), *tc.spec.preprocess.input_size, 3), dtype=torch.uint8,
                               generator=g).to(s.device) for t, tc in teachers.items()}
    for task, teacher in teachers.items():
        proof.check(f"{task}: FLOPs")
        per[task] = {"input": list(teacher.spec.preprocess.input_size), "output": list(teacher.spec.output_shape),
                     "gflop_per_image": round(bench.flops_per_image(teacher, pixels[task]) / 1e9, 3), "sweep": []}
        sweep(proof, s, task, teacher, pixels[task], per)
    together(proof, s, teachers, pixels, per)
    original_loop(proof, s, teachers, per)
    for variant in ("eager_attention", "channels_last", "compile"):
        for task, teacher in teachers.items():
            if variant == "compile" and task not in s.compile_tasks:
                continue
            proof.check(f"{task}: {variant}")
            row = per[task]
            row[variant] = teacher_variant(teacher, variant, pixels[task][:row["best_batch"]], s,
                                           row["gflop_per_image"] * 1e9)
            proof.put("per_teacher", per)


def sweep(proof: Proof, s: Setup, task: str, teacher, pixels: torch.Tensor, per: dict) -> None:
    """img/s at each batch size, up to the first that does not fit in memory."""
    row = per[task]
    for bs in s.batches:
        proof.check(f"{task}: batch {bs}")
        with torch.inference_mode():
            forward = functools.partial(teacher, pixels[:bs])
            r = fits(functools.partial(throughput, forward, bs, s, row["gflop_per_image"] * 1e9))
        if r is None:
            row["sweep"].append({"batch": bs, "out_of_memory": True})
            break
        row["sweep"].append({"batch": bs, **r})
        row["best_batch"] = max((r for r in row["sweep"] if "img_s" in r), key=lambda r: r["img_s"])["batch"]
        proof.put("per_teacher", per)


def teacher_variant(teacher, variant: str, x: torch.Tensor, s: Setup, flops: float) -> dict:
    """One switch against the default (SDPA attention, contiguous weights, no compile), at the same batch."""
    if variant == "eager_attention":
        before = teacher.model.config._attn_implementation
        if before != "sdpa":
            return {"applies": False, "attention": before}
        teacher.model.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                return {"applies": True, **throughput(lambda: teacher(x), len(x), s, flops)}
        finally:
            teacher.model.set_attn_implementation(before)
    if variant == "channels_last":
        teacher.to(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                return {"applies": True, **throughput(lambda: teacher(x), len(x), s, flops)}
        finally:
            teacher.to(memory_format=torch.contiguous_format)
    compiled = torch.compile(teacher, backend=s.compile_backend)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
        sync(s.device)
        first = time.perf_counter() - t0
        r = throughput(lambda: compiled(x), len(x), s, flops)
    torch._dynamo.reset()
    return {"applies": True, "backend": s.compile_backend, "compile_s": round(first, 1), **r}


def together(proof: Proof, s: Setup, teachers: dict, pixels: dict, per: dict) -> None:
    """The three teachers as the extraction actor runs them (TeacherSet.run: forward, finiteness check)."""
    from teachers.registry import TeacherSet

    proof.check("the three together")
    bs = min(r["best_batch"] for r in per.values())
    ts = TeacherSet(teachers, s.device)
    flops = sum(r["gflop_per_image"] for r in per.values()) * 1e9
    with torch.inference_mode():
        r = throughput(lambda: ts.run({t: pixels[t][:bs] for t in teachers}), bs, s, flops)
    proof.put("all_three", {"batch": bs, "gflop_per_image": round(flops / 1e9, 3), **r})


def original_loop(proof: Proof, s: Setup, teachers: dict, per: dict) -> None:
    """The original's way on the same device: per image, decode, the PIL recipe and a batch-1 forward of each
    teacher (pt_step's in-step targets)."""
    proof.check("the original's per-image loop")
    raw = jpegs(s.loop_images)
    with torch.inference_mode():
        secs = median_seconds(lambda: in_step_targets(teachers, raw, s), s.device, min_calls=1)
    rate = len(raw) / secs
    batched = proof.data["parts"]["teachers"]["all_three"]["img_s"]
    proof.put("original_loop", {"images": len(raw), "img_s": round(rate, 2),
                                "batched_vs_original": round(batched / rate, 2)})
