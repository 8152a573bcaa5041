"""Where a store lives: a local folder, a shared filesystem or an object-storage prefix (any fsspec URL:
s3://bucket/prefix, gs://bucket/prefix, ...). The store package does all its I/O through `Location`, so every
job works on every backend.

Credentials and endpoints come from the usual places, never from olaf's files: for S3 and S3-compatible
servers (MinIO, SeaweedFS, R2, ...) AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL /
AWS_DEFAULT_REGION or ~/.aws, for GCS the application-default credentials, or fsspec's own config
(FSSPEC_S3_ENDPOINT_URL=..., ~/.config/fsspec/*.json).

Writes: a local file is written to a temporary name and renamed (atomic on POSIX); an object is uploaded whole
under its final name (a PUT, or s3fs's multipart upload for large files, which becomes visible only when it
completes), so a reader never sees half an object on either backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from store import layout

CHUNK = 8 << 20  # bytes per read when hashing or streaming


def temp_name(rel: str) -> str:
    """Where a local write of `rel` goes until it is complete: a hidden name beside it."""
    head, _, base = rel.rpartition("/")
    return f"{head + '/' if head else ''}.{base}.tmp-{uuid.uuid4().hex[:8]}"


def final_name(rel: str) -> str:
    """The name a (possibly temporary) file will have once complete: `temp_name`'s inverse."""
    head, _, base = rel.rpartition("/")
    if base.startswith(".") and ".tmp-" in base:
        base = base[1:].rsplit(".tmp-", 1)[0]
    return f"{head + '/' if head else ''}{base}"


@contextlib.contextmanager
def atomic_path(final) -> Iterator[str]:
    """olaf's one temp-write-then-commit on a local filesystem: a temporary path beside `final` (`temp_name`) to
    write a file or build a folder at; when the block exits normally a file is fsynced and the path is renamed
    onto `final` (replacing what was there), otherwise it is removed. Store objects, checkpoints, exports and
    dataset files are all written through it, so a crash never leaves half of one under its final name."""
    final = os.path.abspath(os.fspath(final))
    tmp = temp_name(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if os.path.isdir(tmp) and os.path.isdir(final):
            shutil.rmtree(final)  # a rename cannot replace a folder that is not empty
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)


def file_sha256(path) -> str:
    """sha256 of a local file, streamed in CHUNK reads (never whole in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def atomic_write(path, data: bytes) -> None:
    """`data` under `path`, whole or not at all (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


_INHERITED: list = []  # filesystems a forked child inherited from its parent


class StoreError(Exception):
    """Something about a store is wrong or does not match what the caller expects; the message says what."""


def cache_root() -> Path:
    """This machine's cache for what readers derive from a store (a remote store's index files, the training
    order's arrays), shared by the processes of a node: $OLAF_CACHE, else $XDG_CACHE_HOME/olaf or ~/.cache/olaf."""
    explicit = os.environ.get("OLAF_CACHE")
    return Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olaf"


def enclosing_store(path) -> str | None:
    """The local store `path` is or lies in (the nearest folder, links resolved, that holds a store manifest), or
    None; URLs are not looked into."""
    if is_url(path):
        return None
    p = Path(path).resolve()
    return next((str(d) for d in (p, *p.parents) if (d / layout.MANIFEST).is_file()), None)


def refuse_inside_store(path, what: str) -> None:
    """StoreError when a command's output `path` would land in a store: only the store's writer writes there."""
    root = enclosing_store(path)
    if root is not None:
        raise StoreError(f"{what} {path} lies inside the olaf store {root}; nothing but the extraction writes in a "
                         f"store (another file there can destroy it): choose a path outside it")


def _fsspec():
    import fsspec

    return fsspec


def explain(e: BaseException, url: str) -> StoreError | None:
    """The one line a user needs for a storage error that is about access, not about the store: credentials
    missing or refused, an endpoint that does not answer; None for anything else."""
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "DefaultCredentialsError"):
        return StoreError(f"{url}: no credentials for the bucket: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          f"(or AWS_PROFILE; on a cloud node its instance role; for GCS, application-default "
                          f"credentials)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError") or isinstance(e, ConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or "the default"
        return StoreError(f"{url}: cannot reach the storage endpoint ({endpoint}): check AWS_ENDPOINT_URL (or "
                          f"FSSPEC_S3_ENDPOINT_URL) and that the server runs")
    if isinstance(e, PermissionError):
        return StoreError(f"{url}: the bucket refuses this identity ({str(e).strip() or 'Forbidden'}): check "
                          f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a wrong secret reads as Forbidden), and "
                          f"that it may read (to extract: write) this prefix")
    return None


class _Explained:
    """A remote filesystem whose access errors (explain) come as one StoreError line, not a botocore traceback."""

    def __init__(self, fs, url: str):
        self._fs, self._url = fs, url

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                better = explain(e, self._url)
                if better is None:
                    raise
                raise better from None

        return call


def is_url(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class Location:
    """The root of a store on one filesystem. `rel` names are '/'-separated, relative to the root."""

    def __init__(self, url):
        url = str(url)
        if is_url(url):
            protocol = url.split("://", 1)[0]
            try:
                # no listings cache: other processes (writers, a resumed job) change the store under us
                self._fs, root = _fsspec().core.url_to_fs(url, use_listings_cache=False)
            except ImportError as e:
                raise StoreError(f"{url}: the {protocol}:// backend needs an extra package ({e}); install "
                                 f"olaf[cloud] (s3fs, gcsfs)") from None
            except ValueError as e:
                raise StoreError(f"{url}: {e}") from None
            self.root = root.rstrip("/")
            self.url = f"{protocol}://{self.root}"
            self.local = False
        else:
            from fsspec.implementations.local import LocalFileSystem

            path = os.path.abspath(url.removeprefix("file://"))
            self._fs, self.root, self.url, self.local = LocalFileSystem(), path, path, True
        self._pid = os.getpid()

    @property
    def fs(self):
        """The fsspec filesystem; built anew in a forked child (a DataLoader worker), where the parent's async
        client (s3fs, gcsfs) must not be used."""
        if self._pid != os.getpid():
            if not self.local:
                _INHERITED.append(self._fs)  # kept, unused: its cleanup would run on the parent's event loop
                self._fs = _fsspec().core.url_to_fs(self.url, use_listings_cache=False)[0]
            self._pid = os.getpid()
        return self._fs if self.local else _Explained(self._fs, self.url)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):  # Ray and DataLoader workers rebuild the filesystem from the URL (and the environment)
        return (Location, (self.url,))

    # -- names
    def path(self, rel: str = "") -> str:
        """The filesystem path of `rel` (what `self.fs` takes)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # -- reading
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def isfile(self, rel: str) -> bool:
        return self.fs.isfile(self.path(rel))

    def size(self, rel: str) -> int | None:
        """Bytes of a file, or None when it is not there."""
        try:
            info = self.fs.info(self.path(rel))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=stop)

    def read_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """Several byte ranges [(rel, start, stop)] in one call: concurrent GETs on object storage (s3fs, gcsfs),
        seeks on a local disk."""
        if not ranges:
            return []
        out = self.fs.cat_ranges([self.path(r) for r, _, _ in ranges], [a for _, a, _ in ranges],
                                 [b for _, _, b in ranges], on_error="raise")
        for (rel, a, b), data in zip(ranges, out, strict=True):
            if len(data) != b - a:
                raise StoreError(f"{self.url_of(rel)}: asked for bytes {a}..{b}, got {len(data)}: the object is "
                                 f"shorter than its record says; run `python -m pipeline.inspect {self.url} verify`")
        return out

    def read_many(self, rels: list[str]) -> dict[str, bytes | None]:
        """Whole small objects at once (concurrently on object storage); None for one that is not there."""
        if not rels:
            return {}
        paths = {self.path(r): r for r in rels}
        got = self.fs.cat(list(paths), on_error="return")
        out = {}
        for p, r in paths.items():
            data = got.get(p, got.get(self.fs._strip_protocol(p)))
            out[r] = None if data is None or isinstance(data, FileNotFoundError) else data
            if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                raise explain(data, self.url) or data
        return out

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def sha256(self, rel: str, on_bytes=None) -> str:
        """sha256 of a file on this location's filesystem, streamed in CHUNK reads (never the whole object in
        memory)."""
        h = hashlib.sha256()
        with self.open(rel) as f:
            while b := f.read(CHUNK):
                h.update(b)
                if on_bytes is not None:
                    on_bytes(len(b))
        return h.hexdigest()

    def list(self, rel_dir: str) -> list[str]:
        """Names (relative to the root) of the files directly inside `rel_dir`, sorted; [] when there is none."""
        return sorted(self.sizes(rel_dir))

    def sizes(self, rel_dir: str) -> dict[str, int]:
        """{name relative to the root: bytes} of the files directly inside `rel_dir` (one listing: on object
        storage a request per 1000 names, not one per file)."""
        try:
            entries = self.fs.ls(self.path(rel_dir), detail=True)
        except FileNotFoundError:
            return {}
        inside = self.path(rel_dir).rstrip("/") + "/"
        out = {}
        for e in entries:
            name = e["name"].rstrip("/")
            # some S3 servers list a folder marker ("shards/") as an empty object of its own: not a file in it
            if e.get("type") == "file" and name.startswith(inside) and name != inside.rstrip("/"):
                out[name[len(self.root) + 1:]] = int(e.get("size") or 0)
        return out

    def du(self, rel: str = "") -> int:
        """Bytes of every file under `rel`."""
        try:
            return int(sum(v.get("size", 0) for v in self.fs.find(self.path(rel), detail=True).values()))
        except FileNotFoundError:
            return 0

    def is_empty_or_absent(self) -> bool:
        if not self.exists():
            return True
        try:
            return not self.fs.ls(self.path(), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return True

    # -- writing
    def makedirs(self, rel: str = "") -> None:
        if self.local:  # object stores have no folders
            os.makedirs(self.path(rel), exist_ok=True)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator:
        """A file to write `rel` through; it appears under its name, whole, only if the block exits normally.
        Local: a temporary name in the same folder, fsync, rename. Object storage: a streamed (multipart)
        upload that is aborted on error, so memory stays bounded by one part whatever the file's size."""
        if self.local:
            with atomic_path(self.path(rel)) as tmp, open(tmp, "wb") as f:
                yield f
            return
        f = self.fs.open(self.path(rel), "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True  # nothing left to flush: the upload is aborted
            raise
        f.close()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as f:
            f.write(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist yet (a conditional create); False when it already exists.
        Local: a hard link of a complete temporary file. S3: PUT with If-None-Match (s3fs mode 'xb'). A
        backend that has neither falls back to a check then a PUT (not atomic: see docs/format.md)."""
        if self.local:
            final, tmp = self.path(rel), self.path(temp_name(rel))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError:  # no hard links here: a rename that may replace (documented)
                if os.path.exists(final):
                    return False
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return True
        try:
            with self.fs.open(self.path(rel), "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no conditional writes in this backend
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True
        except OSError as e:
            if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                return False
            raise

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    # -- zarr
    def zarr_store(self, rel: str, read_only: bool):
        """A zarr-python 3 store for the group at `rel`: LocalStore on a local path, FsspecStore elsewhere."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.path(rel), read_only=read_only)
        return FsspecStore.from_url(self.url_of(rel), read_only=read_only)
