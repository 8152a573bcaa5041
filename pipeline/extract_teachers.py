"""Run the OLA-VLM teachers once over a LLaVA dataset and write a store (Zarr + WebDataset + manifests).

    ray job submit --address http://127.0.0.1:8265 --working-dir "$(python -m pipeline.jobdir build/job)" -- \\
      python -m pipeline.extract_teachers --data-path /data/blip_laion_cc_sbu_558k.json \\
        --image-folder /data/images --output /stores/ola558k [--tasks gen,depth,seg] [--shard-size 256]
    python -m pipeline.extract_teachers ...      # the same, on a local Ray it starts (127.0.0.1) and stops

Re-running the same command resumes: done shards are verified by their checksums and skipped, partial ones are
redone, and the data files come out byte-identical to an uninterrupted run's. `--tasks seg` on an existing
store computes only seg. Exit status: 0 when every shard is done, 1 when some shard kept failing (listed; the
rest is finished), 2 for unusable input (reported before any model is loaded where possible), 130 / 143 when
stopped by Ctrl-C / SIGTERM (committed shards are kept; re-run to resume).

How it runs, and why this way rather than Ray Data:
  plan (driver)     validate the JSON, fixed shards of --shard-size samples in dataset order
  decode (tasks)    CPU workers read and decode a batch, and (--resize-on cpu) run every teacher's PIL recipe:
                    uint8 arrays + per-sample errors (pipeline.decode); many in flight, so the device never
                    waits on PIL. --resize-on device (the default on GPUs) ships the decoded images instead and
                    the actor runs the recipes, bit-identically (pipeline.pil_exact)
  teachers (actors) one actor per GPU (--gpus-per-actor; fractional or zero on CPU) holds all teachers once,
                    normalises and runs each batch, encodes targets on the device (pipeline.work)
  write (tasks)     per shard: scatter batches back into dataset order and commit the Zarr region + tar +
                    record exactly once (pipeline.store.commit_shard)
  The unit of commit, resume, verification and retry is the shard, in dataset order. Ray Data's
  map_batches(actor class) would give decode/teacher overlap too, but its streaming executor reorders and
  re-blocks data, has no per-shard commit hook, and regrouping its output into contiguous shards means a
  shuffle of 1.65 TB of features; its backpressure is also opaque when the slow stage is the writer. An actor
  pool fed shard by shard keeps order and exactly-once commits trivial, bounds memory explicitly (at most
  --prefetch decoded batches per actor and --max-writers shards awaiting their commit), and Ray's own
  mechanisms supply fault tolerance: a decode or writer worker killed mid-shard is retried, an actor killed is
  restarted and its in-flight batch re-run; a shard whose commit still fails is retried --shard-retries times,
  then reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from pipeline import encodings, store
from pipeline.decode import DecodedBatch, decode_batch
from pipeline.imageops import DEFAULT_MAX_PIXELS, image_libraries
from pipeline.llava import DatasetError
from pipeline.plan import Plan, make_plan
from pipeline.store import Location, ShardRecord, StoreError, TaskLayout
from pipeline.teacher_manifest import (
    DEFAULT_MANIFEST,
    TASKS,
    ManifestError,
    TeacherManifest,
    compute_dtypes,
    load_manifest,
)
from pipeline.work import BatchTargets, assemble_shard, batches_of, compute_batch
from teachers.weights import WeightsNotFound


class UsageError(Exception):
    """Bad arguments or an output that cannot be used; exit status 2."""


# ---- the Ray side ----------------------------------------------------------------------------------------------


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class TeacherActor:
    """Holds every teacher of the run on one device; `run` takes one decoded batch's pixels."""

    def __init__(self, manifest_path: str, fidelity: str, tasks: list[str], device: str, dtype: dict[str, str],
                 threads: int, encoding_by_task: dict[str, str], resize_on: str = "cpu"):
        import torch

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
            from pipeline import pil_exact

            bad = pil_exact.self_check({t: manifest.teachers[t].preprocess.ops for t in tasks}, device)
            if bad:
                raise RuntimeError(f"the device resizes of {', '.join(bad)} differ from this node's Pillow "
                                   f"{pil_exact.pillow_version()}; run with --resize-on cpu")
        self.busy = 0.0
        self.first = self.last = None
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({threads} threads)"

    def info(self) -> dict:
        return {"weights_sha256": self.teachers.weights_sha256(), "pid": os.getpid(), "device": self.device_name}

    def run(self, payload: dict, tasks: list[str]) -> BatchTargets:
        """payload: {"ids": [...], "pixels": {task: uint8 (n, H, W, 3)}} (row k is sample ids[k])."""
        t = time.perf_counter()
        self.first = self.first or t
        subset = type(self.teachers)({k: self.teachers.teachers[k] for k in tasks}, self.teachers.device)
        if "pixels" in payload:
            payload = {"ids": payload["ids"], "pixels": {k: payload["pixels"][k] for k in tasks}}
        out = compute_batch(subset, payload, self.encoding_by_task)
        self.last = time.perf_counter()
        self.busy += self.last - t
        return out

    def utilisation(self) -> dict:
        span = (self.last - self.first) if self.first and self.last else 0.0
        return {"busy_s": self.busy, "span_s": span, "busy_fraction": self.busy / span if span else None}


def _decode(records, image_folder, specs, max_pixels, resize_on):
    b = decode_batch(records, image_folder, specs, max_pixels, resize_on)
    return b.pixel_payload(), b.without_pixels()  # pixels (keyed by id) go to the actor, the rest to the writer


def _write(url: str, shard: int, tasks: tuple[str, ...], previous: ShardRecord | None, meta_refs: list,
           target_refs: list) -> ShardRecord:
    """Join the shard's batches on sample ids and write its data; the driver commits the record."""
    import ray

    loc = Location(url)
    metas: list[DecodedBatch] = ray.get(meta_refs)
    targets: list[BatchTargets] = ray.get(target_refs)
    manifest = store.read_manifest(loc)
    result = assemble_shard(manifest, shard, tasks, metas, targets, seconds=sum(t.seconds for t in targets))
    record = store.write_shard(loc, result, previous)
    record.extra.update(decode_cpu_s=sum(m.seconds for m in metas), teacher_s=sum(t.seconds for t in targets))
    return record


def _verify(url: str, record: ShardRecord, full: bool) -> list[str]:
    return store.check_files(Location(url), record, full=full)


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    data_path: str
    image_folder: str
    output: str
    teachers_manifest: str = str(DEFAULT_MANIFEST)
    fidelity: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    shard_size: int = 256
    limit: int | None = None
    formats: list[str] = field(default_factory=lambda: ["zarr", "wds"])
    encoding: str | None = None
    zarr_compression: str = "none"
    batch_size: int | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    torch_threads: int | None = None
    decode_cpus: float = 1.0
    prefetch: int | None = None
    max_writers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_on: str = "auto"
    address: str | None = None
    num_cpus: int | None = None
    trust_done: bool = False
    shard_retries: int = 2
    plan_only: bool = False
    progress: bool = True


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.extract_teachers", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-path", required=True, help="the LLaVA JSON (blip_laion_cc_sbu_558k.json)")
    p.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--output", required=True, help="store directory (created, or resumed if it is one)")
    p.add_argument("--teachers-manifest", default=str(DEFAULT_MANIFEST),
                   help="teacher manifest YAML (default: manifests/teachers/ola_vlm.yaml)")
    p.add_argument("--fidelity", choices=["original", "corrected"], default=None,
                   help="original recipe with its quirks (default) or corrected (e.g. RGB for depth)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of gen,depth,seg (default: all three)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256, ~0.76 GB fp16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records (smoke runs)")
    p.add_argument("--formats", default="zarr,wds", help="comma list of zarr,wds (default both)")
    p.add_argument("--encoding", choices=list(encodings.ENCODINGS), default=None,
                   help="stored encoding: fp16 or bf16 (lossless; default: the manifest's stored_dtype) or fp8 "
                        "(half the bytes, ~2%% relative error)")
    p.add_argument("--zarr-compression", choices=list(store.COMPRESSIONS), default="none",
                   help="zstd on Zarr chunks (fp16 features compress ~1.09x; default none)")
    p.add_argument("--batch-size", type=int, default=None, help="images per teacher forward (default 64 GPU, 8 CPU)")
    p.add_argument("--actors", type=int, default=None, help="teacher actors (default: GPUs / --gpus-per-actor, or 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor (default 1 with GPUs, else 0)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor (default 1)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="teacher compute dtype for all teachers (default auto: each teacher's compute_dtype from "
                        "the manifest on GPU, as the original ran them: gen float16, depth and seg bfloat16; "
                        "float32 on CPU)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: its CPUs)")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task (default 1)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="decoded batches queued per actor (default: enough to keep every CPU decoding, >= 2)")
    p.add_argument("--max-writers", type=int, default=None, help="shards awaiting commit at once (default 2x actors+1)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images over this many pixels before decoding (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--resize-on", choices=["auto", "cpu", "device"], default="auto",
                   help="where the recipes' resizes run: cpu (PIL in the decode workers) or device (the teachers' "
                        "GPU, bit-identical to PIL, checked against this Pillow when the actors start; ~4x fewer "
                        "bytes through Ray and most of the CPU work gone). Default auto: device on GPUs, else cpu")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray this job starts (default: all)")
    p.add_argument("--trust-done", action="store_true",
                   help="skip done shards after a size check instead of re-hashing them (fast resume)")
    p.add_argument("--shard-retries", type=int, default=2, help="resubmissions of a shard that fails (default 2)")
    p.add_argument("--plan-only", action="store_true", help="validate and print the plan, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    a = p.parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks: unknown {bad}; choose from {','.join(TASKS)}")
    if [f for f in formats if f not in store.FORMATS] or not formats:
        p.error(f"--formats: choose from {','.join(store.FORMATS)}")
    for name in ("shard_size", "batch_size", "actors", "limit", "prefetch", "max_writers"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return Settings(
        data_path=a.data_path, image_folder=a.image_folder, output=a.output, teachers_manifest=a.teachers_manifest,
        fidelity=a.fidelity, tasks=[t for t in TASKS if t in tasks], shard_size=a.shard_size, limit=a.limit,
        formats=formats, encoding=a.encoding, zarr_compression=a.zarr_compression, batch_size=a.batch_size,
        actors=a.actors, gpus_per_actor=a.gpus_per_actor, cpus_per_actor=a.cpus_per_actor, dtype=a.dtype,
        torch_threads=a.torch_threads, decode_cpus=a.decode_cpus, prefetch=a.prefetch, max_writers=a.max_writers,
        max_pixels=a.max_pixels, resize_on=a.resize_on, address=a.address, num_cpus=a.num_cpus, trust_done=a.trust_done,
        shard_retries=a.shard_retries, plan_only=a.plan_only, progress=not a.no_progress)


# ---- the store, before any work ---------------------------------------------------------------------------------


def layouts_for(manifest: TeacherManifest, tasks: list[str], encoding: str | None) -> dict[str, TaskLayout]:
    enc = encoding or encodings.LOSSLESS_FOR_DTYPE[manifest.stored_dtype]
    return {t: TaskLayout.for_shape(manifest.teachers[t].output_shape, enc) for t in tasks}


def check_existing(out: Location, plan: Plan, s: Settings, manifest: TeacherManifest) -> store.RunManifest | None:
    """The existing store's manifest if `out` is a store this run may continue, None if `out` is new. Every
    incompatibility is listed in one UsageError."""
    try:
        m = store.existing_manifest(out)
    except StoreError as e:
        raise UsageError(f"--output: {e}") from None
    if m is None:
        return None
    shared = [t for t in s.tasks if t in m.tasks]
    problems = store.resume_problems(out, m, dataset_sha256=plan.dataset_sha256, num_samples=plan.num_samples,
                                     shard_size=s.shard_size, formats=s.formats, compression=s.zarr_compression,
                                     layouts=layouts_for(manifest, s.tasks, s.encoding),
                                     identity=manifest.identity(shared))
    if problems:
        raise UsageError(f"{out} is a store this run cannot continue:\n  " + "\n  ".join(problems)
                         + "\nUse a new --output, or the settings the store was made with.")
    return m


def shard_work(plan: Plan, s: Settings, records: dict[int, ShardRecord], damaged: dict[int, list[str]],
               store_tasks=()) -> dict:
    """shard -> tasks to compute. A done shard whose files verify needs only the tasks it lacks; a damaged one
    is redone for everything it had and everything asked; one without a (readable) record for every task the
    store holds and everything asked."""
    work = {}
    for i in range(plan.num_shards):
        rec = records.get(i)
        if rec is None:
            need = [t for t in TASKS if t in s.tasks or t in store_tasks]
        elif i in damaged:
            need = [t for t in TASKS if t in s.tasks or t in rec.tasks]
        else:
            need = [t for t in s.tasks if t not in rec.tasks]
        if need:
            work[i] = tuple(need)
    return work


# ---- the run ---------------------------------------------------------------------------------------------------


LOCAL_RAY_ENV = {
    # single-node mode: Ray binds and talks on 127.0.0.1 only (otherwise it picks the default route's address)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def init_ray(s: Settings):
    """Join the cluster given (--address, or RAY_ADDRESS as `ray job submit` sets it), else start a local Ray on
    loopback that this process owns and stops."""
    if s.address or os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address=s.address, log_to_driver=True)
        return ray, False
    for k, v in LOCAL_RAY_ENV.items():  # read by Ray at import time, and inherited by its workers
        os.environ.setdefault(k, v)
    import ray

    ray.init(address="local", num_cpus=s.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True)
    return ray, True


def run(s: Settings) -> int:
    from tqdm import tqdm

    t_start = time.time()
    out = Location(s.output)
    # 1. plan and check everything that needs no model
    plan = make_plan(s.data_path, s.image_folder, s.shard_size, s.limit)
    manifest = load_manifest(s.teachers_manifest, fidelity=s.fidelity)
    manifest.select(s.tasks)
    existing = check_existing(out, plan, s, manifest)
    for w in image_library_warnings(existing, image_libraries(), "the driver"):
        print(w, flush=True)
    print(f"plan: {plan.num_samples} samples ({plan.records_in_file} in {plan.data_path.name}), {plan.num_shards} "
          f"shards of {s.shard_size}; tasks {','.join(s.tasks)}; teachers {manifest.name} ({manifest.fidelity}); "
          f"output {out} ({'resuming' if existing else 'new'})", flush=True)
    if s.plan_only:
        return 0

    check_writable(out)
    if not (s.address or os.environ.get("RAY_ADDRESS")):
        check_weights_locally(manifest, s.tasks)
    ray, started_local = init_ray(s)
    signal.signal(signal.SIGTERM, _on_sigterm)  # ray.init installs its own handler (a native abort): ours wins
    try:
        return _run_on_ray(ray, s, plan, manifest, out, existing, t_start, tqdm)
    finally:
        if started_local:
            with contextlib.suppress(BaseException):  # a second signal while Ray stops must not leave it running
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            ray.shutdown()


def _run_on_ray(ray, s, plan, manifest, out, existing, t_start, tqdm) -> int:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    gpa = s.gpus_per_actor if s.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    n_actors = s.actors or (max(1, int(gpus // gpa)) if gpa > 0 else 1)
    device = "cuda" if gpa > 0 else "cpu"
    dtype = compute_dtypes(manifest, list(manifest.teachers), device, s.dtype)  # {task: dtype name}
    batch = s.batch_size or (64 if device == "cuda" else 8)
    threads = s.torch_threads or max(1, int(s.cpus_per_actor))
    spare = cpus - n_actors * s.cpus_per_actor
    if gpa > 0 and gpus < n_actors * gpa:
        raise UsageError(f"{n_actors} actors x {gpa} GPUs need {n_actors * gpa:g} GPUs; the cluster has {gpus:g}")
    if spare < s.decode_cpus:  # the actors would hold every CPU and no image would ever be decoded
        raise UsageError(f"{n_actors} actors x {s.cpus_per_actor:g} CPUs leave {max(spare, 0):g} of the cluster's "
                         f"{cpus:g} CPUs, less than one decode task's {s.decode_cpus:g}: lower --actors or "
                         f"--cpus-per-actor (fractions are fine), or --decode-cpus")
    prefetch = s.prefetch or max(2, int(spare // s.decode_cpus // n_actors))
    max_writers = s.max_writers or 2 * n_actors + 1
    resize_on = s.resize_on if s.resize_on != "auto" else ("device" if device == "cuda" else "cpu")
    if resize_on == "device":
        from pipeline import pil_exact

        odd = [t for t in s.tasks if not pil_exact.supports(manifest.teachers[t].preprocess.ops)]
        if odd:
            raise UsageError(f"--resize-on device: the recipes of {', '.join(odd)} use an op or filter that only PIL "
                             f"computes ({', '.join(pil_exact.FILTERS)} are reproduced); use --resize-on cpu")

    # 2. verify what is done (in parallel), recover interrupted commits
    damaged: dict[int, list[str]] = {}
    records: dict[int, dict] = {}
    if existing:
        for action in store.recover(out):
            print(f"recover: {action}", flush=True)
        records = store.read_records(out)
        verify = ray.remote(num_cpus=1)(_verify)
        refs = {i: verify.remote(out.url, rec, not s.trust_done) for i, rec in records.items()}
        for i, ref in tqdm(refs.items(), desc="verify done shards", disable=not s.progress, leave=False):
            problems = ray.get(ref)
            if problems:
                damaged[i] = problems
                print(f"shard {i} will be redone: {'; '.join(problems)}", flush=True)
    work = shard_work(plan, s, records, damaged, existing.tasks if existing else ())
    load_tasks = [t for t in TASKS if any(t in need for need in work.values())]
    if not work:
        print("every shard is already done for the tasks asked: nothing to do", flush=True)

    # 3. teachers: load once per actor, check their weights against the store
    actors = []
    teacher_info = {}
    if load_tasks:
        all_layouts = layouts_for(manifest, load_tasks, s.encoding)
        if existing:  # tasks already in the store keep their layout
            all_layouts.update({t: existing.tasks[t] for t in load_tasks if t in existing.tasks})
        enc_by_task = {t: all_layouts[t].encoding for t in load_tasks}
        actor_cls = ray.remote(TeacherActor).options(num_gpus=gpa, num_cpus=s.cpus_per_actor, max_restarts=-1,
                                                      max_task_retries=2, max_concurrency=1)
        actors = [actor_cls.remote(s.teachers_manifest, manifest.fidelity, load_tasks, device, dtype, threads, enc_by_task,
                                   resize_on) for _ in range(n_actors)]
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except Exception as e:  # a missing checkpoint on a worker node surfaces here
            raise UsageError(f"loading the teachers failed on a worker: {_root_cause(e)}") from None
        teacher_info = infos[0]
        if any(i["weights_sha256"] != teacher_info["weights_sha256"] for i in infos):
            raise UsageError("the actors loaded different weights (does every node see the same checkpoints?)")
    weights = teacher_info.get("weights_sha256", {})

    # 4. create or update the store's manifests
    identity_tasks = sorted(set(load_tasks) | set(existing.tasks if existing else {}), key=TASKS.index)
    stored_teachers = (store.read_teachers(out, missing_ok=True) if existing else None) or {"teachers": {}}
    if existing and weights:
        for t in load_tasks:
            old = stored_teachers["teachers"].get(t, {}).get("weights_sha256")
            if old and old != weights[t]:
                raise UsageError(f"{t}: the store was computed with weights sha256 {old[:16]}..., the teacher now "
                                 f"loaded has {weights[t][:16]}...; use a new --output")
            old_dtype = stored_teachers["teachers"].get(t, {}).get("compute_dtype")
            if old_dtype and old_dtype != dtype[t]:
                raise UsageError(f"{t}: the store's targets were computed in {old_dtype}, this run computes in "
                                 f"{dtype[t]}; pass --dtype {old_dtype} (or run on the same kind of device), or "
                                 f"use a new --output")
    # tasks computed now take this run's identity; the others keep what the store recorded for them
    new_identity = manifest.identity(load_tasks, weights, compute_dtypes=dtype)
    merged = {t: new_identity["teachers"].get(t) or stored_teachers["teachers"].get(t) for t in identity_tasks}
    new_identity["teachers"] = {t: v for t, v in merged.items() if v is not None}
    versions = _versions()
    extraction = {"batch_size": batch, "actors": n_actors, "gpus_per_actor": gpa, "cpus_per_actor": s.cpus_per_actor,
                  "device": teacher_info.get("device", device), "dtype": dtype, "torch_threads": threads,
                  "max_pixels": s.max_pixels, "fidelity": manifest.fidelity, "resize_on": resize_on, **versions}
    if existing:
        m = existing
        new_layouts = layouts_for(manifest, load_tasks, s.encoding)
        m.tasks = {t: m.tasks.get(t) or new_layouts[t] for t in TASKS if t in m.tasks or t in new_layouts}
        m.runs.append({"started": store.now(), "tasks": s.tasks, **extraction})
        m.extraction = extraction
        m.code = store.code_version()
        m.finished = None
    else:
        out.makedirs()
        m = store.RunManifest(dataset=plan.dataset_info(), num_samples=plan.num_samples, shard_size=s.shard_size,
                              formats=s.formats, tasks=layouts_for(manifest, s.tasks, s.encoding),
                              zarr_compression=s.zarr_compression, extraction=extraction)
        m.runs = [{"started": store.now(), "tasks": s.tasks, **extraction}]
    store.write_manifest(out, m)
    store.write_teachers(out, new_identity)
    store.ensure_zarr(out, m)

    worker_libs = ray.get(ray.remote(num_cpus=s.decode_cpus)(image_libraries).remote())  # what decodes
    if worker_libs != image_libraries():
        print(f"warning: the decode workers have other image libraries than the driver ({worker_libs} vs "
              f"{image_libraries()}); the store records the workers'", flush=True)
    for w in image_library_warnings(existing, worker_libs, "the decode workers"):
        print(w, flush=True)
    m.extraction.update(worker_libs)
    m.runs[-1].update(worker_libs)

    # 5. the pipeline: decode tasks -> actors -> writer tasks, with bounded queues
    decode = ray.remote(num_cpus=s.decode_cpus, max_retries=3)(_decode).options(num_returns=2)
    write = ray.remote(num_cpus=min(1.0, s.decode_cpus), max_retries=3)(_write)  # mostly I/O
    specs = {t: manifest.teachers[t] for t in load_tasks}
    queue = deque(sorted(work))
    total = sum(len(plan.shard_records(i)) for i in work)
    attempts = {i: 0 for i in work}
    failed: dict[int, str] = {}
    done_records: dict[int, ShardRecord] = {}
    inflight: dict = {}  # target ref -> (actor, samples)
    load = [0] * len(actors)
    writers: dict = {}  # writer ref -> shard
    previous_of: dict[int, ShardRecord | None] = {}  # shard -> the record it had before this run redid it
    # leases: a second job on the same --output computes other shards, then waits for the first one's
    owner = store.lease_owner()
    held: set[int] = set()
    deferred: dict[int, str] = {}  # shard -> the job holding its lease
    by_others: set[int] = set()
    renewed, waiting_said = time.time(), False
    bad = 0
    bar = tqdm(total=total, unit="img", desc="extract", disable=not s.progress, smoothing=0.05)
    t_run = time.time()

    def done_by_another_job(i: int) -> bool:
        rec = store.read_record(out, i)  # a record that was not there (or not this one) when this run began
        fresh = rec is not None and (i not in records or rec.to_dict() != records[i].to_dict())
        return fresh and set(work[i]) <= set(rec.tasks)

    def submit_shard(i: int):
        if i not in held:
            if not store.take_lease(out, i, owner):
                deferred[i] = (store.lease_holder(out, i) or {}).get("owner", "another job")
                return
            held.add(i)
            if done_by_another_job(i):  # it committed the shard and let go of it before this run got here
                release(i)
                by_others.add(i)
                bar.update(len(plan.shard_records(i)))
                return
        tasks = work[i]
        metas, targets = [], []
        for chunk in batches_of(plan.shard_records(i), batch):
            a = min(range(len(actors)), key=load.__getitem__)
            pix, meta = decode.remote(chunk, str(plan.image_folder), [specs[t] for t in tasks], s.max_pixels, resize_on)
            ref = actors[a].run.remote(pix, list(tasks))
            inflight[ref] = (a, len(chunk))
            load[a] += 1
            metas.append(meta)
            targets.append(ref)
        if i not in previous_of:  # a shard being redone is not done meanwhile (a damaged record goes too);
            previous_of[i] = store.begin_redo(out, i)  # a retry keeps what the first attempt found
        writers[write.remote(out.url, i, tasks, previous_of[i], metas, targets)] = i
        attempts[i] += 1

    def can_submit() -> bool:
        return bool(queue) and len(writers) < max_writers and min(load) < prefetch

    def release(i: int):
        store.release_lease(out, i, owner)
        held.discard(i)

    try:
        while queue or inflight or writers or deferred:
            while can_submit():
                submit_shard(queue.popleft())
            if time.time() - renewed > store.LEASE_TTL / 4:
                for i in held:
                    store.renew_lease(out, i, owner)
                renewed = time.time()
            if not (queue or inflight or writers):  # only shards another job holds are left: wait for them
                if not waiting_said:
                    print(f"waiting for {len(deferred)} shard(s) that another job is computing "
                          f"({', '.join(sorted(set(deferred.values())))})", flush=True)
                    waiting_said = True
                time.sleep(2.0)
                for i in list(deferred):
                    if done_by_another_job(i):
                        deferred.pop(i)
                        by_others.add(i)
                        bar.update(len(plan.shard_records(i)))
                    elif store.lease_holder(out, i) is None:  # it gave the shard up (failed, stopped): ours now
                        deferred.pop(i)
                        queue.append(i)
                continue
            ready, _ = ray.wait(list(inflight) + list(writers), num_returns=1, timeout=1.0, fetch_local=False)
            for ref in ready:
                if ref in inflight:
                    a, n = inflight.pop(ref)
                    load[a] -= 1
                    bar.update(n)
                    continue
                i = writers.pop(ref)
                try:
                    rec = ray.get(ref)
                    store.commit_record(out, rec)  # the driver is the only writer of records
                except Exception as e:  # the commit failed even after Ray's retries
                    reason = f"{type(e).__name__}: {str(getattr(e, 'cause', None) or e)[:400]}"
                    if attempts[i] <= s.shard_retries:
                        print(f"shard {i} failed ({reason}); retrying", flush=True)
                        queue.append(i)
                        bar.update(-len(plan.shard_records(i)))
                    else:
                        failed[i] = reason
                        release(i)
                        print(f"shard {i} FAILED after {attempts[i]} attempts: {reason}", flush=True)
                    continue
                release(i)
                done_records[i] = rec
                bad += rec.bad_images
                bar.set_postfix(shards=f"{len(done_records)}/{len(work)}", bad=bad, failed=len(failed), refresh=False)
                m.progress = _progress(done_records, total, t_run, failed)
                store.write_manifest(out, m)
    finally:
        for i in list(held):  # stopped or failed: hand the shards back at once rather than at expiry
            release(i)
    bar.close()

    # 6. finish: errors.jsonl, manifest, summary
    utilisation = ray.get([a.utilisation.remote() for a in actors]) if actors else []
    n_err = store.rebuild_errors(out)
    final_records = store.read_records(out)
    all_done = all(i in final_records and set(m.tasks) <= set(final_records[i].tasks) for i in range(plan.num_shards))
    if work:
        m.progress = _progress(done_records, total, t_run, failed, utilisation)
    m.finished = (m.finished or store.now()) if all_done and not failed else None
    m.runs[-1].update(finished=store.now(), shards_done=len(done_records), shards_failed=sorted(failed))
    store.write_manifest(out, m)
    _print_summary(m, plan, done_records, final_records, failed, n_err, time.time() - t_start, work, by_others)
    return 1 if failed else 0


def check_writable(out: Location) -> None:
    """Fail before any model is loaded when the output cannot be written (under a file, read-only, no
    permission, no bucket): write and remove a probe file or object."""
    probe = f".olaf-write-probe-{os.getpid()}"
    try:
        out.makedirs()
        out.write_bytes(probe, b"ok")
        out.remove(probe)
    except (OSError, ValueError, PermissionError) as e:
        what = type(e).__name__ if not getattr(e, "strerror", None) else e.strerror
        raise UsageError(f"--output {out} cannot be written ({what}): choose a writable folder or bucket "
                         f"prefix") from None


def _root_cause(e: Exception) -> str:
    """The last 'SomeError: message' line of a Ray error's remote traceback (the loader's own words)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "NotFound")) and " " not in head:
            return ln
    return lines[-1] if lines else type(e).__name__


def check_weights_locally(manifest: TeacherManifest, tasks: list[str]) -> None:
    """With a local Ray the driver sees what the actors will see: fail fast, with the loader's message, on a
    checkpoint that is not there (config.json only; no weights are read)."""
    from teachers.registry import adapter_for
    from teachers.weights import load_config

    for spec in manifest.select(tasks):
        load_config(adapter_for(spec).config_class, spec.weights, spec.task)


def _versions() -> dict:
    import platform

    import ray
    import torch
    import transformers
    import zarr

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__, "zarr": zarr.__version__, **image_libraries()}


def image_library_warnings(existing: store.RunManifest | None, now: dict, where: str = "this machine") -> list[str]:
    """Pixels are bit-exact only for the Pillow / libjpeg-turbo / zlib that computed them: a resume or an added
    task with other versions may give targets that differ in the last bits from those already stored. Pillow 13
    and later resize in another pass order than the authors' Pillow (10.2), for every version of a store."""
    out = []
    if int(str(now.get("pillow", "0")).split(".")[0]) >= 13:
        out.append(f"warning: Pillow {now['pillow']} on {where} resizes an image whose height shrinks by more than "
                   f"twice as many pixels as its width vertically first; the authors' Pillow 10.2 always went "
                   f"horizontally first, so such images (e.g. portrait photos for the depth recipe) get slightly "
                   f"other pixels and targets. Install pillow<13 (what olaf's requirements ask) to match them.")
    if existing is None:
        return out
    before = {**existing.extraction, **{k: v for r in existing.runs for k, v in r.items() if k in now}}
    changed = [f"{k} {before[k]} -> {now[k]}" for k in now if k in before and before[k] != now[k]]
    if not changed:
        return out
    return out + [f"warning: the image libraries differ from those the store was computed with ({', '.join(changed)} "
            f"on {where}): the recipes' resizes are bit-exact only within one set of versions, so targets "
            f"computed now may differ slightly from those already stored. Install the store's versions to keep "
            f"the store uniform, or use a new --output."]


def _progress(done: dict, total: int, t0: float, failed: dict, utilisation: list | None = None) -> dict:
    n = sum(r.count for r in done.values())
    secs = max(time.time() - t0, 1e-9)
    p = {"samples_done": n, "samples_planned": total, "shards_done": len(done), "shards_failed": sorted(failed),
         "bad_images": sum(r.bad_images for r in done.values()), "seconds": round(secs, 1),
         "samples_per_s": round(n / secs, 2),
         "decode_cpu_ms_per_sample": round(1e3 * sum(r.extra.get("decode_cpu_s", 0) for r in done.values()) / max(n, 1), 2),
         "teacher_ms_per_sample": round(1e3 * sum(r.extra.get("teacher_s", 0) for r in done.values()) / max(n, 1), 2)}
    if utilisation:
        fr = [u["busy_fraction"] for u in utilisation if u["busy_fraction"] is not None]
        p["actor_busy_fraction"] = round(sum(fr) / len(fr), 3) if fr else None
    return p


def _print_summary(m, plan, done, records, failed, n_err, seconds, work, by_others=()) -> None:
    p = m.progress if work else {}
    n_done = sum(r.count for r in done.values())
    print("\nextraction summary")
    rows = [
        ("shards", f"{len(done)} written now, {plan.num_shards - len(work)} were already done, "
                   + (f"{len(by_others)} done by another job meanwhile, " if by_others else "") + f"{len(failed)} failed"
                   f" ({len(records)} of {plan.num_shards} done in the store)"),
        ("samples", f"{n_done} written now ({sum(r.bad_images for r in done.values())} bad images); "
                    f"{plan.num_samples} in the store"),
        ("valid targets", ", ".join(f"{t} {sum(r.valid.get(t, 0) for r in records.values())}" for t in m.tasks)
         + " (store)"),
        ("errors.jsonl", f"{n_err} lines"),
    ]
    if work:
        rows += [
            ("throughput", f"{p['samples_per_s']} samples/s over {p['seconds']} s (wall {seconds:.1f} s incl. start-up)"),
            ("decode", f"{p['decode_cpu_ms_per_sample']} CPU ms/sample"),
            ("teachers", f"{p['teacher_ms_per_sample']} ms/sample on {m.extraction.get('device')}, "
                         f"actors busy {p.get('actor_busy_fraction')} of their running time"),
        ]
    for k, v in rows:
        print(f"  {k:<14} {v}")
    if failed:
        print("  FAILED shards: " + "; ".join(f"{i}: {r}" for i, r in sorted(failed.items())))
        print("  re-run the same command to retry them")
    busy = p.get("actor_busy_fraction")
    if busy is not None and busy < 0.8 and n_done > 0:
        print("  note: the teachers waited for input part of the time: add CPUs (decode) or --prefetch")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send on preemption): stop as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(s)
    except (DatasetError, ManifestError, StoreError, UsageError, WeightsNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"\n{name}: stopped; committed shards are safe; re-run the same command to resume", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
