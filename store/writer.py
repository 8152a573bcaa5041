"""Writing a store, through one object with one protocol: `StoreWriter`.

    w = StoreWriter.create(url, manifest, teachers)     # or StoreWriter.existing(url) / StoreWriter.open(url)
    previous = w.redo(i)                               # 1. a shard being (re)done loses its record first
    record = w.write(result, previous)                 # 2. its data files, each whole under its final name
    w.commit(record)                                   # 3. the record, created last and exactly once
    w.commit_shard(result)                             # 1-3 in one process

Commit protocol (the same on a local path and on object storage; docs/format.md "Commits"):
  1. a shard being redone first loses its record: from then on it is simply not done;
  2. its data files are written under their final names, each whole (local: temporary name + rename; object
     storage: one PUT or multipart upload, visible only once complete): the Zarr shard objects, then the tar,
     hashed as they are written;
  3. the record is created last, with a conditional create (local: hard link; S3: If-None-Match). A record that
     already exists means another writer committed the shard: refused.
A crash before 3 leaves the shard not done and at most orphan data objects, which the redo overwrites and
`verify` reports; readers never look at a shard without a record. `write` may run in any process (shards are
independent); `redo` and `commit` belong to the one process that schedules the shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from store import layout, recovery, tar, zarr_io
from store.codec import meta_of, sample_members, sample_meta, target_members_of
from store.fs import Location, StoreError
from store.identity import check_identity, read_teachers, teacher_mismatches, write_teachers
from store.lease import Leases, ManifestLock
from store.manifest import (
    RunManifest,
    ShardRecord,
    TaskLayout,
    dumps,
    merged,
    now,
    parse_manifest,
    read_manifest,
    read_record,
    read_records,
)


@dataclass
class SampleResult:
    """One sample as the writer gets it: the dataset record, the raw image bytes, and why it failed if it did."""

    index: int
    id: str
    record: dict
    image: str | None  # the record's relative image path
    image_bytes: bytes | None
    error: str | None = None  # decode or preprocessing failure: every task invalid


@dataclass
class ShardResult:
    """One shard's samples in dataset order and their encoded targets, rows aligned with `samples` (the
    extraction builds it by joining on sample ids)."""

    shard: int
    tasks: tuple[str, ...]  # tasks computed in this pass
    samples: list[SampleResult]
    values: dict[str, np.ndarray]  # task -> encoded (n, T, W); rows of invalid samples are zero
    scales: dict[str, np.ndarray | None]
    valid: dict[str, np.ndarray]  # task -> bool (n,)
    task_errors: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> {position in shard: reason}
    seconds: float = 0.0
    teachers: dict[str, dict] = field(default_factory=dict)  # task -> what computed it (weights, recipe, dtype)


class StoreExists(StoreError):
    """Another job created the store first (two jobs started together on one new output)."""


def check_writable(url) -> None:
    """Raise OSError / StoreError when `url` cannot be written (under a file, read-only, no permission, no
    bucket): a probe object written and removed, which `StoreWriter.existing` never counts as content."""
    loc = url if isinstance(url, Location) else Location(url)
    probe = f"{layout.WRITE_PROBE}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    loc.makedirs()
    loc.write_bytes(probe, b"ok")
    loc.remove(probe)


class StoreWriter:
    """A store opened for writing: its location and run manifest."""

    def __init__(self, loc: Location | str, manifest: RunManifest):
        self.loc = loc if isinstance(loc, Location) else Location(loc)
        self.manifest = manifest

    # ---- opening ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, url, manifest: RunManifest, teachers: dict) -> StoreWriter:
        """A new store at `url` (a folder or a prefix): manifest, teacher identity (every store says which
        teachers computed it) and Zarr arrays. The manifest is created first and exclusively: StoreExists when another job created the store meanwhile."""
        w = cls(url, manifest)
        w.loc.makedirs()
        manifest.updated, manifest.store_id = now(), manifest.store_id or uuid.uuid4().hex
        if not w.loc.create_exclusive(layout.MANIFEST, dumps(manifest.to_dict())):
            raise StoreExists(f"{w.loc} was created by another job meanwhile")
        w.save(teachers)
        return w

    @classmethod
    def open(cls, url) -> StoreWriter:
        """The store at `url`, to write more shards (a writer worker opens it so)."""
        loc = url if isinstance(url, Location) else Location(url)
        return cls(loc, read_manifest(loc))

    @classmethod
    def existing(cls, url) -> StoreWriter | None:
        """The store at `url` if there is one, None if `url` is absent or empty; anything else there is refused."""
        loc = url if isinstance(url, Location) else Location(url)
        if loc.is_empty_or_absent():
            return None
        if not loc.isfile(layout.MANIFEST):
            if all(PurePosixPath(n).name.startswith(layout.WRITE_PROBE) for n in loc.list("")):
                return None  # only another job's writability probe: the store is yet to be made
            raise StoreError(f"{loc} exists, is not empty and is not an olaf store; choose another output")
        return cls(loc, read_manifest(loc))

    def save(self, teachers: dict | None = None, update=None) -> None:
        """Write the run manifest (and the teacher identity), and create the Zarr arrays its tasks need; the one
        place shard writers' metadata comes from (they write data objects only). The manifest keeps a copy of
        the teacher identity, from which `restore_teachers` repairs a damaged teachers.yaml."""
        if teachers is not None:
            self.manifest.teachers = teachers
        self.save_manifest(update, teachers_file=teachers is not None)
        zarr_io.create_arrays(self.loc, self.manifest)

    def save_manifest(self, update=None, teachers_file: bool = False) -> None:
        """Under the store's manifest lock: what another job saved since (its tasks, runs, teachers) merged into
        this job's manifest, `update(manifest)` applied, the generation counted up, then the manifest, its backup
        copy (the same bytes: damage to one leaves the other to restore from) and, with `teachers_file`,
        teachers.yaml from the merged identity."""
        with ManifestLock(self.loc):
            try:
                disk = parse_manifest(self.loc, layout.MANIFEST)
            except (FileNotFoundError, StoreError):
                disk = None  # a new store, or a damaged manifest this save replaces
            m = self.manifest = merged(disk, self.manifest) if disk is not None else self.manifest
            if update is not None:
                update(m)
            m.store_id = m.store_id or uuid.uuid4().hex
            m.generation += 1
            m.updated = now()
            data = dumps(m.to_dict())
            self.loc.write_bytes(layout.MANIFEST, data)
            self.loc.write_bytes(layout.MANIFEST_BACKUP, data)
            if teachers_file:
                write_teachers(self.loc, m.teachers)

    @staticmethod
    def restore_manifest(url) -> tuple[RunManifest, list[str]]:
        """Rewrite a damaged manifest from its backup copy, reconciled with the shards' records (store.recovery);
        (the manifest, what was reconciled)."""
        return recovery.restore_manifest(url if isinstance(url, Location) else Location(url))

    # ---- a run's record in the manifest ------------------------------------------------------------------------
    def start_run(self, run: dict, extraction: dict, code: dict, teachers: dict, new_tasks: dict[str, TaskLayout],
                  order) -> None:
        """A run continues this store: its tasks join the store's (a task already there keeps its layout; `order`
        is the order of every listing of tasks), it is recorded under `runs`, the manifest says it is not
        finished, and the teacher identity becomes `teachers`."""
        m = self.manifest
        m.tasks = {t: m.tasks.get(t) or new_tasks[t] for t in order if t in m.tasks or t in new_tasks}
        m.runs.append({"id": uuid.uuid4().hex[:12], **run})
        m.extraction, m.code, m.finished = extraction, code, None
        self.save(teachers)

    def record_progress(self, progress: dict) -> None:
        """The run's progress so far (samples, rates), saved: what a reader of a running store sees."""
        self.manifest.progress = progress
        self.save_manifest()

    def finish_run(self, progress: dict | None, records: dict[int, ShardRecord], shards_done: int,
                   shards_failed: list[int]) -> None:
        """The run's last word: its progress, its record under `runs`, and `finished` once `records` hold every shard
        done for every task the store has (another job's too) and no shard failed (kept from an earlier run that
        finished)."""
        def last_word(m: RunManifest) -> None:
            all_done = all(i in records and set(m.tasks) <= set(records[i].tasks) for i in range(m.num_shards))
            if progress is not None:
                m.progress = progress
            m.finished = (m.finished or now()) if all_done and not shards_failed else None
            mine = next((r for r in m.runs if r.get("id") == run_id), m.runs[-1] if m.runs else None)
            if mine is not None:
                mine.update(finished=now(), shards_done=shards_done, shards_failed=sorted(shards_failed))

        run_id = self.manifest.runs[-1].get("id") if self.manifest.runs else None
        self.save_manifest(last_word)

    def restore_teachers(self) -> str:
        """Repair the teacher identity as `verify` says: teachers.yaml from the manifest's copy, or the copy from
        teachers.yaml, whichever the shards' records confirm; refused when none can be trusted. Returns what it
        rewrote."""
        check = check_identity(self.loc, self.manifest.teachers, self.records())
        if check.repair is None:
            raise StoreError("; ".join(check.problems) if check.problems else
                             f"{self.loc}'s teachers.yaml, the manifest's copy and the shards agree: nothing to repair")
        if check.repair == "teachers.yaml":
            write_teachers(self.loc, self.manifest.teachers)
        else:
            self.manifest.teachers = read_teachers(self.loc)
            self.save_manifest()
        return check.repair

    # ---- what is there --------------------------------------------------------------------------------------------
    def teachers(self) -> dict | None:
        return read_teachers(self.loc, missing_ok=True)

    def records(self) -> dict[int, ShardRecord]:
        return read_records(self.loc)

    def record(self, shard: int) -> ShardRecord | None:
        return read_record(self.loc, shard)

    def resume_problems(self, *, dataset: dict, num_samples: int, shard_size: int, formats: list[str],
                        compression: str, layouts: dict[str, TaskLayout], identity: dict) -> list[str]:
        """Why this store cannot be continued with these settings (empty: it can). `dataset` is the input's
        identity now (its "sha256" must be the store's), `identity` the run's teacher identity."""
        m, problems = self.manifest, []
        if m.dataset.get("sha256") != dataset["sha256"]:
            problems.append(f"the dataset differs (sha256 {str(m.dataset.get('sha256'))[:12]}... in the store, "
                            f"{dataset['sha256'][:12]}... now){_changed_shards(m.dataset, dataset)}")
        if m.num_samples != num_samples:
            problems.append(f"the store holds {m.num_samples} samples, this run plans {num_samples} (--limit?)")
        if m.shard_size != shard_size:
            problems.append(f"the store's shard size is {m.shard_size}, this run asks {shard_size}")
        if sorted(m.formats) != sorted(formats):
            problems.append(f"the store's formats are {m.formats}, this run asks {formats}")
        if m.zarr_compression != compression:
            problems.append(f"the store's zarr compression is {m.zarr_compression}, this run asks {compression}")
        for t, want in layouts.items():
            have = m.tasks.get(t)
            if have is not None and (have.shape, have.encoding) != (want.shape, want.encoding):
                problems.append(f"{t}: the store has {have.shape} {have.encoding}, this run would write "
                                f"{want.shape} {want.encoding}")
        stored = self.teachers()
        if stored is not None:
            problems += teacher_mismatches(stored, identity, [t for t in layouts if t in m.tasks])[0]
            # one store, one fidelity, whatever the tasks: once it holds a target (a teacher-free store has none)
            if m.tasks and stored.get("fidelity") != identity.get("fidelity"):
                problems.append(f"the store was extracted with fidelity {stored.get('fidelity')}, this run uses "
                                f"{identity.get('fidelity')}")
        return problems

    # ---- leases ---------------------------------------------------------------------------------------------------
    def leases(self, owner: str | None = None, **kw) -> Leases:
        return Leases(self.loc, owner, **kw)

    @contextlib.contextmanager
    def lease(self, shard: int, owner: str | None = None):
        """Hold shard `shard` for the block (single-process use); StoreError when another job holds it."""
        leases = self.leases(owner)
        if not leases.take(shard):
            raise StoreError(f"shard {shard} is leased by {(leases.holder(shard) or {}).get('owner', 'another job')}")
        try:
            yield leases
        finally:
            leases.release(shard)

    # ---- one shard ------------------------------------------------------------------------------------------------
    def redo(self, shard: int) -> ShardRecord | None:
        """Before a shard's data is rewritten: take its record away (the shard is then not done) and return it,
        so that `write` can carry over the tasks it already had. The sample index no longer describes the
        store: it goes first."""
        rec = read_record(self.loc, shard)
        self.loc.remove(layout.INDEX_META)
        self.loc.remove(layout.record_name(shard))
        return rec

    def write(self, result: ShardResult, previous: ShardRecord | None = None, keep_images: bool = False) -> ShardRecord:
        """Write one shard's Zarr objects and tar under their final names and return the record that commits them
        (not yet written: `commit`). With `previous` (what `redo` took away) the tasks it had and this pass does
        not compute are kept: the tar is rebuilt with their members, their Zarr objects are listed again.
        `keep_images` (a verified shard gaining tasks): the images its tar holds stay as they are, and a pass that
        computed from other bytes is refused, never stored as their targets."""
        m, i = self.manifest, result.shard
        _check_result(m, result)
        kept = [t for t in (previous.tasks if previous else []) if t not in result.tasks]
        files: dict[str, dict] = {}
        if "zarr" in m.formats:
            files.update(zarr_io.write_shard(self.loc, m, result, kept))
        if "wds" in m.formats:
            keep_images = keep_images and previous is not None and layout.tar_name(i) in previous.files
            old = tar.members_by_key(self.loc, layout.tar_name(i)) if kept or keep_images else {}
            files[layout.tar_name(i)] = tar.write_tar(self.loc, layout.tar_name(i),
                                                      _tar_samples(m, result, kept, old, keep_images))
        all_tasks = [t for t in m.tasks if t in kept or t in result.tasks]
        valid = dict(previous.valid if previous else {})
        valid.update({t: int(result.valid[t].sum()) for t in result.tasks})
        start, stop = m.shard_range(i)
        made_by = {t: v for t, v in ((previous.teachers or {}) if previous else {}).items() if t in kept}
        made_by.update(result.teachers)
        return ShardRecord(shard=i, start=start, stop=stop, tasks=all_tasks, valid={t: valid[t] for t in all_tasks},
                           bad_images=sum(1 for s in result.samples if s.error), files=files,
                           errors=_errors(result, previous), ids=[s.id for s in result.samples],
                           seconds=round(result.seconds + (previous.seconds if previous else 0.0), 3),
                           teachers={t: made_by[t] for t in all_tasks if t in made_by} or None, store_id=m.store_id)

    def commit(self, record: ShardRecord) -> None:
        """The commit point: create the shard's record, only if no record exists (see the module docstring). The
        sample index goes first: an index that is there describes the committed shards (store.index)."""
        self.loc.remove(layout.INDEX_META)
        if not self.loc.create_exclusive(layout.record_name(record.shard), dumps(record.to_dict())):
            raise StoreError(f"shard {record.shard} already has a record: another job committed it meanwhile "
                             f"(one --output, one extraction at a time)")

    def commit_shard(self, result: ShardResult) -> ShardRecord:
        """redo + write + commit in one process (tests, benchmarks, single-process use)."""
        record = self.write(result, self.redo(result.shard))
        self.commit(record)
        return record

    # ---- sparse fixtures (benchmarks and tests at scale; never real data) --------------------------------------------
    def commit_sparse(self, record: ShardRecord) -> None:
        """A local shard committed without its data: its tar a sparse file of the size the record gives (no byte of
        a sample written: `fill_sparse` writes those a reader will read), the record written plainly (a fixture of a
        million shards does not fsync each). What `verify` would call damaged; what the trainer's start-up, the
        index and the order read as they are, at 30M samples in a few GB."""
        name = layout.tar_name(record.shard)
        os.makedirs(os.path.dirname(self.loc.path(name)), exist_ok=True)
        os.makedirs(os.path.dirname(self.loc.path(layout.record_name(record.shard))), exist_ok=True)
        with open(self.loc.path(name), "wb") as f:
            f.truncate(record.files[name]["bytes"])
        with open(self.loc.path(layout.record_name(record.shard)), "w") as f:
            f.write(json.dumps(record.to_dict()))

    def fill_sparse(self, shard: int, offset: int, data: bytes) -> None:
        """Write `data` at `offset` of a sparse shard's tar (`commit_sparse`)."""
        fd = os.open(self.loc.path(layout.tar_name(shard)), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    # ---- the whole store ------------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        return recovery.recover(self.loc)

    def build_index(self) -> dict:
        """The sample index the trainer starts from, built from the committed records (store.index)."""
        from store.index import build_index

        return build_index(self.loc, self.manifest)

    def rebuild_errors(self, records: dict[int, ShardRecord] | None = None) -> int:
        """errors.jsonl from the shard records (the records are the source of truth). Returns the line count."""
        records = self.records() if records is None else records
        lines = [json.dumps(e, sort_keys=True) for i in sorted(records) for e in records[i].errors]
        self.loc.write_bytes(layout.ERRORS, "".join(line + "\n" for line in lines).encode())
        return len(lines)


def _changed_shards(before: dict, now: dict) -> str:
    """For an input of several files (`shards`: [{url, bytes, sha256, ...}]): which of them changed."""
    if "shards" not in before or "shards" not in now:
        return ""
    was = {s["url"]: s for s in before["shards"]}
    changed = [s["url"] for s in now["shards"] if was.get(s["url"]) != s]
    gone = [u for u in was if u not in {s["url"] for s in now["shards"]}]
    said = ([f"{changed[0]} changed" + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")] if changed
            else []) + ([f"{gone[0]} is gone" + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else "")]
                        if gone else [])
    return f": {'; '.join(said)}" if said else ""


def _check_result(m: RunManifest, result: ShardResult) -> None:
    start, stop = m.shard_range(result.shard)
    if len(result.samples) != stop - start:
        raise StoreError(f"shard {result.shard}: got {len(result.samples)} samples, the shard holds {stop - start}")
    if [s.index for s in result.samples] != list(range(start, stop)):
        raise StoreError(f"shard {result.shard}: samples are not the shard's indices {start}..{stop - 1} in order")
    unknown = [t for t in result.tasks if t not in m.tasks]
    if unknown:
        raise StoreError(f"shard {result.shard}: tasks {unknown} are not in the store manifest")


def _tar_samples(m: RunManifest, result: ShardResult, kept: list[str], old: dict, keep_images: bool = False):
    """The shard's samples as tar members: this pass's targets, and the kept tasks' members and flags from the
    shard's previous tar (`keep_images`: its images too, which this pass's must equal)."""
    all_tasks = [t for t in m.tasks if t in kept or t in result.tasks]
    for pos, s in enumerate(result.samples):
        prev = old.get(layout.tar_key(s.id), {})
        prev_meta = meta_of(prev) if layout.META_MEMBER in prev else {}
        if keep_images and prev_meta.get("image_member"):
            committed = prev.get(prev_meta["image_member"])
            if s.image_bytes is not None and s.image_bytes != committed:
                raise StoreError(f"shard {result.shard}: sample {s.id!r} was computed from other bytes than the image "
                                 f"the store holds for it; its committed image is kept and the shard is not written")
            s = dataclasses.replace(s, image_bytes=committed)
        valid = {t: bool(prev_meta.get("valid", {}).get(t, False)) for t in kept}
        valid.update({t: bool(result.valid[t][pos]) for t in result.tasks})
        errors = {k: v for k, v in (prev_meta.get("errors") or {}).items() if k not in result.tasks}
        if s.error and not (keep_images and "image" in errors):  # a kept image keeps the reason it was bad for
            errors["image"] = s.error
        for t in result.tasks:
            if pos in result.task_errors.get(t, {}):
                errors[t] = result.task_errors[t][pos]
        meta = sample_meta(s.id, s.index, result.shard, s.record, s.image if s.image_bytes is not None else None,
                           {t: valid[t] for t in all_tasks}, errors)
        carried = {k: v for t in kept for k, v in target_members_of(prev, t).items()}
        now = {t: (result.values[t][pos], result.scales[t][pos] if m.tasks[t].scaled else None)
               for t in result.tasks if result.valid[t][pos]}
        yield sample_members(meta, s.image_bytes, now, carried)


def _errors(result: ShardResult, previous: ShardRecord | None) -> list[dict]:
    """The record's errors: the previous record's for tasks not computed now, this pass's image and task errors."""
    errors = [e for e in (previous.errors if previous else []) if e.get("task") not in result.tasks]
    for pos, s in enumerate(result.samples):
        where = {"id": s.id, "index": s.index, "shard": result.shard, "image": s.image}
        if s.error:
            if not any(e["index"] == s.index and e.get("task") is None for e in errors):
                errors.append({**where, "task": None, "reason": s.error})
            continue
        for t in result.tasks:
            if pos in result.task_errors.get(t, {}):
                errors.append({**where, "task": t, "reason": result.task_errors[t][pos]})
    errors.sort(key=lambda e: (e["index"], e.get("task") or ""))
    return errors
