"""The extraction, stage after stage (pipeline/extract/cli.py's help describes them): plan and preflight, Ray,
resources, the done shards verified, the teachers loaded, the store opened, the shards scheduled, the report."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from tqdm import tqdm

from pipeline.extract import preflight
from pipeline.extract.actors import TeacherActor, verify_task
from pipeline.extract.plan import Plan, make_plan
from pipeline.extract.report import print_summary, progress
from pipeline.extract.resources import Resources, init_ray, plan_resources
from pipeline.extract.scheduler import ShardScheduler
from pipeline.extract.settings import Settings, UsageError, on_sigterm
from pipeline.provenance import code_version, image_library_warnings, versions
from recipes.imageops import image_libraries
from recipes.manifest import TeacherManifest, load_manifest, ordered_tasks
from store import Location, RunManifest, StoreExists, StoreWriter, now


def run(s: Settings) -> int:
    t_start = time.time()
    plan = make_plan(s.data_path, s.image_folder, s.shard_size, s.limit, s.image_keys, s.caption_key, s.id_prefix,
                     (s.image_column, s.caption_column, s.id_column))
    for w in plan.source.warnings():
        print(w, flush=True)
    manifest = load_manifest(s.teachers_manifest, fidelity=s.fidelity)
    s.tasks = s.task_list()  # --tasks, or every teacher of the manifest
    manifest.select(s.tasks)
    existing = preflight.existing_store(s.store_shape, plan, manifest)
    for w in image_library_warnings(existing and existing.manifest, image_libraries(), "the driver"):
        print(w, flush=True)
    print(f"plan: {plan.source.describe()}, {plan.num_shards} "
          f"shards of {s.shard_size}; tasks {','.join(s.tasks) or 'none (images, captions and ids only)'}; teachers {manifest.name} ({manifest.fidelity}); "
          f"output {Location(s.output)} ({'resuming' if existing else 'new'})", flush=True)
    # what a real run refuses before it starts, a plan refuses too: a plan that says OK means the run will start
    preflight.check_writable(Location(s.output), keep=not s.plan_only)
    if not (s.address or os.environ.get("RAY_ADDRESS")):
        preflight.check_weights_locally(manifest, s.tasks)
    if s.plan_only:
        print("plan OK: the output can be written, the teachers' weights are where the manifest says"
              + ("" if existing is None else ", the store can be continued with them"), flush=True)
        return 0
    ray, started_local = init_ray(s.address, s.num_cpus)
    signal.signal(signal.SIGTERM, on_sigterm)  # ray.init installs its own handler (a native abort): ours wins
    try:
        return _on_ray(ray, s, plan, manifest, existing, t_start)
    finally:
        if started_local:
            with contextlib.suppress(BaseException):  # a second signal while Ray stops must not leave it running
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            ray.shutdown()


def _on_ray(ray, s: Settings, plan: Plan, manifest: TeacherManifest, existing: StoreWriter | None,
            t_start: float) -> int:
    res = plan_resources(ray.cluster_resources(), s.cluster_ask, manifest)
    records, damaged = verify_done(ray, existing, full=not s.trust_done, progress=s.progress) if existing else ({}, {})
    work = preflight.shard_work(plan, s.tasks, records, damaged, existing.manifest.tasks if existing else ())
    load_tasks = ordered_tasks(t for need in work.values() for t in need)
    if not work:
        print("every shard is already done for the tasks asked: nothing to do", flush=True)
    actors, info = start_actors(ray, s, manifest, load_tasks, res, existing) if load_tasks else ([], {})
    worker_libs = ray.get(ray.remote(num_cpus=s.decode_cpus)(image_libraries).remote())  # what decodes
    writer = open_store(s, plan, manifest, existing, load_tasks, res, info, worker_libs)
    bar = tqdm(total=sum(plan.shard_count(i) for i in work), unit="img", desc="extract",
               disable=not s.progress, smoothing=0.05)
    t_run, total = time.time(), bar.total

    def on_commit(sched: ShardScheduler) -> None:
        writer.record_progress(progress(sched.done, total, t_run, sched.failed))

    sched = ShardScheduler(ray, writer, plan, work, actors, {t: manifest.teachers[t] for t in load_tasks}, res,
                           records=records, decode_cpus=s.decode_cpus, max_pixels=s.max_pixels,
                           retries=s.shard_retries, bar=bar, on_commit=on_commit,
                           committed={i for i in records if i not in damaged})
    with contextlib.closing(bar):
        sched.run()
    utilisation = ray.get([a.utilisation.remote() for a in actors]) if actors else []
    return finish(writer, plan, work, sched, utilisation, t_run, time.time() - t_start)


def verify_done(ray, existing: StoreWriter, full: bool, progress: bool) -> tuple[dict, dict]:
    """Remove what an interrupted write left, then check every done shard's files (in parallel): (records,
    {shard: problems} of the damaged ones, which are redone)."""
    for action in existing.recover():
        print(f"recover: {action}", flush=True)
    records = existing.records()
    verify = ray.remote(num_cpus=1)(verify_task)
    refs = {i: verify.remote(existing.loc, rec, full) for i, rec in records.items()}
    damaged = {}
    for i, ref in tqdm(refs.items(), desc="verify done shards", disable=not progress, leave=False):
        problems = ray.get(ref)
        if problems:
            damaged[i] = problems
            print(f"shard {i} will be redone: {'; '.join(problems)}", flush=True)
    return records, damaged


def start_actors(ray, s: Settings, manifest: TeacherManifest, tasks: list[str], res: Resources,
                 existing: StoreWriter | None) -> tuple[list, dict]:
    """One teacher actor per GPU (or as asked), each loading every teacher of `tasks` once; (actors, the first
    actor's info: weights sha256, device)."""
    layouts = preflight.layouts_for(manifest, tasks, s.encoding)
    if existing:  # tasks already in the store keep their layout
        layouts.update({t: existing.manifest.tasks[t] for t in tasks if t in existing.manifest.tasks})
    actor_cls = ray.remote(TeacherActor).options(num_gpus=res.gpus_per_actor, num_cpus=s.cpus_per_actor,
                                                  max_restarts=-1, max_task_retries=2, max_concurrency=1)
    actors = [actor_cls.remote(s.teachers_manifest, manifest.fidelity, tasks, res.device, res.dtype, res.threads,
                               {t: layouts[t].encoding for t in tasks}, res.resize_on) for _ in range(res.actors)]
    try:
        infos = ray.get([a.info.remote() for a in actors])
    except Exception as e:  # a missing checkpoint on a worker node surfaces here
        raise UsageError(f"loading the teachers failed on a worker: {_root_cause(e)}") from None
    if any(i["weights_sha256"] != infos[0]["weights_sha256"] for i in infos):
        raise UsageError("the actors loaded different weights (does every node see the same checkpoints?)")
    return actors, infos[0]


def _root_cause(e: Exception) -> str:
    """The last 'SomeError: message' line of a Ray error's remote traceback (the loader's own words)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "NotFound")) and " " not in head:
            return ln
    return lines[-1] if lines else type(e).__name__


def teacher_identity(manifest: TeacherManifest, existing: StoreWriter | None, tasks: list[str], res: Resources,
                     weights: dict, files: dict) -> dict:
    """The store's teachers.yaml after this run: the tasks computed now take this run's identity (refused when
    the store's targets came from other weights or another dtype), the others keep what the store recorded."""
    stored = ((existing.teachers() if existing else None) or {"teachers": {}})["teachers"]
    for t in tasks if existing and weights else []:
        old, old_dtype = stored.get(t, {}).get("weights_sha256"), stored.get(t, {}).get("compute_dtype")
        if old and old != weights[t]:
            raise UsageError(f"{t}: the store was computed with weights sha256 {old[:16]}..., the teacher now "
                             f"loaded has {weights[t][:16]}...; use a new --output")
        if old_dtype and old_dtype != res.dtype[t]:
            raise UsageError(f"{t}: the store's targets were computed in {old_dtype}, this run computes in "
                             f"{res.dtype[t]}; pass --dtype {old_dtype} (or run on the same kind of device), or "
                             f"use a new --output")
    identity = manifest.identity(tasks, weights, compute_dtypes=res.dtype, files_sha256=files)
    every = ordered_tasks([*tasks, *(existing.manifest.tasks if existing else ())])
    merged = {t: identity["teachers"].get(t) or stored.get(t) for t in every}
    identity["teachers"] = {t: v for t, v in merged.items() if v is not None}
    return identity


def open_store(s: Settings, plan: Plan, manifest: TeacherManifest, existing: StoreWriter | None,
               tasks: list[str], res: Resources, info: dict, worker_libs: dict) -> StoreWriter:
    """Create the store, or update the one being continued (its tasks, this run, the teachers), before any shard
    is written."""
    identity = teacher_identity(manifest, existing, tasks, res, info.get("weights_sha256", {}),
                                info.get("files_sha256", {}))
    if worker_libs != image_libraries():
        print(f"warning: the decode workers have other image libraries than the driver ({worker_libs} vs "
              f"{image_libraries()}); the store records the workers'", flush=True)
    for w in image_library_warnings(existing and existing.manifest, worker_libs, "the decode workers"):
        print(w, flush=True)
    extraction = {"batch_size": res.batch, "actors": res.actors, "gpus_per_actor": res.gpus_per_actor,
                  "cpus_per_actor": s.cpus_per_actor, "device": info.get("device", res.device), "dtype": res.dtype,
                  "torch_threads": res.threads, "max_pixels": s.max_pixels, "fidelity": manifest.fidelity,
                  "resize_on": res.resize_on, **versions(), **worker_libs}
    run = {"started": now(), "tasks": s.tasks, **extraction}
    if existing is None:
        m = RunManifest(dataset=plan.source.dataset_info(), num_samples=plan.num_samples, shard_size=s.shard_size,
                        formats=s.formats, tasks=preflight.layouts_for(manifest, s.tasks, s.encoding),
                        zarr_compression=s.zarr_compression, extraction=extraction, runs=[run], code=code_version())
        try:
            return StoreWriter.create(s.output, m, identity)
        except StoreExists:  # another job on the same new output made it first: continue it, if it fits
            print("another job created the store meanwhile: continuing it", flush=True)
            existing = preflight.existing_store(s.store_shape, plan, manifest)
            identity = teacher_identity(manifest, existing, tasks, res, info.get("weights_sha256", {}),
                                        info.get("files_sha256", {}))
    existing.start_run(run, extraction, code_version(), identity, preflight.layouts_for(manifest, tasks, s.encoding),
                       ordered_tasks([*existing.manifest.tasks, *tasks]))
    return existing


def finish(writer: StoreWriter, plan: Plan, work: dict, sched: ShardScheduler, utilisation: list, t_run: float,
           wall: float) -> int:
    """errors.jsonl, the manifest's last word (finished when every shard is done), the summary; the exit status."""
    n_err = writer.rebuild_errors()
    writer.build_index()  # what the trainer starts from: the records as a few mmapped arrays
    final = writer.records()
    done = progress(sched.done, sum(plan.shard_count(i) for i in work), t_run, sched.failed, utilisation) \
        if work else None
    writer.finish_run(done, final, len(sched.done), list(sched.failed))
    print_summary(writer.manifest, plan, sched.done, final, sched.failed, n_err, wall, work, sched.by_others)
    return 1 if sched.failed else 0
