"""olaf's one per-node cache: what a node derives once and its processes share (an input's listing, a weight file's
sha256, the training order's arrays, a remote store's index files), under `cache_root()`.

Each entry is a file and a `.sha256` beside it, written after it: an entry is used only when its bytes hash to what
was written with them, so a flipped bit, a file cut short or another program's write is never read as data. Such an
entry is computed again (one line says so) and rewritten. Keys say what the entry depends on, by content where the
input can change under the same name (an input file's sha256, an object's ETag), never by size and mtime alone.
A cache that cannot be written (read-only, full) costs time, not the run: one line, once per process.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from store.fs import atomic_write, cache_root, file_sha256

SUFFIX = ".sha256"
_said: set[str] = set()  # the lines already printed by this process (one per kind of problem and folder)


def entry(kind: str, *key) -> Path:
    """The path of the entry for `key` (any parts; hashed) under the cache's folder `kind`."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:32]
    return cache_root() / kind / digest


def _say(line: str, once: str) -> None:
    if once not in _said:
        _said.add(once)
        print(line, file=sys.stderr, flush=True)


def _checksum(path: Path) -> str | None:
    try:
        return path.with_name(path.name + SUFFIX).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _matches(path: Path, got: str, want: str | None, expect: str | None) -> bool:
    if got == want and (expect is None or got == expect):
        return True
    _say(f"warning: the cache entry {path} does not match its checksum (damaged): computed again", str(path))
    return False


def valid(path: Path, expect: str | None = None) -> bool:
    """Whether the entry is there and its bytes hash to the checksum written with it (and to `expect`, when the
    caller knows what they must be); hashed as a stream, never whole in memory (an entry to map, not to read). A
    damaged entry is named in one line."""
    want = _checksum(path)
    try:
        return want is not None and _matches(path, file_sha256(path), want, expect)
    except OSError:
        return False


def read(path: Path) -> bytes | None:
    """The entry's bytes (read once) when they are there and match their checksum; None otherwise (absent,
    unreadable, damaged)."""
    want = _checksum(path)
    try:
        data = path.read_bytes() if want is not None else None
    except OSError:
        return None
    return data if data is not None and _matches(path, hashlib.sha256(data).hexdigest(), want, None) else None


def write(path: Path, data: bytes, sha256: str | None = None) -> bool:
    """Write the entry (the data, then its checksum, `sha256` when the caller has it; each atomically). False when
    the cache cannot be written."""
    try:
        atomic_write(path, data)
        atomic_write(path.with_name(path.name + SUFFIX), (sha256 or hashlib.sha256(data).hexdigest()).encode())
        return True
    except OSError as e:
        _say(f"warning: the cache {path.parent} cannot be written ({e.strerror or type(e).__name__}): results are "
             f"computed again where they would have been read (set OLAF_CACHE to a writable folder)",
             f"write:{path.parent}")
        return False


def cached_bytes(path: Path, compute: Callable[[], bytes]) -> bytes:
    data = read(path)
    if data is None:
        data = compute()
        write(path, data)
    return data


def cached_array(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """An array from the cache, mmapped (the node's processes share its pages), or `compute()` (then kept). The
    file is checked against its checksum before it is mapped."""
    if valid(path):
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            pass
    arr = compute()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    if not write(path, buf.getvalue()):
        return arr
    return np.load(path, mmap_mode="r", allow_pickle=False)
