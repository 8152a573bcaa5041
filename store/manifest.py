"""The store's manifests as typed objects: the run manifest (olaf_store.json), each task's layout and each shard's
record (shards/NNNNNN.json). Read, validated and written here only; the JSON they map to is described in
docs/format.md. What the manifest records about the code and the run (`code`, `extraction`, `runs`) is handed
in by the extraction as data: the store knows nothing else of olaf."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field

from store import encodings, layout
from store.fs import Location, StoreError


class DamagedManifest(StoreError):
    """The manifest (or its backup) is unreadable or not a manifest: damage, not another format version."""


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


# ---- task layouts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskLayout:
    """How one task's targets are stored."""

    shape: tuple[int, int]  # (tokens, width) per sample
    encoding: str  # see store.encodings
    grid: tuple[int, int] | None = None  # (rows, cols) when the tokens are a row-major grid

    @property
    def scaled(self) -> bool:
        return encodings.get(self.encoding).scaled

    @property
    def values_dtype(self) -> str:
        return encodings.get(self.encoding).values_dtype

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "encoding": self.encoding, "values_dtype": self.values_dtype,
                "scaled": self.scaled, "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_dict(cls, d: dict) -> TaskLayout:
        return cls(shape=tuple(d["shape"]), encoding=d["encoding"], grid=tuple(d["grid"]) if d.get("grid") else None)

    @classmethod
    def for_shape(cls, shape, encoding: str) -> TaskLayout:
        return cls(tuple(shape), encoding, layout.grid_of(shape[0]))


# ---- the run manifest ------------------------------------------------------------------------------------------


@dataclass
class RunManifest:
    """olaf_store.json: what the store holds and how it was made."""

    dataset: dict
    num_samples: int
    shard_size: int
    formats: list[str]
    tasks: dict[str, TaskLayout]  # in the order every listing of tasks follows (the creator's)
    zarr_compression: str = "none"
    extraction: dict = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    code: dict = field(default_factory=dict)  # olaf's version, git commit, source hash (the extraction's)
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    finished: str | None = None
    format: str = layout.FORMAT
    token_order: str = layout.TOKEN_ORDER
    teachers: dict | None = None  # a copy of teachers.yaml's identity, from which a damaged one is restored
    generation: int = 0  # saves so far: the manifest and its backup carry the same, checked on a restore
    store_id: str | None = None  # this store's own id, given at its first save (stores from before: at their next)

    def __post_init__(self):
        bad = [f for f in self.formats if f not in layout.FORMATS]
        if bad or not self.formats:
            raise StoreError(f"formats must be a non-empty subset of {', '.join(layout.FORMATS)}, got {self.formats}")
        if self.zarr_compression not in layout.COMPRESSIONS:
            raise StoreError(f"compression must be one of {', '.join(layout.COMPRESSIONS)}, got {self.zarr_compression!r}")
        if self.shard_size < 1:
            raise StoreError(f"shard size must be >= 1, got {self.shard_size}")
        self.formats = [f for f in layout.FORMATS if f in self.formats]

    @property
    def num_shards(self) -> int:
        return layout.num_shards(self.num_samples, self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return layout.shard_range(self.num_samples, self.shard_size, shard)

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def to_dict(self) -> dict:
        # the generation and the store's id come first: a manifest cut short still says which store and save it was
        return {"format": self.format, "generation": self.generation, "store_id": self.store_id,
                "created": self.created, "updated": self.updated, "finished": self.finished,
                "code": self.code, "dataset": self.dataset, "num_samples": self.num_samples,
                "shard_size": self.shard_size, "num_shards": self.num_shards, "formats": self.formats,
                "zarr_compression": self.zarr_compression, "tasks": {t: v.to_dict() for t, v in self.tasks.items()},
                "token_order": self.token_order, "extraction": self.extraction, "progress": self.progress,
                "runs": self.runs, **({"teachers": self.teachers} if self.teachers is not None else {})}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> RunManifest:
        try:
            return cls(dataset=d["dataset"], num_samples=int(d["num_samples"]), shard_size=int(d["shard_size"]),
                       formats=list(d["formats"]), tasks={t: TaskLayout.from_dict(v) for t, v in d["tasks"].items()},
                       zarr_compression=d.get("zarr_compression", "none"), extraction=d.get("extraction") or {},
                       progress=d.get("progress") or {}, runs=d.get("runs") or [], code=d.get("code") or {},
                       created=d.get("created"), updated=d.get("updated"), finished=d.get("finished"),
                       format=d["format"], token_order=d.get("token_order", layout.TOKEN_ORDER),
                       teachers=d.get("teachers"), generation=int(d.get("generation") or 0),
                       store_id=d.get("store_id"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DamagedManifest(f"{where} is damaged: {type(e).__name__}: {e}") from None


def merged(disk: RunManifest, mine: RunManifest) -> RunManifest:
    """What a job saves when another job saved the same store's manifest since it read it (two jobs on one output,
    with other task sets): the union of their tasks (a task there keeps its layout), of their runs (by id) and of
    their teacher identities (this job's for its tasks); the rest is this job's."""
    out = dataclasses.replace(mine)
    out.tasks = {**disk.tasks, **{t: v for t, v in mine.tasks.items() if t not in disk.tasks}}
    ids = {r.get("id") for r in mine.runs if r.get("id")}
    out.runs = [r for r in disk.runs if (r.get("id") not in ids if r.get("id") else r not in mine.runs)] + mine.runs
    out.runs.sort(key=lambda r: str(r.get("started") or ""))
    if disk.teachers or mine.teachers:
        both = {**((disk.teachers or {}).get("teachers") or {}), **((mine.teachers or {}).get("teachers") or {})}
        out.teachers = {**(mine.teachers or disk.teachers), "teachers": {t: both[t] for t in out.tasks if t in both}}
    out.store_id = disk.store_id or mine.store_id
    out.generation = max(disk.generation, mine.generation)
    return out


REPAIR_MANIFEST = "restore it with `python -m pipeline.inspect {store} repair-manifest` (from {backup})"


def read_manifest(loc: Location) -> RunManifest:
    """The run manifest, with clear errors for a path that is not a store or a store of another format; a damaged
    one names the repair when its backup copy is sound."""
    if not loc.exists():
        raise StoreError(f"{loc} does not exist")
    if not loc.isfile(layout.MANIFEST):
        raise StoreError(f"{loc} is not an olaf store (no {layout.MANIFEST}); create one with pipeline.extract_teachers")
    try:
        return parse_manifest(loc, layout.MANIFEST)
    except DamagedManifest as e:
        try:
            parse_manifest(loc, layout.MANIFEST_BACKUP)
        except (StoreError, FileNotFoundError):
            raise StoreError(f"{e}; its backup {layout.MANIFEST_BACKUP} is missing or damaged too: re-extract into "
                             f"a new --output") from None
        raise StoreError(f"{e}; {REPAIR_MANIFEST.format(store=loc, backup=layout.MANIFEST_BACKUP)}") from None


def parse_manifest(loc: Location, name: str) -> RunManifest:
    """The manifest object `name` (the manifest or its backup), parsed and checked."""
    where = loc.url_of(name)
    try:
        d = json.loads(loc.read_bytes(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedManifest(f"{where} is damaged (not JSON: {str(e)[:80]})") from None
    fmt = d.get("format") if isinstance(d, dict) else None
    if fmt != layout.FORMAT:
        if not isinstance(d, dict) or "num_samples" not in d:
            raise DamagedManifest(f"{where} is damaged (not a store manifest)")
        ver = (d.get("code") or {}).get("version", "?")
        raise StoreError(f"{loc} has store format {fmt!r}; this olaf reads {layout.FORMAT!r}. Re-extract it with this "
                         f"version, or use the olaf version that wrote it ({ver})")
    return RunManifest.from_dict(d, where)


# ---- shard records ---------------------------------------------------------------------------------------------


@dataclass
class ShardRecord:
    """shards/NNNNNN.json: a shard is done when its record exists and the files it lists match."""

    shard: int
    start: int
    stop: int
    tasks: list[str]
    valid: dict[str, int]  # task -> valid targets
    bad_images: int
    files: dict[str, dict]  # name -> {"bytes", "sha256"} or {"absent": true}
    errors: list[dict]
    written: str = field(default_factory=now)
    seconds: float = 0.0
    status: str = "done"
    extra: dict = field(default_factory=dict)  # timings the extraction adds (decode_cpu_s, teacher_s)
    ids: list[str] | None = None  # the samples' ids in dataset order (None: written before olaf recorded them)
    teachers: dict[str, dict] | None = None  # task -> what computed its targets (weights, recipe, dtype sha256s)
    store_id: str | None = None  # the store it was committed to (a manifest's backup is checked against it)

    @property
    def count(self) -> int:
        return self.stop - self.start

    def bad_indices(self) -> set[int]:
        """Global indices of the samples whose image could not be used (an error with no task): every target of
        theirs is invalid, and training never sees them."""
        return {e["index"] for e in self.errors if e.get("task") is None}

    def sample_ranges(self) -> list | None:
        """[offset, size] of each sample's members in the shard's tar, in dataset order (None: no tar, or written
        before olaf recorded them)."""
        return (self.files.get(layout.tar_name(self.shard)) or {}).get("samples")

    def usable_count(self) -> int:
        """Samples of the shard with a usable image."""
        return self.count - len(self.bad_indices())

    def to_dict(self) -> dict:
        return {"shard": self.shard, "start": self.start, "stop": self.stop, "count": self.count,
                "status": self.status, "tasks": self.tasks, "valid": self.valid, "bad_images": self.bad_images,
                "files": self.files, "errors": self.errors, "written": self.written, "seconds": self.seconds,
                **({"ids": self.ids} if self.ids is not None else {}),
                **({"teachers": self.teachers} if self.teachers is not None else {}),
                **({"store_id": self.store_id} if self.store_id is not None else {}), **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> ShardRecord:
        """Raises StoreError naming what is wrong with a record that is not one."""
        if not isinstance(d, dict):
            raise StoreError(f"not a JSON object but {type(d).__name__}")
        need = ("shard", "start", "stop", "tasks", "valid", "files", "errors", "status")
        missing = [k for k in need if k not in d]
        if missing:
            raise StoreError(f"missing fields {missing}")
        if not isinstance(d["files"], dict) or not d["files"]:
            raise StoreError("lists no files")
        known = {f.name for f in dataclasses.fields(cls)} | {"count"}
        try:
            return cls(shard=int(d["shard"]), start=int(d["start"]), stop=int(d["stop"]), tasks=list(d["tasks"]),
                       valid=dict(d["valid"]), bad_images=int(d.get("bad_images", 0)), files=d["files"],
                       errors=list(d["errors"]), written=d.get("written"), seconds=float(d.get("seconds", 0.0)),
                       status=d["status"], ids=list(d["ids"]) if d.get("ids") is not None else None,
                       teachers=_teachers_field(d.get("teachers")), store_id=d.get("store_id"),
                       extra={k: v for k, v in d.items() if k not in known})
        except (TypeError, ValueError) as e:
            raise StoreError(f"bad field: {e}") from None


def _teachers_field(v) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(x, dict) for x in v.values()):
        raise TypeError(f"teachers is not a mapping of task to provenance: {str(v)[:80]}")
    return v


def read_record(loc: Location, shard: int) -> ShardRecord | None:
    """The shard's record, or None when there is none or it is damaged (a damaged record is no commit)."""
    rec, _ = _read_record(loc, shard)
    return rec


def _read_record(loc: Location, shard: int) -> tuple[ShardRecord | None, str | None]:
    try:
        data = loc.read_bytes(layout.record_name(shard))
    except FileNotFoundError:
        return None, None
    return _parse_record(shard, data)


def _parse_record(shard: int, data: bytes) -> tuple[ShardRecord | None, str | None]:
    name = layout.record_name(shard)
    try:
        rec = ShardRecord.from_dict(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{name}: not JSON ({e})"
    except StoreError as e:
        return None, f"{name}: {e}"
    if rec.shard != shard:
        return None, f"{name}: says it is shard {rec.shard}"
    if rec.ids is not None and len(rec.ids) != rec.count:
        return None, f"{name}: lists {len(rec.ids)} ids for {rec.count} samples"
    return rec, None


def read_records(loc: Location, damaged: dict[int, str] | None = None, names: list[str] | None = None) -> dict[int, ShardRecord]:
    """Every readable record (or those of `names`), by shard. Damaged ones are left out (and described in
    `damaged` if given)."""
    names = loc.list(layout.SHARDS) if names is None else names
    shards = sorted(i for i in map(layout.shard_of_record, names) if i is not None)
    got = loc.read_many([layout.record_name(i) for i in shards])  # thousands of records: concurrent GETs on S3
    out = {}
    for i in shards:
        data = got[layout.record_name(i)]
        if data is None:  # removed since the listing
            continue
        rec, problem = _parse_record(i, data)
        if rec is not None:
            out[i] = rec
        elif problem and damaged is not None:
            damaged[i] = problem
    return out
