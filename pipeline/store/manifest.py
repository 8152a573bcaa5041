"""The store's manifests as typed objects: the run manifest (olaf_store.json), each task's layout, each shard's
record (shards/NNNNNN.json) and the teacher identity (teachers.yaml). Read, validated and written here only;
the JSON they map to is described in docs/format.md."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field

import yaml

from pipeline import encodings
from pipeline.store import layout
from pipeline.store.fs import Location, StoreError
from pipeline.teacher_manifest import REPO_ROOT, TASKS


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def code_version() -> dict:
    """olaf's version, the git commit (in a Ray job's uploaded working dir: the one pipeline.jobdir recorded on
    the submitting side), and a hash of the source that ran, which always identifies the code."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("olaf")
    except PackageNotFoundError:
        pkg = "unknown"
    h = hashlib.sha256()
    for sub in ("pipeline", "teachers", "trainer"):
        for p in sorted((REPO_ROOT / sub).rglob("*.py")):
            h.update(str(p.relative_to(REPO_ROOT)).encode())
            h.update(p.read_bytes())
    from pipeline.jobdir import CODE_INFO, git_describe

    git = git_describe(REPO_ROOT)
    if git is None and (REPO_ROOT / CODE_INFO).is_file():  # a Ray job's working dir, built by pipeline.jobdir
        git = json.loads((REPO_ROOT / CODE_INFO).read_text()).get("git")
    return {"version": pkg, "git": git, "source_sha256": h.hexdigest()}


# ---- task layouts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskLayout:
    """How one task's targets are stored."""

    shape: tuple[int, int]  # (tokens, width) per sample
    encoding: str  # see pipeline.encodings
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
    tasks: dict[str, TaskLayout]
    zarr_compression: str = "none"
    extraction: dict = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    code: dict = field(default_factory=code_version)
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    finished: str | None = None
    format: str = layout.FORMAT
    token_order: str = layout.TOKEN_ORDER

    def __post_init__(self):
        bad = [f for f in self.formats if f not in layout.FORMATS]
        if bad or not self.formats:
            raise StoreError(f"formats must be a non-empty subset of {', '.join(layout.FORMATS)}, got {self.formats}")
        if self.zarr_compression not in layout.COMPRESSIONS:
            raise StoreError(f"compression must be one of {', '.join(layout.COMPRESSIONS)}, got {self.zarr_compression!r}")
        if self.shard_size < 1:
            raise StoreError(f"shard size must be >= 1, got {self.shard_size}")
        self.formats = [f for f in layout.FORMATS if f in self.formats]
        self.tasks = {t: self.tasks[t] for t in TASKS if t in self.tasks}

    @property
    def num_shards(self) -> int:
        return layout.num_shards(self.num_samples, self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return layout.shard_range(self.num_samples, self.shard_size, shard)

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def to_dict(self) -> dict:
        return {"format": self.format, "created": self.created, "updated": self.updated, "finished": self.finished,
                "code": self.code, "dataset": self.dataset, "num_samples": self.num_samples,
                "shard_size": self.shard_size, "num_shards": self.num_shards, "formats": self.formats,
                "zarr_compression": self.zarr_compression, "tasks": {t: v.to_dict() for t, v in self.tasks.items()},
                "token_order": self.token_order, "extraction": self.extraction, "progress": self.progress,
                "runs": self.runs}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> RunManifest:
        try:
            return cls(dataset=d["dataset"], num_samples=int(d["num_samples"]), shard_size=int(d["shard_size"]),
                       formats=list(d["formats"]), tasks={t: TaskLayout.from_dict(v) for t, v in d["tasks"].items()},
                       zarr_compression=d.get("zarr_compression", "none"), extraction=d.get("extraction") or {},
                       progress=d.get("progress") or {}, runs=d.get("runs") or [], code=d.get("code") or {},
                       created=d.get("created"), updated=d.get("updated"), finished=d.get("finished"),
                       format=d["format"], token_order=d.get("token_order", layout.TOKEN_ORDER))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"{where} is damaged: {type(e).__name__}: {e}") from None


def read_manifest(loc: Location) -> RunManifest:
    """The run manifest, with clear errors for a path that is not a store or a store of another format."""
    if not loc.exists():
        raise StoreError(f"{loc} does not exist")
    if not loc.isfile(layout.MANIFEST):
        raise StoreError(f"{loc} is not an olaf store (no {layout.MANIFEST}); create one with pipeline.extract_teachers")
    where = loc.url_of(layout.MANIFEST)
    try:
        d = json.loads(loc.read_bytes(layout.MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{where} is damaged (not JSON: {e})") from None
    fmt = d.get("format") if isinstance(d, dict) else None
    if fmt != layout.FORMAT:
        ver = (d.get("code") or {}).get("version", "?") if isinstance(d, dict) else "?"
        raise StoreError(f"{loc} has store format {fmt!r}; this olaf reads {layout.FORMAT!r}. Re-extract it with this "
                         f"version, or use the olaf version that wrote it ({ver})")
    return RunManifest.from_dict(d, where)


def write_manifest(loc: Location, m: RunManifest) -> None:
    m.updated = now()
    loc.write_bytes(layout.MANIFEST, dumps(m.to_dict()))


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

    @property
    def count(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return {"shard": self.shard, "start": self.start, "stop": self.stop, "count": self.count,
                "status": self.status, "tasks": self.tasks, "valid": self.valid, "bad_images": self.bad_images,
                "files": self.files, "errors": self.errors, "written": self.written, "seconds": self.seconds,
                **({"ids": self.ids} if self.ids is not None else {}), **self.extra}

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
                       extra={k: v for k, v in d.items() if k not in known})
        except (TypeError, ValueError) as e:
            raise StoreError(f"bad field: {e}") from None


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


def read_records(loc: Location, damaged: dict[int, str] | None = None) -> dict[int, ShardRecord]:
    """Every readable record, by shard. Damaged ones are left out (and described in `damaged` if given)."""
    shards = sorted(i for i in map(layout.shard_of_record, loc.list(layout.SHARDS)) if i is not None)
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


# ---- teacher identity --------------------------------------------------------------------------------------------


def write_teachers(loc: Location, teachers: dict) -> None:
    """teachers.yaml: a `TeacherManifest.identity()` dict: {format, name, fidelity, stored_dtype, description,
    teachers: {task: {recipe_sha256, weights, weights_sha256, recipe}}}."""
    text = yaml.safe_dump(teachers, sort_keys=False, default_flow_style=None, width=120)
    loc.write_bytes(layout.TEACHERS, text.encode())


def read_teachers(loc: Location, missing_ok: bool = False) -> dict | None:
    if not loc.isfile(layout.TEACHERS):
        if missing_ok:
            return None
        raise StoreError(f"{loc}: {layout.TEACHERS} is missing: the store does not say which teachers computed it")
    try:
        d = yaml.safe_load(loc.read_bytes(layout.TEACHERS))
    except yaml.YAMLError as e:
        raise StoreError(f"{loc.url_of(layout.TEACHERS)} is damaged (not YAML: {str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or not isinstance(d.get("teachers", {}), dict):
        raise StoreError(f"{loc.url_of(layout.TEACHERS)} is damaged (not a teacher identity mapping)")
    return d


_LOCATION_FIELDS = ("path",)  # where weights are, not which weights they are


def _reference(w: dict | None) -> dict:
    return {k: v for k, v in (w or {}).items() if k not in _LOCATION_FIELDS}


def teacher_mismatches(stored: dict, expected: dict, tasks) -> tuple[list[str], list[str]]:
    """(mismatches, notes) between the store's teachers and the expected ones (`TeacherManifest.identity()`
    dicts) for `tasks`. What must agree: the recipe sha256, the compute dtype, and the weights sha256 where both sides know it,
    else the declared reference (HF repo id, subfolder, revision, variant). A local `path:` is only where the
    weights were: when that alone differs it is a note, not a mismatch."""
    out, notes = [], []
    for t in tasks:
        s, e = stored.get("teachers", {}).get(t), expected.get("teachers", {}).get(t)
        if s is None:
            out.append(f"{t}: the store has no {t} teacher")
            continue
        if e is None:
            out.append(f"{t}: the expected manifest has no {t} teacher")
            continue
        if s.get("recipe_sha256") != e.get("recipe_sha256"):
            diffs = [k for k in sorted(set(s.get("recipe", {})) | set(e.get("recipe", {})))
                     if s.get("recipe", {}).get(k) != e.get("recipe", {}).get(k)]
            out.append(f"{t}: recipe differs (fields: {', '.join(diffs) or '?'})")
        ds, de = s.get("compute_dtype"), e.get("compute_dtype")
        if ds and de and ds != de:
            out.append(f"{t}: computed in {ds}, expected {de} (targets differ by the dtype's rounding: "
                       f"re-extract with the manifest's dtypes, or use a manifest that says {ds})")
        elif de and not ds:
            notes.append(f"{t}: the store does not record the dtype its teacher ran in (written by an older olaf)")
        ws, we = s.get("weights_sha256"), e.get("weights_sha256")
        sw, ew = s.get("weights") or {}, e.get("weights") or {}
        if ws and we:
            if ws != we:
                out.append(f"{t}: weights sha256 differs: store {ws[:16]}..., expected {we[:16]}...")
        elif _reference(sw) != _reference(ew):
            out.append(f"{t}: weights differ: store {sw}, expected {ew}")
        if sw.get("path") != ew.get("path") and _reference(sw) == _reference(ew) and not (ws and we and ws != we):
            notes.append(f"{t}: the teacher weights are named by another location (store: {sw.get('path')}, "
                         f"manifest: {ew.get('path')}); only the location differs, so the store is accepted. The "
                         f"store recorded weights sha256 {str(ws)[:16]}...: if the weights at the new location may "
                         f"differ, re-extract with them (`--tasks` for just that teacher)")
    return out, notes
