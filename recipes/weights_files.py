"""The content of a teacher's weight files, as one sha256, without loading a model: what lets a trainer, which
never loads a teacher, tell whether a store's targets came from the weights its manifest names (a path that
points at other files, or a repo whose snapshot changed, is not the same teacher).

The files are the checkpoint's weight files (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`) in the reference's
folder (a local path, or the HF cache's snapshot of the repo, never a download), with their names. Hashing a
real teacher reads gigabytes, so each file's sha256 is kept in the node's cache (store.cache, checked on read)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from recipes.manifest import WeightsRef
from store import cache
from store.fs import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def folder_of(ref: WeightsRef) -> Path | None:
    """Where the reference's weight files are on this machine, or None (not downloaded, not there)."""
    if ref.path:
        folder = Path(ref.path) / (ref.subfolder or "")
        return folder if folder.is_dir() else None
    try:
        from huggingface_hub import snapshot_download

        pattern = f"{ref.subfolder}/*" if ref.subfolder else "*"
        root = snapshot_download(ref.repo_id, revision=ref.revision or "main", allow_patterns=[pattern],
                                 local_files_only=True)
    except Exception:  # not in the cache (or no hub client): nothing to compare
        return None
    folder = Path(root) / (ref.subfolder or "")
    return folder if folder.is_dir() else None


def _file_sha256(path: Path) -> str:
    """The file's sha256, from the node's cache when the same file (path, inode, size, modification and change
    times: a rewrite that restores the mtime still changes the ctime) was hashed before."""
    st = path.stat()
    key = (path.resolve(), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return cache.cached_bytes(cache.entry("weights_files", *key), lambda: file_sha256(path).encode()).decode()


def files_sha256(ref: WeightsRef) -> str | None:
    """sha256 over (name, content sha256) of the reference's weight files, or None when they are not here."""
    folder = folder_of(ref)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) if folder else []
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}|{_file_sha256(p)}\n".encode())
    return h.hexdigest()


def manifest_files_sha256(manifest, tasks) -> dict[str, str]:
    """{task: files_sha256} for the tasks whose weights are on this machine."""
    out = {t: files_sha256(manifest.teachers[t].weights) for t in tasks}
    return {t: v for t, v in out.items() if v is not None}
