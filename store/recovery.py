"""After a crash: what an interrupted write left behind (objects no record accounts for, temporary files), and
removing it (a shard another job holds the lease of is that job's write in progress, never an orphan); a damaged
manifest restored from its backup, reconciled with the shard records."""

from __future__ import annotations

import json
import os
import re

from store import encodings, layout, tar, zarr_io
from store.codec import npy_load
from store.fs import Location, StoreError, final_name
from store.identity import read_teachers
from store.lease import Leases, ManifestLock
from store.manifest import (
    DamagedManifest,
    RunManifest,
    ShardRecord,
    TaskLayout,
    dumps,
    now,
    parse_manifest,
    read_records,
)


def _zarr_temporaries(loc: Location) -> list[tuple[str, int | None]]:
    """Half-written Zarr objects of a local store killed mid-write (ours: `.<key>.tmp-*`, zarr-python's:
    `*.partial`), with the extraction shard each belongs to. Object storage has none: an upload appears whole."""
    if not loc.local:
        return []
    found = []
    for folder, _, files in os.walk(loc.path(layout.ZARR)):
        for f in files:
            if not ((f.startswith(".") and ".tmp-" in f) or f.endswith(".partial")):
                continue
            name = os.path.relpath(os.path.join(folder, f), loc.path("")).replace(os.sep, "/")
            parts = name.split("/")  # targets.zarr/<array path>/c/<shard>/...: the first coordinate is the shard
            coord = parts[parts.index("c", 2) + 1] if "c" in parts[2:-1] else ""
            found.append((name, int(coord) if coord.isdigit() else None))
    return sorted(found)


def orphans(loc: Location, records: dict[int, ShardRecord] | None = None, leases: Leases | None = None) -> list[str]:
    """Data objects no record accounts for: left by a crash between the data writes and the commit (a redo
    overwrites them), or temporary files of an interrupted local write."""
    records = read_records(loc) if records is None else records
    leases = leases or Leases(loc)
    listed = {name for r in records.values() for name in r.files}

    def free(shard: int | None) -> bool:  # not another job's shard, in flight
        return shard is None or leases.holder(shard) is None

    out = [n for n in loc.list(layout.WDS) if n not in listed and free(layout.shard_of_tar(final_name(n)))]
    out += [n for n in loc.list(layout.SHARDS) if layout.shard_of_record(n) is None and not layout.is_lease(n)]
    out += [n for n, shard in _zarr_temporaries(loc) if free(shard)]
    return out


def recover(loc: Location) -> list[str]:
    """Remove what an interrupted write left (temporary files, objects of uncommitted tars); returns what it did.
    Run by the extraction before work starts, never while its writers run."""
    actions = []
    for name in orphans(loc):
        loc.remove(name)
        actions.append(f"{name}: removed (left by an interrupted write)")
    return actions


# ---- a damaged manifest, restored from its backup and reconciled with the records ------------------------------

def restore_manifest(loc: Location) -> tuple[RunManifest, list[str]]:
    """Rewrite a damaged manifest from its backup copy (a sound manifest is left alone). The shard records are the
    truth: a backup that is another store's (its id, dataset or shard geometry differ from what the damaged
    manifest, the sample index and the records still say) is refused; a sound one older than the records (a save
    behind) gets the tasks they hold and loses a `finished` they refute. (the manifest written, what was
    reconciled)."""
    try:
        parse_manifest(loc, layout.MANIFEST)
    except (FileNotFoundError, DamagedManifest):
        pass
    else:
        raise StoreError(f"{loc.url_of(layout.MANIFEST)} is sound: nothing to restore")
    try:
        backup = parse_manifest(loc, layout.MANIFEST_BACKUP)
    except FileNotFoundError:
        raise StoreError(f"{loc} has no {layout.MANIFEST_BACKUP} (written by an older olaf): restore "
                         f"{layout.MANIFEST} from a backup of yours, or re-extract into a new --output") from None
    records = read_records(loc)
    witnessed = _witnessed(loc)
    problems = _other_store(backup, witnessed, records)
    if problems:
        raise StoreError(f"{loc.url_of(layout.MANIFEST_BACKUP)} is not this store's manifest: {'; '.join(problems)}. "
                         f"Nothing was written: restore {layout.MANIFEST} from a copy of this store's own, or "
                         f"re-extract into a new --output")
    notes = _reconcile(loc, backup, records)
    behind = witnessed.get("generation", backup.generation) - backup.generation
    if behind > 0:
        notes.insert(0, f"the backup was {behind} save(s) behind the damaged manifest (its last run may be missing "
                        f"from `runs`; the shards' records are complete)")
    with ManifestLock(loc):
        data = loc.read_bytes(layout.MANIFEST_BACKUP)  # a current backup goes back as it is, byte for byte
        if notes:
            backup.generation = max(backup.generation, witnessed.get("generation", 0)) + 1
            backup.updated = now()
            data = dumps(backup.to_dict())
            loc.write_bytes(layout.MANIFEST_BACKUP, data)
        loc.write_bytes(layout.MANIFEST, data)
    return backup, notes


def _witnessed(loc: Location) -> dict:
    """What the store still says of itself outside the manifest's backup: the damaged manifest's first fields (its
    generation and store id come first) and the sample index's (store id, dataset, geometry)."""
    out: dict = {}
    try:
        head = loc.read_bytes(layout.MANIFEST)[:4096].decode("utf-8", "replace")
    except FileNotFoundError:
        head = ""
    if m := re.search(r'"generation":\s*(\d+)', head):
        out["generation"] = int(m.group(1))
    if m := re.search(r'"store_id":\s*"([0-9a-f]+)"', head):
        out["store_id"] = m.group(1)
    try:
        index = json.loads(loc.read_bytes(layout.INDEX_META))
        out.update({f"index {k}": index[k] for k in ("store_id", "dataset_sha256", "num_samples", "shard_size")
                    if index.get(k) is not None})
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        pass
    return out


def _other_store(backup: RunManifest, witnessed: dict, records: dict[int, ShardRecord]) -> list[str]:
    said = {"store_id": backup.store_id, "index store_id": backup.store_id,
            "index dataset_sha256": backup.dataset.get("sha256"), "index num_samples": backup.num_samples,
            "index shard_size": backup.shard_size}
    where = {"store_id": "the damaged manifest"}
    problems = [f"its {k.removeprefix('index ')} is {said[k]!r}, {where.get(k, 'the sample index')} says {v!r}"
                for k, v in witnessed.items() if k in said and said[k] is not None and v != said[k]]
    others = sorted({r.store_id for r in records.values() if r.store_id and r.store_id != backup.store_id})
    if others:
        problems.append(f"its store_id is {backup.store_id!r}, the shards' records say {others[0]!r}")
    for i, rec in sorted(records.items()):
        if i >= backup.num_shards or (rec.start, rec.stop) != backup.shard_range(i):
            problems.append(f"shard {i}'s record holds samples {rec.start}..{rec.stop - 1}, which the backup's "
                            f"{backup.num_samples} samples in shards of {backup.shard_size} do not put there")
            break
    return problems


def _reconcile(loc: Location, m: RunManifest, records: dict[int, ShardRecord]) -> list[str]:
    """Bring a backup that is a save behind up to the records: the tasks they hold (layouts read back from the
    Zarr arrays or a tar sample, the teacher identity from teachers.yaml), `finished` only if they all are done."""
    notes = []
    held = [t for rec in records.values() for t in rec.tasks]
    missing = list(dict.fromkeys(t for t in held if t not in m.tasks))
    if missing:
        for t in missing:
            m.tasks[t] = _stored_layout(loc, m, t, records)
        stored = read_teachers(loc, missing_ok=True) or {}
        known = (stored.get("teachers") or {})
        if m.teachers is not None:
            m.teachers = {**m.teachers, "teachers": {**(m.teachers.get("teachers") or {}),
                                                     **{t: known[t] for t in missing if t in known}}}
        notes.append(f"tasks {', '.join(missing)} added: the shards' records hold them (layouts read back from the "
                     f"store's own files)")
    if m.finished and not all(i in records and set(m.tasks) <= set(records[i].tasks) for i in range(m.num_shards)):
        m.finished = None
        notes.append("`finished` cleared: not every shard is done for every task")
    return notes


def _stored_layout(loc: Location, m: RunManifest, task: str, records: dict[int, ShardRecord]) -> TaskLayout:
    """A task's layout as the store's files hold it: its Zarr array's shape and attributes, else the target member
    of a tar sample (npy header; a scale member means a scaled encoding)."""
    if "zarr" in m.formats:
        try:
            arr = zarr_io.open_group(loc, "r")[task]
            grid = arr.attrs.get("grid")
            return TaskLayout(tuple(arr.shape[1:]), arr.attrs["encoding"], tuple(grid) if grid else None)
        except (KeyError, FileNotFoundError):
            pass
    for rec in (r for r in records.values() if task in r.tasks and r.sample_ranges()):
        for offset, size in rec.sample_ranges():
            raw = tar.sample_in(loc.read_range(layout.tar_name(rec.shard), offset, offset + size), "layout")
            if raw is not None and layout.target_member(task) in raw:
                values = npy_load(raw[layout.target_member(task)])
                scaled = layout.scale_member(task) in raw
                enc = next(e.name for e in encodings.ENCODINGS.values()
                           if e.values_dtype == values.dtype.name and e.scaled == scaled)
                return TaskLayout.for_shape(values.shape, enc)
    raise StoreError(f"the backup lacks task {task!r}, which the shards' records hold, and no file of the store says "
                     f"its layout: re-extract into a new --output")
