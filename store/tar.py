"""The WebDataset tars of a store, the one module that reads and writes them: deterministic writing with each
sample's byte range, and the three ways readers take samples out (a whole tar streamed, one shard's tar as a
dict, one sample's byte range). Samples are grouped by key as webdataset groups them."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator

from store.fs import Location

MEMBER_MODE = 0o444


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


def write_tar(loc: Location, name: str, samples: Iterable[dict]) -> dict:
    """Write samples ({"__key__": k, suffix: bytes}) deterministically (members in name order, mtime 0, no
    owner names, mode 0444: the same content gives the same bytes, the layout webdataset's TarWriter gives),
    hashing while writing. Returns {"bytes", "sha256", "samples": [[offset, size], ...]}: where each sample's
    members lie in the tar, so a reader can fetch any one sample with a single range read.

    tarfile's plain "w" mode rather than the "w|" stream mode webdataset's TarWriter uses: the same bytes
    (tests/test_store.py), without re-buffering every member into 10 KiB records (~15% less CPU at real target
    sizes, `benchmarks/extract.py --shape-true`), and `offset` gives each sample's range."""
    ranges, tasks = [], {}
    with loc.open_atomic(name) as f:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w") as tf:
            for n, s in enumerate(samples):
                start = tf.offset
                for task, (a, b) in _add_members(tf, s).items():  # each task's members: where they lie in it
                    tasks.setdefault(task, [[0, 0]] * n)
                    tasks[task].append([a - start, b - a])
                ranges.append([start, tf.offset - start])
                for rows in tasks.values():
                    rows.extend([[0, 0]] * (len(ranges) - len(rows)))
    return {"bytes": hw.n, "sha256": hw.h.hexdigest(), "samples": ranges, "tasks": tasks}


def _add_members(tf: tarfile.TarFile, s: dict) -> dict[str, tuple[int, int]]:
    """Adds a sample's members (in suffix order); returns each task's [start, end) in the tar: its `<task>.npy` and
    `<task>.scale.npy`, which the suffix order puts next to each other, so a reader can leave a task out."""
    key, tasks = s["__key__"], {}
    for suffix in sorted(k for k in s if not k.startswith("_")):
        data, start = s[suffix], tf.offset
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0.0, MEMBER_MODE, "", ""
        tf.addfile(info, io.BytesIO(data))
        if suffix.endswith(".npy"):
            task = suffix.split(".")[0]
            tasks[task] = (tasks.get(task, (start, 0))[0], tf.offset)
    return tasks


def sample_bytes(s: dict) -> bytes:
    """One sample's members as `write_tar` lays them out inside a tar (its range's bytes, wherever it lies)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add_members(tf, s)
        end = tf.offset
    return buf.getvalue()[:end]


def samples_of(stream, url: str) -> Iterator[dict]:
    """Raw samples ({"__key__", suffix: bytes, ...}) of a tar stream: a whole tar, or the byte range of some of its
    samples."""
    import webdataset as wds

    yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))


def iter_tar(loc: Location, name: str) -> Iterator[dict]:
    """Raw samples of one tar, in order, streamed from any filesystem (one in memory at a time)."""
    with loc.open(name) as f:
        yield from samples_of(f, loc.url_of(name))


def members_by_key(loc: Location, name: str) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes} of one shard's tar (to carry a task's members into the shard's new tar)."""
    return {raw["__key__"]: {k: v for k, v in raw.items() if not k.startswith("__")} for raw in iter_tar(loc, name)}


def sample_in(data: bytes, where: str) -> dict | None:
    """The raw sample in the bytes of one sample's range, or None when they hold none."""
    return next(samples_of(io.BytesIO(data), where), None)


def exact_sample(data: bytes, where: str) -> dict | None:
    """The raw sample in `data` when these bytes are exactly one sample's members (headers, data and padding, to
    the last byte, one key); None for anything else: another sample's bytes, a range cut short or running on."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = tf.getmembers()
        end = max((m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for m in members), default=0)
        if not members or end != len(data) or len({m.name.partition(".")[0] for m in members}) != 1:
            return None
        return sample_in(data, where)
    except Exception:  # noqa: BLE001  (whatever these bytes make a tar reader raise, they are not the sample)
        return None


def member_sizes(raw: dict) -> dict[str, int]:
    """A raw sample's members and their sizes (what `inspect show` lists)."""
    return {k: len(v) for k, v in sorted(raw.items()) if not k.startswith("__")}


def index(loc: Location, name: str) -> list[dict]:
    """What one tar holds, sample by sample, streamed once: {"key", "id" (its json member's), "range": [offset,
    size]} -- the byte range of the sample's members, headers and padding included, as `write_tar` records it."""
    import json

    out: list[dict] = []
    with loc.open(name) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for mem in tf:
            if not mem.isfile():
                continue
            key, _, suffix = mem.name.partition(".")
            end = mem.offset_data + -(-mem.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not out or out[-1]["key"] != key:
                out.append({"key": key, "id": None, "range": [mem.offset, 0]})
            out[-1]["range"][1] = end - out[-1]["range"][0]
            if suffix == "json":
                try:
                    out[-1]["id"] = json.loads(tf.extractfile(mem).read()).get("id")
                except (ValueError, AttributeError):
                    out[-1]["id"] = None
    return out
