"""What every part measures at (sizes, device, dtypes, counts), and the models the parts share, built once."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import pt_step, teacher_speed, vlora_step
from benchmarks.timing import median_seconds
from recipes.manifest import TASKS, compute_dtypes, load_manifest

PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}  # dense bf16/fp16 matmul measured on this workplace's Hopper machines


@dataclass(frozen=True)
class Setup:
    """What every part measures at: sizes, the device, the dtypes, the work folder and the counts."""

    tiny: bool
    device: torch.device
    work: Path
    peak_tflops: float | None
    compile_backend: str
    batches: tuple[int, ...]  # the teachers' batch-size sweep
    loop_images: int  # images of the original's per-image loop
    recipe_images: int
    job_images: int  # the Ray job's dataset
    pt_batch: int
    probe_batch: int
    steps: int  # timed PT and probe steps (after one warm-up)
    min_s: float  # a throughput figure times calls for at least this long
    compile_tasks: tuple[str, ...]  # the teachers timed under torch.compile
    ray_address: str | None = None  # the Ray job joins this cluster; None: it starts a Ray of its own on this node

    @property
    def size(self) -> str:
        return "tiny" if self.tiny else "full"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's and the tower's (PT runs in bf16 on a GPU; CPUs in float32)."""
        return torch.bfloat16 if self.cuda else torch.float32

    def teacher_dtypes(self) -> dict[str, torch.dtype]:
        """The manifest's compute dtypes on a GPU (gen float16, depth and seg bfloat16), float32 on CPUs."""
        names = compute_dtypes(load_manifest(), list(TASKS), self.device.type)
        return {t: getattr(torch, d) for t, d in names.items()}

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None


def make_setup(a, work: Path) -> Setup:
    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda" if cuda else "cpu")
    peak = a.peak_tflops
    if peak is None and cuda:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    if a.tiny:  # every code path, as fast as a CPU runs it
        return Setup(tiny=True, device=device, work=work, peak_tflops=peak, compile_backend=a.compile_backend or "eager",
                     batches=(1, 2), loop_images=2, recipe_images=4, job_images=12, pt_batch=2, probe_batch=2, steps=1,
                     min_s=0.0, compile_tasks=("gen",), ray_address=a.ray_address)
    return Setup(tiny=False, device=device, work=work, peak_tflops=peak, compile_backend=a.compile_backend or "inductor",
                 batches=(1, 8, 32, 64, 128, 256), loop_images=32, recipe_images=256, job_images=a.job_images,
                 pt_batch=16, probe_batch=16, steps=3, min_s=0.5, compile_tasks=TASKS, ray_address=a.ray_address)


@functools.cache
def teacher_models(s: Setup) -> dict:
    """The three random-weight teachers at the run's size, in the manifest's dtypes (teachers, pt and probe)."""
    return teacher_speed.make_teachers(s.size, str(s.device), s.teacher_dtypes())


@functools.cache
def frozen_models(s: Setup) -> tuple:
    """(tokenizer, LLM, tower, shapes, config overrides) of vlora_step.models at the run's size (pt and probe): an
    8B LLM is built once."""
    return vlora_step.models(s.size, s.work / "models", s.device, s.dtype)


def throughput(fn, images: int, s: Setup, flops_per_image: float | None = None) -> dict:
    """img/s of `fn` (which handles `images` images), its TFLOP/s and MFU, and the peak memory it took."""
    s.reset_memory()
    secs = median_seconds(fn, s.device, min_calls=2, min_s=s.min_s)
    out = {"img_s": round(images / secs, 2), "ms_per_call": round(1e3 * secs, 3), "peak_mem_gib": s.peak_memory_gib()}
    if flops_per_image:
        tflops = images / secs * flops_per_image / 1e12
        out["tflops"] = round(tflops, 3)
        out["mfu"] = round(tflops / s.peak_tflops, 4) if s.peak_tflops and s.cuda else None
    return out


def in_step_targets(teachers: dict, raw: dict[str, bytes], s: Setup) -> dict[str, torch.Tensor]:
    """pt_step's per-image teacher run (decode, PIL recipe, batch-1 forward per teacher), as float32 targets."""
    out = pt_step.teacher_targets(teachers, list(raw), raw, s.device)
    return {t: v.float() for t, v in out.items()}


def jpegs(n: int) -> dict[str, bytes]:
    from pipeline.sample import draw_scene, jpeg_bytes, random_scene

    rng = random.Random(2)
    return {f"{i:09d}": jpeg_bytes(draw_scene(random_scene(rng))) for i in range(n)}
