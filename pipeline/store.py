"""THE store format: one module that defines it; the extraction writer, the trainer's readers and the inspector
all go through it. docs/format.md describes the same layout for readers in other languages.

    STORE/
      olaf_store.json            run manifest: format version, dataset (path, sha256), shards, formats, tasks and
                                 their encodings, code version, times, progress
      teachers.yaml              the teacher manifest used: recipes (fidelity applied) + weights ids and sha256
      targets.zarr/              Zarr v3 group
        keys                     (N,) string: sample ids in dataset order
        valid/<task>             (N,) uint8: 1 where the task's target is valid
        <task>                   (N, T, W) encoded values; chunk = 1 sample, shard = 1 extraction shard,
                                 codecs: bytes [+ zstd] + crc32c per chunk
        <task>_scale             (N, T) float32 per-token scales (scaled encodings only)
      wds/shard-000000.tar       WebDataset shard per extraction shard: <key>.json, <key>.<image ext>,
                                 <key>.<task>.npy [+ <key>.<task>.scale.npy] for valid targets
      shards/000000.json         per-shard record, written last: the commit point (see commit_shard)
      errors.jsonl               one line per bad sample or target, rebuilt from the shard records

Token grids (24x24) are row-major: token index = row * 24 + col.

Exactly once: a shard is done only when shards/NNNNNN.json exists and its checksums match the files. Data files
are written first (zarr writes each file to a temporary name and renames it; the tar goes to a temporary name),
then a pending record is written, the tar renamed into place, and the record renamed into place. A crash at any
point leaves either the old state (pending record does not verify: deleted) or the new one (pending record
verifies: rolled forward) -- see `recover`. Readers only read shards whose records are final.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.utils.data as tud
import yaml

from pipeline import encodings
from pipeline.teacher_manifest import TASKS

FORMAT = "olaf.store/1"
MANIFEST = "olaf_store.json"
TEACHERS = "teachers.yaml"
ZARR = "targets.zarr"
WDS = "wds"
SHARDS = "shards"
ERRORS = "errors.jsonl"
FORMATS = ("zarr", "wds")
COMPRESSIONS = ("none", "zstd")
REPO_ROOT = Path(__file__).resolve().parents[1]


class StoreError(Exception):
    """Something about a store is wrong or does not match what the caller expects; the message says what."""


# ---- small helpers ---------------------------------------------------------------------------------------------


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def code_version() -> dict:
    """olaf's version, the git commit when there is one, and a hash of the source that ran (Ray jobs run from an
    uploaded working directory without .git, so the hash is what always identifies the code)."""
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
    git = None
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
        git = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": pkg, "git": git, "source_sha256": h.hexdigest()}


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def tar_key(sample_id: str) -> str:
    """The sample id as a WebDataset key: WebDataset splits member names at the first '.', so dots, slashes and
    other unsafe characters are percent-encoded (LLaVA's 9-digit ids are unchanged). The json member holds the
    original id."""
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), sample_id)


def tar_name(shard: int) -> str:
    return f"{WDS}/shard-{shard:06d}.tar"


def record_name(shard: int) -> str:
    return f"{SHARDS}/{shard:06d}.json"


def image_member(relpath: str | None) -> str | None:
    if not relpath:
        return None
    ext = Path(relpath).suffix.lower().lstrip(".")
    return ext if ext and _UNSAFE.sub("", ext) == ext else "img"


# ---- the run manifest ------------------------------------------------------------------------------------------


@dataclass
class TaskLayout:
    """How one task's targets are stored."""

    shape: tuple[int, int]  # (tokens, width) per sample
    encoding: str  # see pipeline.encodings
    grid: tuple[int, int] | None = None  # (rows, cols) when the tokens are a row-major grid

    def to_dict(self) -> dict:
        enc = encodings.get(self.encoding)
        return {"shape": list(self.shape), "encoding": self.encoding, "values_dtype": enc.values_dtype,
                "scaled": enc.scaled, "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_dict(cls, d: dict) -> TaskLayout:
        return cls(shape=tuple(d["shape"]), encoding=d["encoding"], grid=tuple(d["grid"]) if d.get("grid") else None)


def grid_of(tokens: int) -> tuple[int, int] | None:
    side = int(round(tokens ** 0.5))
    return (side, side) if side * side == tokens and tokens > 1 else None


def read_manifest(store_dir: str | Path) -> dict:
    """The run manifest, with clear errors for a path that is not a store or a store of another format."""
    store_dir = Path(store_dir)
    path = store_dir / MANIFEST
    if not store_dir.exists():
        raise StoreError(f"{store_dir} does not exist")
    if not path.is_file():
        raise StoreError(f"{store_dir} is not an olaf store (no {MANIFEST}); create one with pipeline.extract_teachers")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is damaged (not JSON: {e})") from None
    fmt = m.get("format") if isinstance(m, dict) else None
    if fmt != FORMAT:
        raise StoreError(
            f"{store_dir} has store format {fmt!r}; this olaf reads {FORMAT!r}. Re-extract it with this version, "
            f"or use the olaf version that wrote it ({(m.get('code') or {}).get('version', '?') if isinstance(m, dict) else '?'})"
        )
    return m


def write_manifest(store_dir: str | Path, manifest: dict) -> None:
    manifest["updated"] = now()
    write_json_atomic(Path(store_dir) / MANIFEST, manifest)


def new_manifest(*, dataset: dict, num_samples: int, shard_size: int, formats: list[str], tasks: dict[str, TaskLayout],
                 compression: str, extraction: dict | None = None) -> dict:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise StoreError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, got {formats}")
    if compression not in COMPRESSIONS:
        raise StoreError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if shard_size < 1:
        raise StoreError(f"shard size must be >= 1, got {shard_size}")
    return {
        "format": FORMAT,
        "created": now(),
        "updated": now(),
        "finished": None,
        "code": code_version(),
        "dataset": dataset,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "num_shards": -(-num_samples // shard_size),
        "formats": [f for f in FORMATS if f in formats],
        "zarr_compression": compression,
        "tasks": {t: tasks[t].to_dict() for t in TASKS if t in tasks},
        "token_order": "row-major: token index = row * grid_cols + col",
        "extraction": extraction or {},
        "progress": {},
    }


def shard_range(manifest: dict, shard: int) -> tuple[int, int]:
    s = manifest["shard_size"]
    return shard * s, min(manifest["num_samples"], (shard + 1) * s)


# ---- creating the zarr group -----------------------------------------------------------------------------------


def _codecs(compression: str):
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=3), Crc32cCodec()] if compression == "zstd" else [Crc32cCodec()]


def ensure_zarr(store_dir: str | Path, manifest: dict) -> None:
    """Create the group and every array the manifest's tasks need (idempotent). Called by the driver only, before
    any writer runs: writers write chunk/shard files, never metadata."""
    import zarr

    if "zarr" not in manifest["formats"]:
        return
    n, s = manifest["num_samples"], manifest["shard_size"]
    comp = manifest.get("zarr_compression", "none")
    g = zarr.open_group(Path(store_dir) / ZARR, mode="a", zarr_format=3)
    g.attrs.update({"format": FORMAT, "tasks": list(manifest["tasks"]), "token_order": manifest["token_order"]})
    cfg = {"write_empty_chunks": True}
    if "keys" not in g:
        g.create_array("keys", shape=(n,), chunks=(s,), dtype=str, compressors=[_codecs("none")[-1]], config=cfg)
    valid = g.require_group("valid")
    for task, layout in manifest["tasks"].items():
        t, w = layout["shape"]
        if task not in g:
            g.create_array(task, shape=(n, t, w), chunks=(1, t, w), shards=(s, t, w), dtype=layout["values_dtype"],
                           fill_value=0, compressors=_codecs(comp), config=cfg,
                           attributes={"encoding": layout["encoding"], "grid": layout["grid"]})
        if layout["scaled"] and f"{task}_scale" not in g:
            g.create_array(f"{task}_scale", shape=(n, t), chunks=(1, t), shards=(s, t), dtype="float32",
                           fill_value=0, compressors=_codecs(comp), config=cfg)
        if task not in valid:
            valid.create_array(task, shape=(n,), chunks=(s,), dtype="uint8", fill_value=0,
                               compressors=[_codecs("none")[-1]], config=cfg)


def _zarr_file(g, name: str, shard: int) -> str:
    """Path (relative to the store) of the one zarr file that holds extraction shard `shard` of array `name`."""
    arr = g[name]
    coords = (shard,) + (0,) * (arr.ndim - 1)
    return f"{ZARR}/{name}/{arr.metadata.encode_chunk_key(coords)}"


def shard_zarr_files(g, tasks: Iterable[str], shard: int, manifest: dict, with_keys: bool = True) -> list[str]:
    names = (["keys"] if with_keys else []) + [n for t in tasks
                                               for n in ([t] + ([f"{t}_scale"] if manifest["tasks"][t]["scaled"] else [])
                                                         + [f"valid/{t}"])]
    return [_zarr_file(g, n, shard) for n in names]


# ---- writing one shard -----------------------------------------------------------------------------------------


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
    shard: int
    tasks: tuple[str, ...]  # tasks computed in this pass
    samples: list[SampleResult]  # the shard's samples in dataset order
    values: dict[str, np.ndarray]  # task -> encoded (n, T, W); rows of invalid samples are zero
    scales: dict[str, np.ndarray | None]
    valid: dict[str, np.ndarray]  # task -> bool (n,)
    task_errors: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> {position in shard: reason}
    seconds: float = 0.0


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes}, in file order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, suffix = m.name.partition(".")
            out.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    return out


def _write_tar(path: Path, samples: list[dict]) -> tuple[int, str]:
    """Write samples ({"__key__": k, suffix: bytes}) deterministically: fixed owner, mode, mtime and member order,
    so the same content gives the same bytes. Returns (bytes, sha256)."""
    import webdataset as wds

    with open(path, "wb") as f:
        hw = _HashingWriter(f)
        with wds.TarWriter(hw, user="", group="", mode=0o444, mtime=0.0, encoder=False) as w:
            for s in samples:
                w.write(s)
        f.flush()
        os.fsync(f.fileno())
    return hw.n, hw.h.hexdigest()


def commit_shard(store_dir: str | Path, result: ShardResult) -> dict:
    """Write one shard's zarr region and tar, then commit its record. Safe to run in separate processes for
    different shards at the same time. Re-running it for a shard replaces what was there; computing more tasks
    for a done shard keeps the tasks already there (the tar is rebuilt with the old members plus the new)."""
    import zarr

    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir)
    i = result.shard
    start, stop = shard_range(manifest, i)
    n = stop - start
    if len(result.samples) != n:
        raise StoreError(f"shard {i}: got {len(result.samples)} samples, the shard holds {n}")
    unknown = [t for t in result.tasks if t not in manifest["tasks"]]
    if unknown:
        raise StoreError(f"shard {i}: tasks {unknown} are not in the store manifest")
    previous = read_record(store_dir, i)
    prev_tasks = [t for t in (previous or {}).get("tasks", []) if t not in result.tasks]
    all_tasks = [t for t in TASKS if t in prev_tasks or t in result.tasks]
    files: dict[str, dict] = {}

    if "zarr" in manifest["formats"]:
        g = zarr.open_group(store_dir / ZARR, mode="r+")
        # always (re)written: the same bytes each time, and a shard being redone may have a damaged keys chunk
        g["keys"][start:stop] = np.array([s.id for s in result.samples], dtype=object)
        for t in result.tasks:
            g[t][start:stop] = result.values[t]
            if manifest["tasks"][t]["scaled"]:
                g[f"{t}_scale"][start:stop] = result.scales[t]
            g["valid"][t][start:stop] = result.valid[t].astype(np.uint8)
        for rel in shard_zarr_files(g, all_tasks, i, manifest):
            p = store_dir / rel
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)} if p.exists() else {"absent": True}

    tmp_tar = None
    if "wds" in manifest["formats"]:
        old = _read_tar(store_dir / tar_name(i)) if previous and prev_tasks else {}
        members = []
        for pos, s in enumerate(result.samples):
            key = tar_key(s.id)
            prev = old.get(key, {})
            prev_meta = json.loads(prev["json"]) if "json" in prev else {}
            valid = {t: bool(prev_meta.get("valid", {}).get(t, False)) for t in prev_tasks}
            valid.update({t: bool(result.valid[t][pos]) for t in result.tasks})
            errors = {k: v for k, v in (prev_meta.get("errors") or {}).items() if k not in result.tasks}
            if s.error:
                errors["image"] = s.error
            for t in result.tasks:
                if pos in result.task_errors.get(t, {}):
                    errors[t] = result.task_errors[t][pos]
            meta = {"id": s.id, "index": s.index, "shard": i, "record": s.record,
                    "image_member": image_member(s.image) if s.image_bytes is not None else None,
                    "valid": {t: valid[t] for t in all_tasks}, "errors": errors or None}
            sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
            if s.image_bytes is not None:
                sample[meta["image_member"]] = s.image_bytes
            for t in prev_tasks:  # keep what an earlier pass stored
                for suffix in (f"{t}.npy", f"{t}.scale.npy"):
                    if suffix in prev:
                        sample[suffix] = prev[suffix]
            for t in result.tasks:
                if result.valid[t][pos]:
                    sample[f"{t}.npy"] = _npy(result.values[t][pos])
                    if manifest["tasks"][t]["scaled"]:
                        sample[f"{t}.scale.npy"] = _npy(result.scales[t][pos])
            members.append(sample)
        (store_dir / WDS).mkdir(exist_ok=True)
        tmp_tar = store_dir / f"{tar_name(i)}.tmp-{uuid.uuid4().hex[:8]}"
        size, digest = _write_tar(tmp_tar, members)
        files[tar_name(i)] = {"bytes": size, "sha256": digest}

    errors = [e for e in (previous or {}).get("errors", []) if e.get("task") not in result.tasks]
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
    valid_counts = dict((previous or {}).get("valid", {}))
    valid_counts.update({t: int(result.valid[t].sum()) for t in result.tasks})
    record = {
        "shard": i, "start": start, "stop": stop, "count": n, "status": "done",
        "tasks": all_tasks,
        "valid": {t: valid_counts[t] for t in all_tasks},
        "bad_images": sum(1 for s in result.samples if s.error),
        "files": files,
        "errors": errors,
        "written": now(),
        "seconds": round(result.seconds + (previous or {}).get("seconds", 0.0), 3),
    }
    # commit: pending record, tar into place, record into place (see `recover` for every crash point)
    (store_dir / SHARDS).mkdir(exist_ok=True)
    final = store_dir / record_name(i)
    pending = final.with_name(final.name + ".pending")
    write_json_atomic(pending, record)
    if tmp_tar is not None:
        os.replace(tmp_tar, store_dir / tar_name(i))
    os.replace(pending, final)
    return record


# ---- records, recovery, verification ---------------------------------------------------------------------------


def read_record(store_dir: str | Path, shard: int) -> dict | None:
    p = Path(store_dir) / record_name(shard)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged record is no commit


def read_records(store_dir: str | Path) -> dict[int, dict]:
    out = {}
    d = Path(store_dir) / SHARDS
    if d.is_dir():
        for p in sorted(d.glob("[0-9]*.json")):
            rec = read_record(store_dir, int(p.stem))
            if rec is not None:
                out[rec["shard"]] = rec
    return out


def check_files(store_dir: str | Path, record: dict, full: bool = True) -> list[str]:
    """Problems with the files a record lists: missing, wrong size, or (full) wrong sha256. Empty if all good."""
    problems = []
    for rel, info in record.get("files", {}).items():
        p = Path(store_dir) / rel
        if info.get("absent"):
            if p.exists():
                problems.append(f"{rel}: present but recorded as absent")
            continue
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, recorded {info['bytes']} (truncated or rewritten)")
        elif full and sha256_file(p) != info["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (corrupted)")
    return problems


def recover(store_dir: str | Path) -> list[str]:
    """Finish or undo interrupted commits; returns what it did. Run by the extraction driver before work starts
    (never while writers run)."""
    store_dir = Path(store_dir)
    actions = []
    for pending in sorted((store_dir / SHARDS).glob("*.json.pending")) if (store_dir / SHARDS).is_dir() else []:
        try:
            rec = json.loads(pending.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if rec is not None and not check_files(store_dir, rec, full=True):
            os.replace(pending, pending.with_suffix(""))
            actions.append(f"shard {rec['shard']}: completed an interrupted commit")
        else:
            pending.unlink()
            actions.append(f"{pending.name}: discarded an interrupted commit")
    for tmp in sorted((store_dir / WDS).glob("*.tar.tmp-*")) if (store_dir / WDS).is_dir() else []:
        tmp.unlink()
        actions.append(f"{tmp.name}: removed a partial tar")
    return actions


def rebuild_errors(store_dir: str | Path, records: dict[int, dict] | None = None) -> int:
    """errors.jsonl from the shard records (the records are the source of truth). Returns the line count."""
    records = read_records(store_dir) if records is None else records
    lines = [json.dumps(e, sort_keys=True) for i in sorted(records) for e in records[i].get("errors", [])]
    tmp = Path(store_dir) / f".{ERRORS}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, Path(store_dir) / ERRORS)
    return len(lines)


# ---- teachers --------------------------------------------------------------------------------------------------


def write_teachers(store_dir: str | Path, teachers: dict) -> None:
    """teachers.yaml: a `TeacherManifest.identity()` dict: {format, name, fidelity, stored_dtype, description,
    teachers: {task: {recipe_sha256, weights, weights_sha256, recipe}}}."""
    tmp = Path(store_dir) / f".{TEACHERS}.tmp"
    tmp.write_text(yaml.safe_dump(teachers, sort_keys=False, default_flow_style=None, width=120), encoding="utf-8")
    os.replace(tmp, Path(store_dir) / TEACHERS)


def read_teachers(store_dir: str | Path) -> dict:
    p = Path(store_dir) / TEACHERS
    if not p.is_file():
        raise StoreError(f"{store_dir}: {TEACHERS} is missing: the store does not say which teachers computed it")
    return yaml.safe_load(p.read_text(encoding="utf-8"))


def teacher_mismatches(stored: dict, expected: dict, tasks: Iterable[str]) -> list[str]:
    """Differences between the store's teachers and the expected ones (`TeacherManifest.identity()` dicts), for
    `tasks`. Weights hashes are compared when both sides have one."""
    out = []
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
        if s.get("weights") != e.get("weights"):
            out.append(f"{t}: weights differ: store {s.get('weights')}, expected {e.get('weights')}")
        ws, we = s.get("weights_sha256"), e.get("weights_sha256")
        if ws and we and ws != we:
            out.append(f"{t}: weights sha256 differs: store {ws[:16]}..., expected {we[:16]}...")
    return out


# ---- reading ---------------------------------------------------------------------------------------------------


class Store:
    """A store, opened for reading. Checks the format version on open; `require` checks tasks, completeness and
    teacher identity before anything relies on them. With `expected_teachers` (a `TeacherManifest.identity()`
    dict) the check happens on open, for `tasks` (default: all the store has), so a random-access reader
    (`get`) refuses a mismatch exactly as the streaming one (`TargetStream`) does."""

    def __init__(self, path: str | Path, expected_teachers: dict | None = None, tasks=None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.records = read_records(self.path)
        self._index = None
        if expected_teachers is not None:
            self.require(tasks if tasks is not None else self.tasks, expected_teachers, allow_partial=True)

    # -- what is there
    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_shards(self) -> int:
        return self.manifest["num_shards"]

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def teachers(self) -> dict:
        return read_teachers(self.path)

    def done_shards(self, tasks: Iterable[str] | None = None) -> list[int]:
        tasks = list(tasks) if tasks is not None else self.tasks
        return [i for i, r in sorted(self.records.items()) if r.get("status") == "done" and set(tasks) <= set(r["tasks"])]

    def pending_shards(self, tasks: Iterable[str] | None = None) -> list[int]:
        done = set(self.done_shards(tasks))
        return [i for i in range(self.num_shards) if i not in done]

    def require(self, tasks: Iterable[str], expected_teachers: dict | None = None, allow_partial: bool = False,
                formats: Iterable[str] = ()) -> None:
        """Refuse, with one message listing every reason, a store that lacks tasks, formats, finished shards or
        the expected teachers."""
        tasks = list(tasks)
        problems = []
        missing = [t for t in tasks if t not in self.manifest["tasks"]]
        if missing:
            problems.append(f"tasks {missing} are not in the store (it has {self.tasks})")
        for f in formats:
            if f not in self.manifest["formats"]:
                problems.append(f"the store has no {f} output (formats: {self.manifest['formats']})")
        if not missing:
            pending = self.pending_shards(tasks)
            if pending and not allow_partial:
                problems.append(f"{len(pending)} of {self.num_shards} shards are not done for {tasks} "
                                f"(e.g. {pending[:5]}): finish the extraction by re-running it")
            if len(pending) == self.num_shards:
                problems.append("no shard is done")
        if expected_teachers is not None and not missing:
            problems += [f"teacher mismatch: {m}" for m in teacher_mismatches(self.teachers(), expected_teachers, tasks)]
        if problems:
            raise StoreError(f"store {self.path} cannot be used as asked:\n  " + "\n  ".join(problems))

    # -- WebDataset
    def tar_paths(self, tasks: Iterable[str] | None = None, check: str = "size") -> list[str]:
        """Paths of the done shards' tars, checked against their records ('size', 'sha256' or 'none')."""
        if "wds" not in self.manifest["formats"]:
            raise StoreError(f"{self.path} has no WebDataset shards (formats: {self.manifest['formats']})")
        out = []
        for i in self.done_shards(tasks):
            rel = tar_name(i)
            info = self.records[i]["files"].get(rel)
            rec = {"files": {rel: info}} if info else {"files": {}}
            problems = check_files(self.path, rec, full=(check == "sha256")) if check != "none" else []
            if problems:
                raise StoreError(f"shard {i} is damaged: {'; '.join(problems)}; run `python -m pipeline.inspect "
                                 f"{self.path} verify` and re-run the extraction to redo it")
            out.append(str(self.path / rel))
        return out

    # -- Zarr random access
    def zarr(self):
        import zarr

        if "zarr" not in self.manifest["formats"]:
            raise StoreError(f"{self.path} has no Zarr arrays (formats: {self.manifest['formats']})")
        return zarr.open_group(self.path / ZARR, mode="r")

    def index_of(self, key: str) -> int:
        if self._index is None:
            keys = self.zarr()["keys"][:]
            done = {j for i in self.done_shards([]) for j in range(*shard_range(self.manifest, i))}
            self._index = {k: j for j, k in enumerate(keys) if j in done}
        if key not in self._index:
            raise KeyError(f"sample {key!r} is not in a done shard of {self.path}")
        return self._index[key]

    def get(self, key: str, tasks: Iterable[str] | None = None) -> dict:
        """Everything Zarr holds for one sample: {"id", "index", "shard", "valid": {task: bool},
        "targets": {task: float32 tensor (T, W)}} (targets only where valid)."""
        tasks = list(tasks) if tasks is not None else self.tasks
        j = self.index_of(key)
        g = self.zarr()
        shard = j // self.manifest["shard_size"]
        rec = self.records[shard]
        out = {"id": key, "index": j, "shard": shard, "valid": {}, "targets": {}}
        for t in tasks:
            if t not in rec["tasks"]:
                continue
            ok = bool(g["valid"][t][j])
            out["valid"][t] = ok
            if ok:
                layout = self.manifest["tasks"][t]
                scale = g[f"{t}_scale"][j] if layout["scaled"] else None
                out["targets"][t] = encodings.decode(g[t][j], scale, layout["encoding"])
        return out


def decode_tar_sample(sample: dict, manifest: dict, tasks: Iterable[str], compact: bool = False) -> dict:
    """A raw WebDataset sample ({"__key__", "json", "jpg", "gen.npy", ...} of bytes) -> {"id", "index", "record",
    "image": bytes or None, "valid": {task: bool}, "targets": {task: tensor or None}}."""
    import torch

    meta = json.loads(sample["json"])
    out = {"id": meta["id"], "index": meta["index"], "record": meta["record"], "valid": {}, "targets": {},
           "image": sample.get(meta["image_member"]) if meta.get("image_member") else None}
    for t in tasks:
        layout = manifest["tasks"][t]
        ok = bool(meta["valid"].get(t)) and f"{t}.npy" in sample
        out["valid"][t] = ok
        if ok:
            values = np.load(io.BytesIO(sample[f"{t}.npy"]), allow_pickle=False)
            scale = np.load(io.BytesIO(sample[f"{t}.scale.npy"]), allow_pickle=False) if layout["scaled"] else None
            dtype = encodings.compact_dtype(layout["encoding"]) if compact else torch.float32
            out["targets"][t] = encodings.decode(values, scale, layout["encoding"], dtype)
        else:
            out["targets"][t] = None
    return out


def iter_tar(path: str | Path) -> Iterator[dict]:
    """Raw samples of one tar, in order, as WebDataset groups them."""
    import webdataset as wds

    yield from wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())


# ---- streaming (the trainer's reader) ---------------------------------------------------------------------------


def split_streams(num_shards: int, rank: int, world: int, worker: int, workers: int) -> tuple[int, int, bool]:
    """(stream id, number of streams, split by shard?) for one DataLoader worker of one rank. With at least as
    many shards as streams each stream reads its own shards; with fewer (small stores), every stream reads every
    shard and keeps every n-th sample, so no rank or worker ever runs dry."""
    streams = world * workers
    return rank * workers + worker, streams, num_shards >= streams


class TargetStream(tud.IterableDataset):
    """An iterable over a store's WebDataset shards for training, built from webdataset stages:

        shard list (seeded order per epoch, split by rank and worker) -> tar samples -> shuffle buffer (seeded)
        -> skip (resume) -> decode (image bytes, record, targets, valid) -> map_fn (the trainer's preprocessing)

    The order is a pure function of (seed, world size, number of workers), so a run resumed with `skip` (per
    worker stream) and `worker_offset` sees the same samples in the same order as an uninterrupted one; every
    sample carries `stream` = (worker stream, position) for that bookkeeping. `map_fn` may return None to drop a
    sample. `repeat=True` streams epoch after epoch (the trainer stops at its step budget).
    """

    def __init__(self, store_or_path, tasks, *, expected_teachers: dict | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, repeat: bool = True,
                 compact: bool = True, check: str = "size", allow_partial: bool = False,
                 skip: int | list[int] = 0, worker_offset: int = 0, map_fn=None):
        s = store_or_path if isinstance(store_or_path, Store) else Store(store_or_path)
        self.tasks = list(tasks)
        s.require(self.tasks, expected_teachers=expected_teachers, allow_partial=allow_partial, formats=["wds"])
        self.urls = s.tar_paths(self.tasks, check=check)
        self.manifest = s.manifest
        self.num_samples = sum(s.records[i]["count"] for i in s.done_shards(self.tasks))
        self.shuffle_buffer, self.seed, self.repeat, self.compact = shuffle_buffer, seed, repeat, compact
        self.rank, self.world_size, self.skip, self.map_fn = rank, world_size, skip, map_fn
        self.worker_offset = worker_offset

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        import random

        import webdataset as wds

        info = tud.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader asks its workers in turn, starting with worker 0: after k batches a resumed loader must
        # start with the stream that was next, so DataLoader worker i plays stream (i + k) % workers
        worker = (worker + self.worker_offset) % workers
        rank, world = self._rank_world()
        stream, streams, by_shard = split_streams(len(self.urls), rank, world, worker, workers)
        skip = self.skip[worker] if isinstance(self.skip, list | tuple) else self.skip

        def samples():
            epoch = 0
            while True:
                order = list(self.urls)
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
                mine = order[stream::streams] if by_shard else order
                raw = iter(wds.DataPipeline(wds.SimpleShardList(mine), wds.tarfile_to_samples()))
                if not by_shard:
                    raw = (x for k, x in enumerate(raw) if k % streams == stream)
                rng = random.Random(f"{self.seed}/{epoch}/{stream}")
                yield from wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw) \
                    if self.shuffle_buffer > 1 else raw
                epoch += 1
                if not self.repeat:
                    return

        it = samples()
        for _ in range(skip):  # resume: drop what was consumed, before any decoding
            next(it, None)
        for pos, raw in enumerate(it, start=skip):
            sample = decode_tar_sample(raw, self.manifest, self.tasks, compact=self.compact)
            # where this sample sits in its worker's stream: a consumer that checkpoints the largest position it
            # used, per worker, resumes exactly with skip = position + 1 (filtered samples included)
            sample["stream"] = (worker, pos)
            out = self.map_fn(sample) if self.map_fn is not None else sample
            if out is not None:  # map_fn may drop a sample (e.g. an unusable image)
                yield out
