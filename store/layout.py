"""Every name and path of the store format, in one place: object names, tar member suffixes, Zarr array names,
shard ranges. Everything else in olaf asks this module (through the store package) instead of spelling them.

    STORE/                       (a local folder, a shared filesystem or an object-storage prefix)
      olaf_store.json            run manifest (store.manifest.RunManifest)
      olaf_store.backup.json     the same bytes, written after it: a damaged manifest is restored from it
      teachers.yaml              the teacher identity the targets were computed with
      targets.zarr/              Zarr v3 group: keys, valid/<task>, <task> [, <task>_scale]
      wds/shard-NNNNNN.tar       one WebDataset tar per extraction shard
      shards/NNNNNN.json         one record per shard, written last: the commit point
      shards/NNNNNN.lease        while a job computes the shard: who, and until when (see writer.take_lease)
      errors.jsonl               one line per bad sample or target, rebuilt from the records
      index/                     the sample index the trainer starts from (store.index): index.json, *.npy, ids.bin
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

FORMAT = "olaf.store/1"
MANIFEST = "olaf_store.json"
MANIFEST_BACKUP = "olaf_store.backup.json"
MANIFEST_LOCK = "olaf_store.lock"  # held while a job saves the manifest (store.lease.ManifestLock)
TEACHERS = "teachers.yaml"
ZARR = "targets.zarr"
WDS = "wds"
SHARDS = "shards"
ERRORS = "errors.jsonl"
INDEX = "index"
INDEX_META = f"{INDEX}/index.json"  # the index's commit point
INDEX_IDS = f"{INDEX}/ids.bin"
FORMATS = ("zarr", "wds")
COMPRESSIONS = ("none", "zstd")
TOKEN_ORDER = "row-major: token index = row * grid_cols + col"

# Zarr arrays
KEYS = "keys"
VALID = "valid"

# tar members of one sample: <key>.json, <key>.<image ext>, <key>.<task>.npy [+ <key>.<task>.scale.npy]
META_MEMBER = "json"
FALLBACK_IMAGE_MEMBER = "img"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_TAR_RE = re.compile(r"^shard-(\d{6,})\.tar$")
_RECORD_RE = re.compile(r"^(\d{6,})\.json$")
_LEASE_RE = re.compile(r"^(\d{6,})\.lease$")


def tar_key(sample_id: str) -> str:
    """The sample id as a WebDataset key: WebDataset splits member names at the first '.', so dots, slashes and
    other unsafe characters are percent-encoded (LLaVA's 9-digit ids are unchanged). The json member holds the
    original id."""
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), sample_id)


WRITE_PROBE = ".olaf-write-probe-"  # what a writability check leaves for an instant: not a store's content


def tar_name(shard: int) -> str:
    return f"{WDS}/shard-{shard:06d}.tar"


def record_name(shard: int) -> str:
    return f"{SHARDS}/{shard:06d}.json"


def lease_name(shard: int) -> str:
    return f"{SHARDS}/{shard:06d}.lease"


def is_lease(name: str) -> bool:
    return name.endswith(".lease")


def shard_of_tar(name: str) -> int | None:
    m = _TAR_RE.match(PurePosixPath(name).name)
    return int(m.group(1)) if m else None


def shard_of_lease(name: str) -> int | None:
    m = _LEASE_RE.match(PurePosixPath(name).name)
    return int(m.group(1)) if m else None


def shard_of_record(name: str) -> int | None:
    m = _RECORD_RE.match(PurePosixPath(name).name)
    return int(m.group(1)) if m else None


def target_member(task: str) -> str:
    return f"{task}.npy"


def scale_member(task: str) -> str:
    return f"{task}.scale.npy"


def image_member(relpath: str | None) -> str | None:
    """The tar member suffix of a sample's image: its lower-case extension when that is safe, else 'img'."""
    if not relpath:
        return None
    ext = PurePosixPath(relpath).suffix.lower().lstrip(".")
    return ext if ext and _UNSAFE.sub("", ext) == ext else FALLBACK_IMAGE_MEMBER


_TASK_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
RESERVED_TASKS = frozenset({KEYS, VALID, META_MEMBER, FALLBACK_IMAGE_MEMBER, "scale", "index", "id", "ids"})


def task_name_problem(name) -> str | None:
    """Why `name` cannot be a task of a store (it names a Zarr array, `<task>_scale`, `valid/<task>` and tar members
    `<key>.<task>.npy`), or None: lower-case letters, digits and `_`, a letter first, at most 32, not a name the
    format uses itself and not ending in `_scale` (another task's scale array)."""
    if not isinstance(name, str) or not _TASK_RE.match(name):
        return (f"task name {name!r} is not a safe identifier: lower-case letters, digits and _, a letter first, at "
                f"most 32 characters (e.g. dino, siglip_l14)")
    if name in RESERVED_TASKS or name.endswith("_scale"):
        return f"task name {name!r} is taken by the store format itself; choose another (e.g. {name}_feat)"
    return None


def scale_array(task: str) -> str:
    return f"{task}_scale"


def valid_array(task: str) -> str:
    return f"{VALID}/{task}"


def task_arrays(task: str, scaled: bool) -> list[str]:
    """The Zarr arrays that hold one task's targets."""
    return [task] + ([scale_array(task)] if scaled else []) + [valid_array(task)]


def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def shard_range(num_samples: int, shard_size: int, shard: int) -> tuple[int, int]:
    """[start, stop) of the global sample indices of one shard: shards are contiguous, in dataset order."""
    return shard * shard_size, min(num_samples, (shard + 1) * shard_size)


def grid_of(tokens: int) -> tuple[int, int] | None:
    side = int(round(tokens ** 0.5))
    return (side, side) if side * side == tokens and tokens > 1 else None
