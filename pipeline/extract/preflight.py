"""Everything that needs no model, checked before any is loaded: the dataset (plan), the teacher manifest, the
store to continue (or a new one), that the output can be written, that the weights are where the manifest says;
and, once the done shards are verified, which tasks each shard still needs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import store
from pipeline.extract.plan import Plan
from pipeline.extract.settings import StoreShape, UsageError
from recipes.manifest import TeacherManifest, ordered_tasks
from recipes.weights_files import manifest_files_sha256
from store import ShardRecord, StoreWriter, TaskLayout


def layouts_for(manifest: TeacherManifest, tasks: list[str], encoding: str | None) -> dict[str, TaskLayout]:
    enc = encoding or store.encodings.LOSSLESS_FOR_DTYPE[manifest.stored_dtype]
    return {t: TaskLayout.for_shape(manifest.teachers[t].output_shape, enc) for t in tasks}


def existing_store(s: StoreShape, plan: Plan, manifest: TeacherManifest) -> StoreWriter | None:
    """The store at --output if it is one this run may continue, None if --output is new. Every incompatibility
    is listed in one UsageError."""
    try:
        w = StoreWriter.existing(s.output)
    except store.StoreError as e:
        raise UsageError(f"--output: {e}") from None
    if w is None:
        return None
    shared = [t for t in s.tasks if t in w.manifest.tasks]
    # the weight files' content where this machine has them: a store made with other weights is refused here,
    # before Ray starts, not after the teachers are loaded
    identity = manifest.identity(shared, files_sha256=manifest_files_sha256(manifest, shared))
    problems = w.resume_problems(dataset=plan.source.dataset_info(), num_samples=plan.num_samples,
                                 shard_size=s.shard_size, formats=list(s.formats), compression=s.zarr_compression,
                                 layouts=layouts_for(manifest, s.tasks, s.encoding), identity=identity)
    if problems:
        raise UsageError(f"{w.loc} is a store this run cannot continue:\n  " + "\n  ".join(problems)
                         + "\nUse a new --output, or the settings the store was made with.")
    return w


def check_writable(out: store.Location, keep: bool = True) -> None:
    """Fail before any model is loaded when the output cannot be written (under a file, read-only, no
    permission, no bucket): write and remove a probe file or object. `keep=False` (a plan) removes the folders
    the probe made."""
    made = _first_missing(Path(out.url)) if out.local else None
    try:
        _probe(out)
    finally:
        if made is not None and not keep:
            for d in [Path(out.url).resolve(), *Path(out.url).resolve().parents]:
                with contextlib.suppress(OSError):  # only empty folders go, and only those the probe made
                    d.rmdir()
                if d == made:
                    break


def _first_missing(path: Path) -> Path | None:
    path = path.resolve()
    missing = None
    for d in [path, *path.parents]:
        if d.exists():
            return missing
        missing = d
    return missing


def _probe(out: store.Location) -> None:
    inside = store.enclosing_store(out.url)
    if inside is not None and Path(inside) != Path(out.url).resolve():
        raise UsageError(f"--output {out} lies inside the olaf store {inside}: a store within a store damages both; "
                         f"choose a folder outside it")
    try:
        store.check_writable(out)
    except store.StoreError as e:  # access: credentials, endpoint, permission
        raise UsageError(f"--output {out} cannot be written: {e}") from None
    except (OSError, ValueError) as e:
        what = type(e).__name__ if not getattr(e, "strerror", None) else e.strerror
        raise UsageError(f"--output {out} cannot be written ({what}): choose a writable folder or bucket "
                         f"prefix") from None


def check_weights_locally(manifest: TeacherManifest, tasks: list[str]) -> None:
    """With a local Ray the driver sees what the actors will see: fail fast, with the loader's message, on a
    checkpoint that is not there (config.json only; no weights are read)."""
    from teachers.registry import adapter_for
    from teachers.weights import load_config

    for spec in manifest.select(tasks):
        load_config(adapter_for(spec).config_class, spec.weights, spec.task)


def shard_work(plan: Plan, tasks: list[str], records: dict[int, ShardRecord], damaged: dict[int, list[str]],
               store_tasks=()) -> dict[int, tuple[str, ...]]:
    """shard -> tasks to compute (`tasks`: the run's). A done shard whose files verify needs only the tasks it
    lacks; a damaged one is redone for everything it had and everything asked; one without a (readable) record for
    every task the store holds and everything asked. A shard without a record, or a damaged one, is written even with no task
    (a store of images, captions and ids only)."""
    work = {}
    for i in range(plan.num_shards):
        rec = records.get(i)
        if rec is None:
            need = ordered_tasks([*tasks, *store_tasks])
        elif i in damaged:
            need = ordered_tasks([*tasks, *rec.tasks])
        else:
            need = [t for t in tasks if t not in rec.tasks]
        if need or rec is None or i in damaged:
            work[i] = tuple(need)
    return work
