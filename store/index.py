"""The store's sample index: what the trainer needs to start, as a few flat arrays instead of every shard's record,
read with mmap, so the processes of a node share one copy in the page cache and nothing per sample is a Python
object (docs/format.md, "index/").

    index/index.json      what the arrays hold and how they were built: the commit point, written last
    index/shards.npy      per committed shard: shard, start, count, usable samples, tasks (a bit per task of
                          index.json's `tasks`), its tar's bytes (-1 without one)
    index/index.npy       per usable sample, in dataset order: its global index (int64)
    index/shard.npy       its shard (int32)
    index/offset.npy      where its members start in the shard's tar (int64)
    index/size.npy        their bytes (int32)
    index/task_at.npy     (usable, tasks) int32: where each task's members start in the sample's range (-1: unknown)
    index/task_len.npy    their bytes (0: the sample has none), so a run reads only the tasks it trains
    index/id_offsets.npy  int64 (usable + 1): sample r's id is ids.bin[id_offsets[r]:id_offsets[r + 1]] (UTF-8)
    index/ids.bin

`build_index` makes it from the records (the extraction at the end of every run; `python -m pipeline.inspect STORE
index`); the writer removes index.json before it commits or redoes any shard, so an index that is there describes
the committed shards. A reader checks every file's size against index.json and the shard records' names against
the listing of shards/ (a store changed by a writer that did not know the index), and falls back to the records
when it is absent or stale. 30M samples: about 42 bytes a sample on disk and in the page cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store import cache, layout
from store.fs import Location, StoreError, cache_root
from store.identity import recorded_teachers
from store.manifest import RunManifest, ShardRecord, now, read_records

FORMAT = "olaf.index/1"
SHARD_DTYPE = np.dtype([("shard", "<i8"), ("start", "<i8"), ("count", "<i4"), ("usable", "<i4"), ("done", "u1"),
                        ("tasks", "<u8"), ("tar_bytes", "<i8")])
COLUMNS = {"index": "<i8", "shard": "<i4", "offset": "<i8", "size": "<i4", "id_offsets": "<i8"}
# (usable, tasks) in index.json's `tasks` order: where each task's members lie in the sample's range (relative
# offset, bytes; 0 bytes: none), so a run reads only the tasks it trains; -1 where the record does not say (a store
# written before they were recorded, whose readers read whole samples). Absent from indexes built before them.
TASK_COLUMNS = {"task_at": "<i4", "task_len": "<i4"}
BATCH = 2048  # records read at once while building (concurrent GETs on object storage)


def _npy(column: str) -> str:
    return f"{layout.INDEX}/{column}.npy"


def _shard_rows(rec: ShardRecord, tar: str, task_bit: dict[str, int]) -> tuple[tuple, dict[str, np.ndarray], bytes]:
    """One record's row of shards.npy, its usable samples' columns (their ids' byte lengths among them) and their
    ids, UTF-8, concatenated."""
    info = rec.files.get(tar) or {}
    ranges = info.get("samples")
    if ranges is not None and len(ranges) != rec.count:
        raise StoreError(f"shard {rec.shard}'s record lists {len(ranges)} byte ranges for {rec.count} samples")
    bad = rec.bad_indices()
    keep = np.array([rec.start + p not in bad for p in range(rec.count)], dtype=bool)
    usable = int(keep.sum())
    bits = sum(1 << task_bit[t] for t in rec.tasks if t in task_bit)
    row = (rec.shard, rec.start, rec.count, usable, rec.status == "done", bits,
           info.get("bytes", -1) if not info.get("absent") else -1)
    cols = {"index": np.arange(rec.start, rec.stop, dtype=np.int64)[keep],
            "shard": np.full(usable, rec.shard, dtype=np.int32)}
    if ranges is not None:
        r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)[keep]
        cols["offset"], cols["size"] = r[:, 0], r[:, 1].astype(np.int32)
    else:  # no tar (zarr only) or an older olaf's record: the trainer's stream refuses such a store
        cols["offset"], cols["size"] = np.full(usable, -1, np.int64), np.full(usable, -1, np.int32)
    at = np.full((usable, len(task_bit)), -1, np.int32)
    length = np.full((usable, len(task_bit)), -1, np.int32)
    for t, k in task_bit.items():
        given = (info.get("tasks") or {}).get(t)
        if given is not None and len(given) == rec.count:
            g = np.asarray(given, dtype=np.int64).reshape(-1, 2)[keep]
            at[:, k], length[:, k] = g[:, 0], g[:, 1]
        elif given is None and ranges is not None and "tasks" in info:
            at[:, k], length[:, k] = 0, 0  # the tar records where its tasks lie, and this one is not among them
    cols["task_at"], cols["task_len"] = at, length
    ids = [(rec.ids[p] if rec.ids is not None else str(rec.start + p)).encode() for p in range(rec.count) if keep[p]]
    cols["id_length"] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return row, cols, b"".join(ids)


def build_index(loc: Location, manifest: RunManifest) -> dict:
    """Write index/ from the shard records (read in batches: nothing but the arrays grows with the store) and
    return index.json's content. index.json is written last: until then a reader sees no index."""
    loc.remove(layout.INDEX_META)
    arrays, blob, listed, made_by, ids_recorded = index_arrays(loc, manifest)
    files = {_npy(name): _write_npy(loc, _npy(name), arr) for name, arr in arrays.items()}
    files[layout.INDEX_IDS] = _write_bytes(loc, layout.INDEX_IDS, blob)
    meta = _meta(manifest, arrays, listed, made_by, ids_recorded, files)
    loc.write_bytes(layout.INDEX_META, (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def index_in_memory(loc: Location, manifest: RunManifest, records: dict[int, ShardRecord] | None = None) -> StoreIndex:
    """The index `build_index` would write, built by the same function and held in memory (a store without a fresh
    index on disk: every reader reads the same catalog, whichever way it came)."""
    arrays, blob, listed, made_by, ids_recorded = index_arrays(loc, manifest, records)
    meta = _meta(manifest, arrays, listed, made_by, ids_recorded, files={})
    return StoreIndex(meta, arrays["shards"], {k: arrays[k] for k in (*COLUMNS, *TASK_COLUMNS)},
                      IdList(arrays["id_offsets"], np.frombuffer(blob, dtype=np.uint8)))


def _meta(manifest: RunManifest, arrays: dict, listed: list[int], made_by: dict, ids_recorded: bool,
          files: dict) -> dict:
    evidence, mixed = recorded_teachers(made_by)
    return {"format": FORMAT, "built": now(), "store_id": manifest.store_id,
            "dataset_sha256": manifest.dataset.get("sha256"), "num_samples": manifest.num_samples,
            "shard_size": manifest.shard_size, "tasks": list(manifest.tasks), "shards": listed,
            "usable": int(len(arrays["index"])), "ids_recorded": ids_recorded, "teachers": evidence,
            "teachers_problems": mixed, "files": files}


def index_arrays(loc: Location, manifest: RunManifest, records: dict[int, ShardRecord] | None = None
                 ) -> tuple[dict[str, np.ndarray], bytes, list[int], dict, bool]:
    """(the arrays, ids.bin, the shards listed, each shard's `teachers`, whether every record lists its ids) from
    the records: `records` when the caller holds them, else read in batches."""
    task_bit = {t: k for k, t in enumerate(manifest.tasks)}
    if records is None:
        names = sorted(n for n in loc.list(layout.SHARDS) if layout.shard_of_record(n) is not None)
        batches = (read_records(loc, names=names[a:a + BATCH]) for a in range(0, len(names), BATCH))
    else:
        batches = iter([records])
    shards, cols, blobs, made_by, listed = [], {k: [] for k in (*COLUMNS, *TASK_COLUMNS, "id_length")
                                                if k != "id_offsets"}, [], {}, []
    ids_recorded = True
    for batch in batches:
        for i, rec in sorted(batch.items()):
            row, c, ids = _shard_rows(rec, layout.tar_name(i), task_bit)
            shards.append(row)
            for k, v in c.items():
                cols[k].append(v)
            blobs.append(ids)
            listed.append(i)
            made_by[i] = rec.teachers
            ids_recorded = ids_recorded and rec.ids is not None
    lengths = cols.pop("id_length")
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    kinds = {**COLUMNS, **TASK_COLUMNS}
    arrays = {k: np.concatenate(v).astype(kinds[k]) if v else np.zeros((0, len(task_bit)) if k in TASK_COLUMNS else 0,
                                                                        kinds[k]) for k, v in cols.items()}
    arrays["id_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    arrays["shards"] = np.array(shards, dtype=SHARD_DTYPE)
    return arrays, b"".join(blobs), listed, made_by, ids_recorded


def index_problems(loc: Location, manifest: RunManifest) -> tuple[list[str], list[str]]:
    """(problems, notes) of the index, for `verify`: a fresh index whose files do not hash to index.json or whose
    content is not what the records say is damaged; an absent or stale one is a note (readers do not use it)."""
    index, why = load_index(loc)
    if index is None:
        return [], [f"the sample index is not used: {why}; `python -m pipeline.inspect {loc} index` builds it"]
    problems = [f"{name}: sha256 differs from index.json (damaged)" for name, info in index.meta["files"].items()
                if loc.sha256(name) != info["sha256"]]
    if not problems:
        arrays, blob, listed, _, _ = index_arrays(loc, manifest)
        held = {**index.columns, "shards": index.shards}
        problems += [f"{_npy(k)} does not hold what the records say" for k, v in arrays.items()
                     if k in held and not np.array_equal(np.asarray(held[k]), v)]
        if bytes(index.ids.blob) != blob:
            problems.append(f"{layout.INDEX_IDS} does not hold the records' ids")
    fix = f"; rebuild it with `python -m pipeline.inspect {loc} index`"
    return [p + fix for p in problems], []


def _write_npy(loc: Location, name: str, arr: np.ndarray) -> dict:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return _write_bytes(loc, name, buf.getvalue())


def _write_bytes(loc: Location, name: str, data: bytes) -> dict:
    loc.write_bytes(name, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class IdList:
    """Sample ids by table row, from ids.bin and its offsets (mmapped): one id is decoded when asked for."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        self.offsets, self.blob = offsets, blob

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r) -> str:
        r = int(r)
        return bytes(self.blob[self.offsets[r]:self.offsets[r + 1]]).decode()

    def take(self, rows: np.ndarray) -> IdList:
        """The ids of `rows` (a subset, in order), compacted."""
        lo, hi = self.offsets[rows], self.offsets[rows + 1]
        pieces = [bytes(self.blob[a:b]) for a, b in zip(lo, hi, strict=True)]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)])
        return IdList(offsets, np.frombuffer(b"".join(pieces), dtype=np.uint8))


@dataclass
class StoreIndex:
    """An index that was found fresh: its metadata and arrays (mmapped)."""

    meta: dict
    shards: np.ndarray  # structured, SHARD_DTYPE: one row per committed shard, in shard order
    columns: dict[str, np.ndarray]
    ids: IdList

    def done_mask(self, tasks) -> np.ndarray:
        """Rows of shards.npy whose record is done for every task of `tasks`."""
        if any(t not in self.meta["tasks"] for t in tasks):
            return np.zeros(len(self.shards), dtype=bool)
        want = np.uint64(sum(1 << self.meta["tasks"].index(t) for t in tasks))
        return (self.shards["done"] == 1) & ((self.shards["tasks"] & want) == want)


def _cache_dir(loc: Location, meta_bytes: bytes) -> Path:
    """Where a remote store's index files are kept on this machine (one copy per node, keyed by index.json)."""
    return cache_root() / "index" / hashlib.sha256(loc.url.encode() + meta_bytes).hexdigest()[:24]


def _local_files(loc: Location, meta: dict, meta_bytes: bytes) -> Path:
    """A local folder holding the index files: the store's own, or a node-local copy of a remote store's (each
    copy checked against index.json's sha256 whenever it is used: store.cache)."""
    if loc.local:
        return Path(loc.path(""))
    folder = _cache_dir(loc, meta_bytes)
    for name, info in meta["files"].items():
        if cache.valid(folder / name, expect=info["sha256"]):
            continue
        data = loc.read_bytes(name)
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise StoreError(f"{loc.url_of(name)} does not match index.json (sha256)")
        if not cache.write(folder / name, data, sha256=info["sha256"]):
            raise StoreError(f"the index of a remote store is read from a copy on this machine, and {folder} cannot "
                             f"be written: set OLAF_CACHE to a writable folder")
    return folder


def load_index(loc: Location, check_listing: bool = True) -> tuple[StoreIndex | None, str | None]:
    """(the index, None), or (None, why there is none to use): absent, of another format, files missing or of
    other sizes, or shards committed since it was built."""
    try:
        meta_bytes = loc.read_bytes(layout.INDEX_META)
    except FileNotFoundError:
        return None, "the store has no index"
    try:
        meta = json.loads(meta_bytes)
        if meta.get("format") != FORMAT:
            return None, f"its index is of format {meta.get('format')!r}, this olaf reads {FORMAT!r}"
    except (ValueError, AttributeError):
        return None, "its index.json is damaged"
    for name, info in meta["files"].items():
        if loc.size(name) != info["bytes"]:
            return None, f"{name} is missing or of another size than index.json says"
    if check_listing:
        listed = sorted(i for i in map(layout.shard_of_record, loc.list(layout.SHARDS)) if i is not None)
        if listed != meta["shards"]:
            return None, "shards were committed or removed since the index was built"
    folder = _local_files(loc, meta, meta_bytes)
    cols = {k: np.load(folder / _npy(k), mmap_mode="r", allow_pickle=False) for k in (*COLUMNS, *TASK_COLUMNS)
            if k in COLUMNS or _npy(k) in meta["files"]}  # an index built before the task columns has none
    shards = np.load(folder / _npy("shards"), allow_pickle=False)
    blob = np.memmap(folder / layout.INDEX_IDS, dtype=np.uint8, mode="r") if meta["files"][layout.INDEX_IDS]["bytes"] \
        else np.zeros(0, np.uint8)
    return StoreIndex(meta, shards, cols, IdList(cols["id_offsets"], blob)), None
