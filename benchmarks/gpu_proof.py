"""One command proves olaf on a GPU: every figure the README owes, measured in one run, into one JSON.

    python benchmarks/gpu_proof.py --out DIR [--minutes 8] [--parts teachers,recipes,pipeline,pt,probe]
    python benchmarks/gpu_proof.py --out DIR --tiny      # the same code paths at tiny sizes, on CPU (the suite's)
    make gpu-proof OUT=DIR                               # the same, after `make setup`

Full size means the real architectures with random weights, built from their configs (nothing is downloaded):
ViT-H/14 (gen, float16), DINOv2-L (depth, bfloat16) and OneFormer's Swin-L (seg, bfloat16) as the teachers'
manifest says; a Llama-3-8B-shaped LLM and CLIP ViT-L/14-336 in bfloat16 for PT and probing. The parts, in order:

  teachers  per teacher: GFLOP per image, a batch-size sweep (img/s, TFLOP/s, MFU, peak memory), then at the best
            batch SDPA off, channels_last on and torch.compile on, one at a time; the three together as the
            extraction actor runs them (TeacherSet.run); the original's per-image loop on the same device (decode,
            PIL recipe, batch 1, synchronous) and the ratio
  recipes   the device recipes (recipes/pil_exact.py) on decoded images of crawl-like sizes: ms per image on the
            device against Pillow's CPU ms, and the bit-identity of every result to Pillow's, checked here
  pipeline  the end-to-end Ray job (`python -m pipeline.extract_teachers`) on generated JPEGs with decode
            workers on this node's CPUs (or on --ray-address's cluster): img/s, actor busy fraction, decode CPU ms, the cores the data path used
  pt        one PT step per sample and its peak memory for LLaVA-1.5's PT, OLA-VLM's (released heads, the
            config's gradient checkpointing), VLoRA's (their PT settings) and VLoRA with OLA-VLM's losses; OLA-VLM's
            step with the teachers run inside it (the original's way) against stored targets; the share of the
            step that the task tokens and heads cost; the stream of stored targets against what the step takes
  probe     olaf's one pass (every task, every layer, one MLLM forward) against the authors' one job per task
            (the teacher online per image), a few steps each

Each part gets a share of --minutes (a part that ends early leaves its time to the next) and stops between two
figures when its time is up ("status": "budget", "stopped_before": what it did not measure); an alarm stops a
figure that hangs past it. DIR/gpu_proof.json is rewritten, atomically, after every figure, so a run that is
killed leaves what it measured; SIGTERM and SIGINT also record where they came ("interrupted"). The JSON records
the GPU, driver, CUDA, torch, the libraries and olaf's code version; the table at the end prints the headline
figures. `--tiny` runs every part at tiny sizes on CPU in about a minute: that is what the test suite runs, so
the script a GPU's short lease spends its time in is known to work. On CPU nothing here is a figure to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "benchmarks"))  # after olaf's packages: benchmarks/teachers.py must not hide `teachers`

from timing import median_seconds, sync  # noqa: E402

from recipes.manifest import TASKS, compute_dtypes, load_manifest  # noqa: E402
from store.fs import StoreError, atomic_write, refuse_inside_store  # noqa: E402

SCHEMA = "olaf-gpu-proof/1"
WEIGHTS = {"teachers": 0.30, "recipes": 0.05, "pipeline": 0.25, "pt": 0.25, "probe": 0.15}  # shares of --minutes
RESERVE_S = 10.0  # kept back from the parts for the table and the last write
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}  # dense bf16/fp16 matmul measured on this workplace's Hopper machines


class OverBudget(Exception):
    """A part's time is up: raised between two figures, or by the alarm inside one."""


# ---- the record and its clock -----------------------------------------------------------------------------------

class Proof:
    """The JSON being written (`data`, saved after every figure) and the clock the parts run against."""

    def __init__(self, path: Path, minutes: float, mode: str, clock=time.monotonic, hard_stop: bool = True):
        self.path, self.clock, self.hard_stop = Path(path), clock, hard_stop
        self.end = clock() + 60.0 * minutes
        self.part_end = self.end
        self.current: str | None = None
        # when the alarm stops a part that overran its budget: a little later, never after the run's end
        self.grace = lambda budget: min(1.25 * budget + 20, max(budget, self.end - self.clock() - RESERVE_S / 2))
        self.data = {"schema": SCHEMA, "mode": mode, "minutes": minutes, "started": _now(), "finished": None,
                     "interrupted": None, "env": {}, "parts": {}}

    def save(self) -> None:
        atomic_write(self.path, (json.dumps(self.data, indent=1, default=str) + "\n").encode())

    def put(self, key: str, value) -> None:
        """A figure of the current part, saved at once."""
        self.data["parts"][self.current][key] = value
        self.save()

    def left(self) -> float:
        return self.part_end - self.clock()

    def check(self, what: str) -> None:
        """Before measuring `what`: stop the part if its time is up."""
        if self.left() <= 0:
            raise OverBudget(what)

    def run(self, parts: dict, weights: dict) -> None:
        """Each part with its share of the time left (the shares of the parts still to run, renormalised)."""
        names = list(parts)
        for i, name in enumerate(names):
            share = weights[name] / sum(weights[n] for n in names[i:])
            self.run_part(name, parts[name], max(0.0, self.end - RESERVE_S - self.clock()) * share)

    def run_part(self, name: str, fn, budget: float) -> None:
        self.current = name
        entry = self.data["parts"][name] = {"status": "running", "budget_s": round(budget, 1)}
        self.part_end, t0 = self.clock() + budget, self.clock()
        self.save()
        try:
            with _alarm(self.grace(budget) if self.hard_stop else None):
                fn(self)
            entry["status"] = "done"
        except OverBudget as e:
            entry["status"], entry["stopped_before"] = "budget", str(e)
        except Exception as e:  # one part's failure is recorded; the others still run
            entry["status"], entry["error"] = "error", f"{type(e).__name__}: {str(e)[:500]}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        finally:
            entry["seconds"] = round(self.clock() - t0, 1)
            self.save()
            _free()

    def interrupted(self, signum, frame) -> None:
        self.data["interrupted"] = f"{signal.Signals(signum).name} during {self.current or 'set-up'}"
        self.save()
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def _alarm(seconds: float | None):
    """OverBudget inside the block after `seconds` (SIGALRM; the main thread only)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise OverBudget("the alarm: a figure ran past the part's time")

    before = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _bench(name: str):
    """A sibling benchmark script as a module, by path (benchmarks/teachers.py shares its name with olaf's package)."""
    import importlib.util

    key = f"olaf_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ---- where it runs ------------------------------------------------------------------------------------------------

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


LIBRARIES = ("transformers", "ray", "zarr", "numcodecs", "webdataset", "fsspec", "safetensors", "numpy", "flash-attn",
             "diffusers")


def environment(s: Setup) -> dict:
    """The machine, the driver and every library a figure depends on (read from the installed metadata: a missing
    one is null, and only the parts that need it fail), and olaf's code version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from pipeline.provenance import code_version
    from recipes.imageops import image_libraries

    libs = {"python": platform.python_version(), "torch": torch.__version__, **image_libraries()}
    for name in LIBRARIES:
        try:
            libs[name] = installed(name)
        except PackageNotFoundError:
            libs[name] = None
    env = {"device": str(s.device), "torch": torch.__version__, "cuda": torch.version.cuda, "libraries": libs,
           "code": code_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "peak_tflops": s.peak_tflops, "gpu": None, "driver": None}
    if s.cuda:
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _nvidia_smi("driver_version")
        env["gpu"]["max_sm_clock_mhz"] = _nvidia_smi("clocks.max.sm")
        env["gpu"]["power_limit_w"] = _nvidia_smi("power.limit")
    return env


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# ---- the models, built once for the parts that use them ----------------------------------------------------------

@functools.cache
def teacher_models(s: Setup) -> dict:
    """The three random-weight teachers at the run's size, in the manifest's dtypes (teachers, pt and probe)."""
    return _bench("teachers").make_teachers(s.size, str(s.device), s.teacher_dtypes())


@functools.cache
def frozen_models(s: Setup) -> tuple:
    """(tokenizer, LLM, tower, shapes, config overrides) of vlora_step.models at the run's size (pt and probe): an
    8B LLM is built once."""
    return _bench("vlora_step").models(s.size, s.work / "models", s.device, s.dtype)


# ---- timing -------------------------------------------------------------------------------------------------------

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


# ---- part: the teachers -------------------------------------------------------------------------------------------

def part_teachers(proof: Proof, s: Setup) -> None:
    """The most wanted figures first: every teacher's batch sweep, the three together and the original's loop;
    then the switches, torch.compile (whose compilation takes longest) last."""
    bench = _bench("teachers")
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
    raw = _jpegs(s.loop_images)
    with torch.inference_mode():
        secs = median_seconds(lambda: in_step_targets(teachers, raw, s), s.device, min_calls=1)
    rate = len(raw) / secs
    batched = proof.data["parts"]["teachers"]["all_three"]["img_s"]
    proof.put("original_loop", {"images": len(raw), "img_s": round(rate, 2),
                                "batched_vs_original": round(batched / rate, 2)})


# ---- part: the device recipes -------------------------------------------------------------------------------------

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


# ---- part: the Ray job end to end ---------------------------------------------------------------------------------

def part_pipeline(proof: Proof, s: Setup) -> None:
    """`python -m pipeline.extract_teachers` on a local Ray, as a user runs it, on generated JPEGs."""
    import importlib.util

    from pipeline.sample import generate

    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("the Ray job needs ray: pip install 'ray[default,data]' (olaf's own requirement)")
    proof.check("generating the dataset")
    data = s.work / "job-data"
    json_path = generate(data, s.job_images, seed=0)
    proof.put("images", s.job_images)
    proof.check("saving the teachers")
    if s.tiny:
        from teachers.tiny import build

        manifest = build(s.work / "job-teachers")
    else:
        manifest = _bench("extract").full_size_teachers(s.work / "job-teachers", torch.bfloat16)
    batch = 8 if s.tiny else 64
    cmd = _bench("extract").job_command(json_path, data / "images", s.work / "job-store", manifest, batch)
    if s.tiny:  # two cores: the actor and the decoders share them
        cmd += ["--torch-threads", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5", "--resize-on", "cpu"]
    if s.ray_address:
        cmd += ["--address", s.ray_address]
    proof.check("the Ray job")
    proof.put("command", " ".join(cmd[1:]))
    result, cores = run_job(cmd, max(5.0, proof.left()))
    progress = job_progress(s.work / "job-store")
    rate = progress.get("samples_per_s")
    decode_ms = progress.get("decode_cpu_ms_per_sample")
    proof.put("job", {**result, "progress": progress, "img_s": rate, "actor_busy": progress.get("actor_busy_fraction"),
                      "decode_cpu_ms_per_sample": decode_ms,
                      "decode_cores": round(rate * decode_ms / 1e3, 2) if rate and decode_ms else None,
                      "node_cores_busy": cores})
    if result["timed_out"]:
        raise OverBudget("the rest of the Ray job (it was stopped; the figures are from what it finished)")
    if result["returncode"] != 0:
        raise RuntimeError(f"the job exited {result['returncode']}: {result['tail'][-800:]}")


def run_job(cmd: list[str], timeout: float, grace_s: float = 30.0) -> tuple[dict, dict]:
    """Run the job; SIGTERM at `timeout` (it commits what it finished), SIGKILL `grace_s` later. Returns what it did
    and the node's busy CPU cores, sampled each second from /proc/stat."""
    from pipeline.localray import LOOPBACK_ENV

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV | {
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # the cluster is the command's --address, or its own
    sampler = CoreSampler()
    t0 = time.perf_counter()
    with sampler, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True) as p:
        timed_out = False
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGTERM)
            try:
                out, _ = p.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
        finally:  # the alarm or a signal came first: the job must not outlive this part (Popen's exit waits for it)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return ({"returncode": p.returncode, "timed_out": timed_out, "wall_s": round(time.perf_counter() - t0, 1),
             "tail": out[-3000:]}, sampler.summary())


def job_progress(path: Path) -> dict:
    """The progress the job kept in its store's manifest (samples/s, decode CPU, actor busy fraction)."""
    import store

    try:
        return dict(store.Store(str(path)).manifest.progress)
    except Exception as e:  # no store: the job failed before it made one
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


class CoreSampler:
    """Busy CPU cores of the whole node (user + system + irq time, all processes), sampled once a second."""

    def __enter__(self):
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @staticmethod
    def _jiffies() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    def _run(self) -> None:
        hz, last = os.sysconf("SC_CLK_TCK"), self._jiffies()
        while last is not None and not self.stop.wait(1.0):
            now = self._jiffies()
            busy = now[0] - last[0]
            total = now[1] - last[1]
            if total:
                self.samples.append(round(busy / hz / (total / hz / (os.cpu_count() or 1)), 2))
            last = now

    def summary(self) -> dict:
        x = self.samples
        return {"per_second": x, "median": statistics.median(x) if x else None, "max": max(x) if x else None}


# ---- part: PT steps at full size ----------------------------------------------------------------------------------

def part_pt(proof: Proof, s: Setup) -> None:
    """One PT step per sample (forward with the loss inside, backward) for each PT model, as the trainer builds
    it; OLA-VLM's step again with the teachers inside it; the memory each took."""
    vlora_step = _bench("vlora_step")
    proof.check("building the models")
    tok, llm, tower, _, over = frozen_models(s)
    teachers = teacher_models(s)
    shapes = {t: tuple(teacher.spec.output_shape) for t, teacher in teachers.items()}  # what the heads predict
    rows = {}
    for name in vlora_step.MODES:
        proof.check(name)
        rows[name] = pt_row(s, tok, llm, tower, shapes, over, name)
        proof.put("modes", rows)
    ola, llava = rows["OLA-VLM PT"], rows["LLaVA-1.5 PT (projector, NTP)"]
    share = ratio(llava.get("ms_per_sample"), ola.get("ms_per_sample"), 4)
    proof.put("task_tokens_and_heads_share", round(1 - share, 3) if share else None)
    proof.check("OLA-VLM's step with the teachers inside it")
    inline = pt_row(s, tok, llm, tower, shapes, over, "OLA-VLM PT", teachers)
    proof.put("teachers_in_step", {**inline, "stored_vs_in_step": ratio(inline.get("ms_per_sample"),
                                                                        ola.get("ms_per_sample"))})
    loader_feed(proof, s, ola)


def loader_feed(proof: Proof, s: Setup, ola: dict) -> None:
    """The stream of stored targets the trainer reads (one rank, DataLoader workers, full-shape fp16 targets from a
    WebDataset store; benchmarks/loader.py) against what OLA-VLM's step consumes: whether the data keep up."""
    bench = _bench("loader")
    proof.check("the stream of stored targets")
    n, shard, workers = (16, 8, 1) if s.tiny else (512, 32, min(8, os.cpu_count() or 1))
    url = str(s.work / "loader-store")
    bench.build(url, n, shard)
    rate = bench.stream_rate(url, s.pt_batch, workers)
    consumed = 1e3 / ola["ms_per_sample"] if ola.get("ms_per_sample") else None
    proof.put("loader", {"samples": n, "workers": workers, "samples_per_s": round(rate, 1),
                         "step_consumes_per_s": round(consumed, 2) if consumed else None,
                         "headroom": ratio(rate, consumed)})


def config(paths: list, **over):
    """The trainer's config from `paths` over its defaults, for a model built here (no store, no run folder)."""
    from trainer.config import load_config

    return load_config(paths, {"store": "unused", "output_dir": "unused", **over})


def pt_row(s: Setup, tok, llm, tower, shapes, over, mode: str, teachers=None) -> dict:
    """One of vlora_step.MODES, its gradient checkpointing as configured; with `teachers`, their targets computed
    inside the step."""
    from trainer.build import enable_checkpointing

    vlora_step = _bench("vlora_step")
    model, layout, cfg = vlora_step.pt_model(mode, tok, llm, tower, shapes, over, s.device)
    if cfg.gradient_checkpointing:
        enable_checkpointing(llm)
        llm.train()
    else:
        llm.gradient_checkpointing_disable()
    batch = vlora_step.batch_for(layout, s.pt_batch, 32, shapes, cfg.tasks, s.device)
    raw = _jpegs(s.pt_batch) if teachers else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.cuda else contextlib.nullcontext()

    def step():
        if teachers:  # the original's way: per image, the PIL recipe and a batch-1 forward, inside the step
            with torch.no_grad():
                batch["targets"] = in_step_targets(teachers, raw, s)
        with autocast:
            loss, _ = model(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    row = {"batch": s.pt_batch, "llm_tokens": layout.text_start + 32, "gradient_checkpointing": cfg.gradient_checkpointing,
           "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    s.reset_memory()
    try:
        secs = fits(lambda: median_seconds(step, s.device, min_calls=s.steps))
    finally:
        vlora_step.release(model)  # the LLM is shared by the next rows
    if secs is None:
        return {**row, "out_of_memory": True}
    return {**row, "ms_per_sample": round(1e3 * secs / s.pt_batch, 2), "peak_mem_gib": s.peak_memory_gib()}


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """a / b, or None where a figure is missing (out of memory)."""
    return round(a / b, digits) if a and b else None


def fits(fn):
    """fn(), or None when it ran out of GPU memory (the part goes on with its next figure)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        _free()
        return None


def in_step_targets(teachers: dict, raw: dict[str, bytes], s: Setup) -> dict[str, torch.Tensor]:
    """pt_step's per-image teacher run (decode, PIL recipe, batch-1 forward per teacher), as float32 targets."""
    out = _bench("pt_step").teacher_targets(teachers, list(raw), raw, s.device)
    return {t: v.float() for t, v in out.items()}


def _jpegs(n: int) -> dict[str, bytes]:
    from pipeline.sample import draw_scene, jpeg_bytes, random_scene

    rng = random.Random(2)
    return {f"{i:09d}": jpeg_bytes(draw_scene(random_scene(rng))) for i in range(n)}


# ---- part: probing at full size -----------------------------------------------------------------------------------

def part_probe(proof: Proof, s: Setup) -> None:
    """olaf's one pass against the authors' one job per task, on the same frozen MLLM, a few steps each."""
    proof.check("building the MLLM")
    tok, llm, tower, _, _ = frozen_models(s)
    llm.eval()  # PT's part may have left it training (its checkpointing switch)
    teachers = teacher_models(s)
    shapes = {t: tuple(teacher.spec.output_shape) for t, teacher in teachers.items()}  # what the probes predict
    probed = random_probed(s, tok, llm, tower)
    rows = {"olaf: one pass, every task": probe_row(s, probed, shapes, list(TASKS))}
    proof.put("designs", rows)
    for t in TASKS:
        proof.check(f"the authors' job '{t}'")
        rows[f"authors: job '{t}', teacher online"] = probe_row(s, probed, shapes, [t], {t: teachers[t]})
        proof.put("designs", rows)
    jobs = [r for k, r in rows.items() if k.startswith("authors")]
    one = rows["olaf: one pass, every task"]
    total = sum(r["ms_per_sample"] for r in jobs) if all("ms_per_sample" in r for r in jobs) else None
    proof.put("authors_total_ms_per_sample", round(total, 2) if total else None)
    proof.put("one_pass_vs_jobs", ratio(total, one.get("ms_per_sample")))


def random_probed(s: Setup, tok, llm, tower):
    """A probed model of random weights: the LLM and tower, an mlp2x_gelu projector and task tokens."""
    from trainer.data import ImageRecipe
    from trainer.probe import Probed
    from trainer.sequence import Projector, TaskTokens
    from trainer.towers import OPENAI_MEAN, OPENAI_STD

    cfg = config([])
    tokens = TaskTokens.random(cfg.special_tokens, cfg.task_tokens, llm.config.hidden_size).requires_grad_(False)
    image = ImageRecipe(336, 336, "bicubic", OPENAI_MEAN, OPENAI_STD)  # CLIP-L/336's processor
    proj = Projector(tower.hidden_size, llm.config.hidden_size)
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj.to(s.device, s.dtype),
                  tokens.to(s.device, s.dtype), tok, "llama_3", image, "random weights")


def probe_row(s: Setup, probed, shapes: dict, tasks: list[str], teachers: dict | None = None) -> dict:
    from trainer.probe import PROBE_DEFAULTS, ProbeSet

    cfg = config([PROBE_DEFAULTS])
    mllm = probed.mllm()
    layers = list(range(1, mllm.config.num_hidden_layers + 1))
    probes = ProbeSet(mllm, {t: shapes[t] for t in tasks}, layers, cfg.predictor).to(s.device)
    opt = torch.optim.AdamW([p for p in probes.parameters() if p.requires_grad], lr=1e-4)
    batch = _bench("vlora_step").batch_for(mllm.layout, s.probe_batch, 32, shapes, tasks, s.device)
    raw = _jpegs(s.probe_batch) if teachers else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.cuda else contextlib.nullcontext()
    steps = []

    def step():
        if teachers:  # the authors' probe job: its task's teacher per image, inside each step
            with torch.no_grad():
                batch["targets"] = in_step_targets(teachers, raw, s)
        with autocast:
            loss, _ = probes(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(1)

    row = {"batch": s.probe_batch, "probes": len(probes.probes),
           "probe_params": sum(p.numel() for p in probes.parameters() if p.requires_grad)}
    s.reset_memory()
    before = probes.forwards
    secs = fits(lambda: median_seconds(step, s.device, min_calls=s.steps))
    if secs is None:
        return {**row, "out_of_memory": True}
    return {**row, "ms_per_sample": round(1e3 * secs / s.probe_batch, 2), "peak_mem_gib": s.peak_memory_gib(),
            "mllm_forwards_per_step": (probes.forwards - before) / len(steps)}


PARTS = {"teachers": part_teachers, "recipes": part_recipes, "pipeline": part_pipeline, "pt": part_pt,
         "probe": part_probe}


# ---- the table ----------------------------------------------------------------------------------------------------

def table(data: dict) -> str:
    """The headline figures, one line each."""
    env, parts = data["env"], data["parts"]
    gpu = (env.get("gpu") or {}).get("name") or f"CPU x{env.get('cpu_count')}"
    lines = [f"# olaf GPU proof ({data['mode']}): {gpu}, driver {env.get('driver')}, CUDA {env.get('cuda')}, "
             f"torch {env.get('torch')}, code {(env.get('code') or {}).get('git')}",
             f"{'part':<9} {'status':<7} {'s':>6}  figures"]
    for name, p in parts.items():
        lines.append(f"{name:<9} {p['status']:<7} {p.get('seconds', 0):>6}  {headline(name, p)}")
    return "\n".join(lines)


def headline(name: str, p: dict) -> str:
    """What the part measured, in one line; a piece it did not get to is left out."""
    pieces = []
    for piece in HEADLINES[name]:
        with contextlib.suppress(KeyError, TypeError, ValueError, ZeroDivisionError):
            pieces.append(piece(p))
    stop = (p["error"].splitlines() or [""])[0] if p.get("error") else (
        f"stopped before {p['stopped_before']}" if "stopped_before" in p else None)
    return "; ".join(pieces + ([stop] if stop else [])) or "-"


def _best(r: dict) -> dict:
    return max((x for x in r["sweep"] if "img_s" in x), key=lambda x: x["img_s"])


HEADLINES = {
    "teachers": [
        lambda p: ", ".join(f"{t} {_best(r)['img_s']:.0f} img/s (bs {_best(r)['batch']}, MFU {_best(r).get('mfu')})"
                            for t, r in p["per_teacher"].items()),
        lambda p: (f"all three {p['all_three']['img_s']:.1f} img/s (bs {p['all_three']['batch']}, "
                   f"{p['all_three']['peak_mem_gib']} GiB)"),
        lambda p: (f"original loop {p['original_loop']['img_s']:.1f} img/s: batched "
                   f"x{p['original_loop']['batched_vs_original']}")],
    "recipes": [
        lambda p: (f"device {p['recipes']['device_ms_per_image_all']} ms/img vs Pillow "
                   f"{p['recipes']['pillow_cpu_ms_per_image_all']} CPU ms/img"),
        lambda p: f"bit-identical to Pillow: {p['recipes']['all_bit_identical']}"],
    "pipeline": [
        lambda p: (f"{p['job']['img_s']} img/s over {p['job']['progress']['samples_done']} images, actors busy "
                   f"{p['job']['actor_busy']}"),
        lambda p: f"decode {p['job']['decode_cores']} cores, node {p['job']['node_cores_busy']['median']} cores busy"],
    "pt": [
        lambda p: ", ".join(f"{k} {r['ms_per_sample']} ms/smp {r['peak_mem_gib']} GiB" for k, r in p["modes"].items()),
        lambda p: f"task tokens + heads share {p['task_tokens_and_heads_share']}",
        lambda p: f"teachers in the step x{p['teachers_in_step']['stored_vs_in_step']}",
        lambda p: f"stored targets stream {p['loader']['samples_per_s']} smp/s: x{p['loader']['headroom']} the step"],
    "probe": [
        lambda p: (f"one pass {p['designs']['olaf: one pass, every task']['ms_per_sample']} ms/smp "
                   f"({p['designs']['olaf: one pass, every task']['probes']} probes)"),
        lambda p: f"three jobs {p['authors_total_ms_per_sample']} ms/smp: x{p['one_pass_vs_jobs']}"],
}


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return value


def result_path(out: Path) -> Path:
    """Where this run's JSON goes: OUT/gpu_proof.json, or beside an earlier one (on a lease it may be the only copy
    of figures measured), never over it."""
    refuse_inside_store(out, "--out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder (the JSON goes in it)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_proof.json"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        if not path.exists():
            break
        path = out / f"gpu_proof-{stamp}{f'-{n}' if n else ''}.json"
    if path.name != "gpu_proof.json":
        print(f"note: {out / 'gpu_proof.json'} is kept; this run writes {path}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_proof.json (created; an earlier gpu_proof.json there "
                                                "is kept: this run writes gpu_proof-<UTC time>.json beside it)")
    p.add_argument("--minutes", type=_positive, default=8.0, help="the whole run's time (default 8)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: every code path, no figure to quote")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default 790 on H100/H200)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny eager)")
    p.add_argument("--job-images", type=int, default=3000, help="images of the Ray job's dataset (default 3000)")
    p.add_argument("--batches", default=None, help="the teachers' batch sweep, e.g. 1,8,64 (default 1,8,32,64,128,256)")
    p.add_argument("--ray-address", default=None,
                   help="the pipeline part's job joins this Ray cluster (default: it starts a Ray on this node)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default a temporary one, removed)")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    try:
        path = result_path(Path(a.out))
    except (OSError, ValueError, StoreError) as e:
        p.error(str(e))
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="olaf-gpu-proof-"))
    s = make_setup(a, work)
    if a.batches:
        s = replace(s, batches=tuple(int(b) for b in a.batches.split(",")))
    proof = Proof(path, a.minutes, s.size)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, proof.interrupted)
    try:
        proof.data["env"] = environment(s)
        proof.save()
        proof.run({n: (lambda pr, f=PARTS[n]: f(pr, s)) for n in parts}, WEIGHTS)
        proof.data["finished"] = _now()
        proof.save()
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(proof.data))
    print(f"\nwritten: {proof.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
