"""Writing a store: open a new one or check that an existing one may be continued, create the Zarr arrays,
write one shard's data and commit its record exactly once, and clean up after a crash.

Commit protocol (the same on a local path and on object storage; docs/format.md "Commits"):
  1. a shard being redone first loses its record (`begin_redo`): from then on it is simply not done;
  2. its data files are written under their final names, each whole (local: temporary name + rename; object
     storage: one PUT or multipart upload, visible only once complete): the Zarr shard objects, then the tar,
     hashed as it is written;
  3. the record is created last, with a conditional create (local: hard link; S3: If-None-Match), by the
     extraction driver only. A record that already exists means another writer committed the shard: refused.
A crash before 3 leaves the shard not done and at most orphan data objects, which the redo overwrites and
`verify` reports; readers never look at a shard without a record.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.store import layout
from pipeline.store.codec import meta_of, sample_members, target_members_of
from pipeline.store.fs import Location, StoreError, final_name
from pipeline.store.manifest import (
    RunManifest,
    ShardRecord,
    TaskLayout,
    dumps,
    read_manifest,
    read_record,
    read_records,
    read_teachers,
    teacher_mismatches,
)
from pipeline.teacher_manifest import TASKS

# ---- what a writer gets ------------------------------------------------------------------------------------------


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
    extraction builds it by joining on sample ids: pipeline.work.assemble_shard)."""

    shard: int
    tasks: tuple[str, ...]  # tasks computed in this pass
    samples: list[SampleResult]
    values: dict[str, np.ndarray]  # task -> encoded (n, T, W); rows of invalid samples are zero
    scales: dict[str, np.ndarray | None]
    valid: dict[str, np.ndarray]  # task -> bool (n,)
    task_errors: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> {position in shard: reason}
    seconds: float = 0.0


# ---- opening ------------------------------------------------------------------------------------------------------


def existing_manifest(loc: Location) -> RunManifest | None:
    """The manifest of the store at `loc` if there is one, None if `loc` is absent or empty; anything else there
    is refused."""
    if loc.is_empty_or_absent():
        return None
    if not loc.isfile(layout.MANIFEST):
        raise StoreError(f"{loc} exists, is not empty and is not an olaf store; choose another output")
    return read_manifest(loc)


def resume_problems(loc: Location, m: RunManifest, *, dataset_sha256: str, num_samples: int, shard_size: int,
                    formats: list[str], compression: str, layouts: dict[str, TaskLayout], identity: dict) -> list[str]:
    """Why an existing store cannot be continued with these settings (empty: it can). `identity` is the
    teacher identity of the run (`TeacherManifest.identity()`)."""
    problems = []
    if m.dataset.get("sha256") != dataset_sha256:
        problems.append(f"the dataset JSON differs (sha256 {str(m.dataset.get('sha256'))[:12]}... in the store, "
                        f"{dataset_sha256[:12]}... now)")
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
    if loc.isfile(layout.TEACHERS):
        stored = read_teachers(loc)
        shared = [t for t in layouts if t in m.tasks]
        problems += teacher_mismatches(stored, identity, shared)[0]
        if stored.get("fidelity") != identity.get("fidelity"):  # one store, one fidelity, whatever the tasks
            problems.append(f"the store was extracted with fidelity {stored.get('fidelity')}, this run uses "
                            f"{identity.get('fidelity')}")
    return problems


def _codecs(compression: str):
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=3), Crc32cCodec()] if compression == "zstd" else [Crc32cCodec()]


def zarr_group(loc: Location, mode: str, hashes: dict | None = None):
    """The store's Zarr group. With `hashes` (a dict), every object written through it is hashed on its way
    out -- {key: {"bytes", "sha256"}} -- so a commit need not read its objects back (a download on S3)."""
    import zarr

    zstore = loc.zarr_store(layout.ZARR, read_only=mode == "r")
    if hashes is not None:
        zstore = _hashing_store(zstore, hashes)
    return zarr.open_group(zstore, mode=mode, zarr_format=3)


def _hashing_store(inner, hashes: dict):
    from zarr.storage import WrapperStore

    class HashingStore(WrapperStore):
        async def set(self, key, value):
            data = value.as_numpy_array()
            hashes[key] = {"bytes": int(data.nbytes), "sha256": hashlib.sha256(memoryview(data)).hexdigest()}
            await self._store.set(key, value)

        async def set_partial_values(self, key_start_values):  # not whole objects: hash them from the store
            for key, _, _ in key_start_values:
                hashes.pop(key, None)
            await self._store.set_partial_values(key_start_values)

        def _with_store(self, store):
            return type(self)(store)

    return HashingStore(inner)


def ensure_zarr(loc: Location, m: RunManifest) -> None:
    """Create the group and every array the manifest's tasks need (idempotent). Called by the driver only, before
    any writer runs: writers write chunk/shard objects, never metadata."""
    if "zarr" not in m.formats:
        return
    n, s = m.num_samples, m.shard_size
    g = zarr_group(loc, "a")
    g.attrs.update({"format": layout.FORMAT, "tasks": list(m.tasks), "token_order": m.token_order})
    cfg = {"write_empty_chunks": True}
    crc = _codecs("none")
    if layout.KEYS not in g:
        g.create_array(layout.KEYS, shape=(n,), chunks=(s,), dtype=str, compressors=crc, config=cfg)
    valid = g.require_group(layout.VALID)
    for task, lay in m.tasks.items():
        t, w = lay.shape
        if task not in g:
            g.create_array(task, shape=(n, t, w), chunks=(1, t, w), shards=(s, t, w), dtype=lay.values_dtype,
                           fill_value=0, compressors=_codecs(m.zarr_compression), config=cfg,
                           attributes={"encoding": lay.encoding, "grid": list(lay.grid) if lay.grid else None})
        if lay.scaled and layout.scale_array(task) not in g:
            g.create_array(layout.scale_array(task), shape=(n, t), chunks=(1, t), shards=(s, t), dtype="float32",
                           fill_value=0, compressors=_codecs(m.zarr_compression), config=cfg)
        if task not in valid:
            valid.create_array(task, shape=(n,), chunks=(s,), dtype="uint8", fill_value=0, compressors=crc, config=cfg)


MAX_UINT64 = 2**64 - 1  # the sharding index's mark of a chunk that is not in the shard


def _plain_sharding(arr) -> bool:
    """Whether `arr` is laid out as ensure_zarr makes uncompressed target arrays: shards of whole rows, chunks of
    one row, chunk and index codecs [bytes (little-endian), crc32c], the index at the end."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    def plain(codecs) -> bool:
        return (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)
                and getattr(codecs[0].endian, "value", "little") == "little")

    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sc = codecs[0]
    return (plain(sc.codecs) and plain(sc.index_codecs) and sc.index_location.value == "end"
            and tuple(sc.chunk_shape) == (1, *arr.shape[1:]))


def shard_object(arr, shard: int, values: np.ndarray) -> bytearray | None:
    """The bytes of one Zarr shard object of a `_plain_sharding` array holding rows `values` (the shard's rows,
    fewer in the store's last shard): byte for byte what zarr-python writes for `arr[rows] = values`
    (tests/test_store.py compares them), built in one buffer with one copy of the data instead of zarr's
    per-chunk buffers, checksum appends and final concatenation (~2x the CPU of the write itself at real
    target sizes, `benchmarks/extract.py --shape-true`)."""
    import google_crc32c

    rows_per_shard = arr.metadata.chunk_grid.chunk_shape[0]
    src = np.ascontiguousarray(values, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    n = src.shape[0]
    if n > rows_per_shard or src.shape[1:] != arr.shape[1:] or n != min(rows_per_shard, arr.shape[0] - shard * rows_per_shard):
        raise StoreError(f"shard {shard}: {src.shape} rows do not fill the shard of {arr.shape} in {rows_per_shard}s")
    raw = src.reshape(n, -1).view(np.uint8)
    kept = np.flatnonzero(raw.any(axis=1))  # like zarr, a row whose bits are all zero (the fill) is not stored
    if len(kept) == 0:
        return None  # and a shard with no row left is no object at all
    chunk = raw.shape[1] + 4  # the row and its crc32c
    index = np.full((rows_per_shard, *(1,) * (arr.ndim - 1), 2), MAX_UINT64, dtype="<u8")
    out = bytearray(len(kept) * chunk + index.nbytes + 4)
    body = np.frombuffer(out, dtype=np.uint8, count=len(kept) * chunk).reshape(len(kept), chunk)
    body[:, :-4] = raw[kept]
    crcs = np.array([google_crc32c.value(raw[i]) for i in kept], dtype="<u4")
    body[:, -4:] = crcs.view(np.uint8).reshape(-1, 4)
    flat = index.reshape(rows_per_shard, 2)
    flat[kept, 0] = np.arange(len(kept), dtype=np.uint64) * chunk
    flat[kept, 1] = chunk
    tail = index.tobytes()
    out[len(kept) * chunk:] = tail + np.array([google_crc32c.value(tail)], dtype="<u4").tobytes()
    return out


def write_rows(loc: Location, g, name: str, start: int, stop: int, values: np.ndarray, shard: int,
               written: dict) -> None:
    """g[name][start:stop] = values, through `shard_object` when the array is plainly sharded (hashing the object
    as it goes out), else through zarr (whose HashingStore records the hash)."""
    arr = g[name]
    if not _plain_sharding(arr):
        arr[start:stop] = values
        return
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    data = shard_object(arr, shard, values)
    if data is None:  # every row is fill: no object, as zarr leaves none (the record says "absent")
        loc.remove(f"{layout.ZARR}/{name}/{key}")
        return
    loc.write_bytes(f"{layout.ZARR}/{name}/{key}", data)
    written[f"{name}/{key}"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def zarr_files(g, m: RunManifest, tasks: Iterable[str], shard: int, with_keys: bool = True) -> list[str]:
    """Names (relative to the store) of the one Zarr object per array that holds extraction shard `shard`."""
    names = ([layout.KEYS] if with_keys else []) + [a for t in tasks for a in layout.task_arrays(t, m.tasks[t].scaled)]
    out = []
    for name in names:
        arr = g[name]
        out.append(f"{layout.ZARR}/{name}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}")
    return out


# ---- one shard ------------------------------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):  # tarfile asks where it starts; nothing ever seeks
        return self.n

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)


TAR_MEMBER_MODE = 0o444


def write_tar(loc: Location, name: str, samples: Iterable[dict]) -> dict:
    """Write samples ({"__key__": k, suffix: bytes}) deterministically (members in name order, mtime 0, no
    owner names, mode 0444: the same content gives the same bytes, the layout webdataset's TarWriter gives),
    hashing while writing. Returns {"bytes", "sha256", "samples": [[offset, size], ...]}: where each sample's
    members lie in the tar, so a reader can fetch any one sample with a single range read.

    tarfile's plain "w" mode rather than the "w|" stream mode webdataset's TarWriter uses: the same bytes
    (tests/test_store.py), without re-buffering every member into 10 KiB records (~15% less CPU at real target
    sizes, `benchmarks/extract.py --shape-true`), and `offset` gives each sample's range."""
    ranges = []
    with loc.open_atomic(name) as f:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w") as tf:
            for s in samples:
                start = tf.offset
                key = s["__key__"]
                for suffix in sorted(k for k in s if not k.startswith("_")):
                    data = s[suffix]
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0.0, TAR_MEMBER_MODE, "", ""
                    tf.addfile(info, io.BytesIO(data))
                ranges.append([start, tf.offset - start])
    return {"bytes": hw.n, "sha256": hw.h.hexdigest(), "samples": ranges}


def read_tar(loc: Location, name: str) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes}, in file order (one shard's tar; used to carry earlier tasks over)."""
    out: dict[str, dict[str, bytes]] = {}
    with loc.open(name) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        for mem in tf:
            if mem.isfile():
                key, _, suffix = mem.name.partition(".")
                out.setdefault(key, {})[suffix] = tf.extractfile(mem).read()
    return out


def begin_redo(loc: Location, shard: int) -> ShardRecord | None:
    """Before a shard's data is rewritten: take its record away (the shard is then not done) and return it, so
    the writer can carry the tasks it already had over."""
    rec = read_record(loc, shard)
    loc.remove(layout.record_name(shard))
    return rec


def write_shard(loc: Location, result: ShardResult, previous: ShardRecord | None = None) -> ShardRecord:
    """Write one shard's Zarr region and tar under their final names and return the record that commits them
    (not yet written: `commit_record`). Shards are independent: writers of different shards may run at once.
    With `previous` (the record `begin_redo` took away) the tasks it had and this pass does not compute are
    kept: the tar is rebuilt with their members, their Zarr objects are listed again."""
    m = read_manifest(loc)
    i = result.shard
    start, stop = m.shard_range(i)
    n = stop - start
    if len(result.samples) != n:
        raise StoreError(f"shard {i}: got {len(result.samples)} samples, the shard holds {n}")
    if [s.index for s in result.samples] != list(range(start, stop)):
        raise StoreError(f"shard {i}: samples are not the shard's indices {start}..{stop - 1} in order")
    unknown = [t for t in result.tasks if t not in m.tasks]
    if unknown:
        raise StoreError(f"shard {i}: tasks {unknown} are not in the store manifest")
    prev_tasks = [t for t in (previous.tasks if previous else []) if t not in result.tasks]
    all_tasks = [t for t in TASKS if t in prev_tasks or t in result.tasks]
    files: dict[str, dict] = {}

    if "zarr" in m.formats:
        written: dict[str, dict] = {}
        g = zarr_group(loc, "r+", hashes=written)
        # always (re)written: the same bytes each time, and a shard being redone may have a damaged keys chunk
        g[layout.KEYS][start:stop] = np.array([s.id for s in result.samples], dtype=object)
        for t in result.tasks:
            write_rows(loc, g, t, start, stop, result.values[t], i, written)
            if m.tasks[t].scaled:
                write_rows(loc, g, layout.scale_array(t), start, stop, result.scales[t], i, written)
            g[layout.valid_array(t)][start:stop] = result.valid[t].astype(np.uint8)
        for name in zarr_files(g, m, all_tasks, i):
            key = name[len(layout.ZARR) + 1:]
            if key in written:  # hashed as it was written
                files[name] = written[key]
                continue
            size = loc.size(name)  # an earlier pass's object (a task kept), or an empty one
            files[name] = {"bytes": size, "sha256": loc.sha256(name)} if size is not None else {"absent": True}

    if "wds" in m.formats:
        old = read_tar(loc, layout.tar_name(i)) if prev_tasks else {}

        def members():
            for pos, s in enumerate(result.samples):
                prev = old.get(layout.tar_key(s.id), {})
                prev_meta = meta_of(prev) if layout.META_MEMBER in prev else {}
                valid = {t: bool(prev_meta.get("valid", {}).get(t, False)) for t in prev_tasks}
                valid.update({t: bool(result.valid[t][pos]) for t in result.tasks})
                errors = {k: v for k, v in (prev_meta.get("errors") or {}).items() if k not in result.tasks}
                if s.error:
                    errors["image"] = s.error
                for t in result.tasks:
                    if pos in result.task_errors.get(t, {}):
                        errors[t] = result.task_errors[t][pos]
                meta = {"id": s.id, "index": s.index, "shard": i, "record": s.record,
                        "image_member": layout.image_member(s.image) if s.image_bytes is not None else None,
                        "valid": {t: valid[t] for t in all_tasks}, "errors": errors or None}
                kept = {k: v for t in prev_tasks for k, v in target_members_of(prev, t).items()}
                now = {t: (result.values[t][pos], result.scales[t][pos] if m.tasks[t].scaled else None)
                       for t in result.tasks if result.valid[t][pos]}
                yield sample_members(meta, s.image_bytes, now, kept)

        files[layout.tar_name(i)] = write_tar(loc, layout.tar_name(i), members())

    errors = [e for e in (previous.errors if previous else []) if e.get("task") not in result.tasks]
    for pos, s in enumerate(result.samples):
        if s.error:
            if not any(e["index"] == s.index and e.get("task") is None for e in errors):
                errors.append({"id": s.id, "index": s.index, "shard": i, "image": s.image, "task": None,
                               "reason": s.error})
        else:
            for t in result.tasks:
                if pos in result.task_errors.get(t, {}):
                    errors.append({"id": s.id, "index": s.index, "shard": i, "image": s.image, "task": t,
                                   "reason": result.task_errors[t][pos]})
    errors.sort(key=lambda e: (e["index"], e.get("task") or ""))
    valid_counts = dict(previous.valid if previous else {})
    valid_counts.update({t: int(result.valid[t].sum()) for t in result.tasks})
    return ShardRecord(shard=i, start=start, stop=stop, tasks=all_tasks,
                       valid={t: valid_counts[t] for t in all_tasks},
                       bad_images=sum(1 for s in result.samples if s.error), files=files, errors=errors,
                       ids=[s.id for s in result.samples], seconds=round(result.seconds + (previous.seconds if previous else 0.0), 3))


def commit_record(loc: Location, record: ShardRecord) -> None:
    """The commit point: create the shard's record, only if no record exists (see the module docstring)."""
    if not loc.create_exclusive(layout.record_name(record.shard), dumps(record.to_dict())):
        raise StoreError(f"shard {record.shard} already has a record: another job committed it meanwhile "
                         f"(one --output, one extraction at a time)")


def commit_shard(loc: Location, result: ShardResult) -> ShardRecord:
    """begin_redo + write_shard + commit_record in one process (tests, benchmarks, single-process use)."""
    previous = begin_redo(loc, result.shard)
    record = write_shard(loc, result, previous)
    commit_record(loc, record)
    return record


# ---- leases: one job per shard ------------------------------------------------------------------------------------

LEASE_TTL = 120.0  # seconds a lease holds without renewal; the extraction driver renews every TTL / 4


def lease_owner() -> str:
    """This job's lease owner id: host, pid and a random run id."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
    """A lease of a process on this host that no longer runs (a driver killed with -9) is stale at once; on
    other hosts only its expiry tells."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease_holder(loc: Location, shard: int) -> dict | None:
    """The live lease on a shard ({"owner", "expires"}), or None when there is none, it expired, or its owner
    is a dead process on this host."""
    try:
        d = json.loads(loc.read_bytes(layout.lease_name(shard)))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged lease holds nothing
    if not isinstance(d, dict) or float(d.get("expires", 0)) <= time.time() or _owner_is_dead(str(d.get("owner"))):
        return None
    return d


def take_lease(loc: Location, shard: int, owner: str, ttl: float = LEASE_TTL) -> bool:
    """Claim a shard for this job: a lease object created exclusively (same conditional create as records).
    An expired or damaged lease is broken first. False when another job holds it."""
    body = json.dumps({"owner": owner, "expires": time.time() + ttl}).encode()
    if loc.create_exclusive(layout.lease_name(shard), body):
        return True
    held = lease_holder(loc, shard)
    if held is not None:
        return held.get("owner") == owner
    loc.remove(layout.lease_name(shard))  # expired: break it, then race for it like anyone else
    return loc.create_exclusive(layout.lease_name(shard), body)


def renew_lease(loc: Location, shard: int, owner: str, ttl: float = LEASE_TTL) -> None:
    held = lease_holder(loc, shard)
    if held is None or held.get("owner") == owner:
        loc.write_bytes(layout.lease_name(shard), json.dumps({"owner": owner, "expires": time.time() + ttl}).encode())


def release_lease(loc: Location, shard: int, owner: str) -> None:
    held = lease_holder(loc, shard)
    if held is None or held.get("owner") == owner:
        loc.remove(layout.lease_name(shard))


# ---- after a crash ---------------------------------------------------------------------------------------------


def orphans(loc: Location, records: dict[int, ShardRecord] | None = None) -> list[str]:
    """Data objects no record accounts for: left by a crash between the data writes and the commit (a redo
    overwrites them), or temporary files of an interrupted local write."""
    records = read_records(loc) if records is None else records
    listed = {name for r in records.values() for name in r.files}
    out = []
    for name in loc.list(layout.WDS):
        shard = layout.shard_of_tar(final_name(name))  # a temporary file's shard too
        if name not in listed and (shard is None or lease_holder(loc, shard) is None):  # not another job's, live
            out.append(name)
    for name in loc.list(layout.SHARDS):
        if layout.shard_of_record(name) is None and not layout.is_lease(name):  # leases expire on their own
            out.append(name)
    for name, shard in _zarr_temporaries(loc):
        if shard is None or lease_holder(loc, shard) is None:
            out.append(name)
    return out


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


def recover(loc: Location) -> list[str]:
    """Remove what an interrupted write left (temporary files, objects of uncommitted tars); returns what it did.
    Run by the extraction driver before work starts, never while writers run."""
    actions = []
    for name in orphans(loc):
        loc.remove(name)
        actions.append(f"{name}: removed (left by an interrupted write)")
    return actions


def rebuild_errors(loc: Location, records: dict[int, ShardRecord] | None = None) -> int:
    """errors.jsonl from the shard records (the records are the source of truth). Returns the line count."""

    records = read_records(loc) if records is None else records
    lines = [json.dumps(e, sort_keys=True) for i in sorted(records) for e in records[i].errors]
    loc.write_bytes(layout.ERRORS, "".join(line + "\n" for line in lines).encode())
    return len(lines)
