"""The node's caches (store.cache): an input's listing, a weight file's sha256, a remote store's index copies (the
order's arrays: tests/test_order.py). Each is checked on read against the checksum written with it, and an input's
by its content, so neither a flipped bit nor an input rewritten under the same size and mtime is read as data
(reliability, round five)."""

from __future__ import annotations

import os
import tarfile
import uuid
from pathlib import Path

import numpy as np
from test_inputs import write_listing, write_tars

import store
from pipeline.extract.plan import make_plan
from pipeline.inputs import read_blob
from store import cache


def _rewrite_keeping_size_and_mtime(path: Path, at: int, data: bytes) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_tar_rewritten_under_the_same_size_and_mtime_is_listed_again(tmp_path, sample_dataset):
    paths, _ = write_tars(sample_dataset, tmp_path / "wds")
    pattern = str(tmp_path / "wds" / f"{{00000..{len(paths) - 1:05d}}}.tar")
    before = make_plan(pattern, None, 5)
    assert make_plan(pattern, None, 5).source.dataset_info()["sha256"] == before.source.dataset_info()["sha256"]  # the cache answers
    with tarfile.open(paths[0]) as tf:
        jpg = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    _rewrite_keeping_size_and_mtime(paths[0], jpg.offset_data + 100, b"\x5a" * 16)
    after = make_plan(pattern, None, 5)
    assert after.source.dataset_info()["sha256"] != before.source.dataset_info()["sha256"]
    assert after.source.dataset_info()["shards"][0]["sha256"] == store.Location(paths[0].parent).sha256(paths[0].name)
    rec = next(r for r in after.shard_records(0) if r.at and r.at[2] == jpg.offset_data)
    assert read_blob(rec.at) == paths[0].read_bytes()[jpg.offset_data:jpg.offset_data + jpg.size]


def test_a_jsonl_listing_rewritten_under_the_same_size_and_mtime_is_planned_again(tmp_path, sample_dataset):
    images = sample_dataset[1]
    listing, _ = write_listing(sample_dataset, tmp_path / "listing.jsonl")
    before = make_plan(str(listing), images, 6)
    text = listing.read_bytes()
    at = text.index(b'"id": "') + len(b'"id": "')
    _rewrite_keeping_size_and_mtime(listing, at, b"Z")  # another id, same length
    after = make_plan(str(listing), images, 6)
    assert after.source.dataset_info()["sha256"] != before.source.dataset_info()["sha256"]
    assert after.shard_records(0)[0].id.startswith("Z")


def test_a_damaged_cache_entry_is_computed_again(tmp_path, capfd):
    calls = []

    def compute():
        calls.append(1)
        return b"the value"

    entry = cache.entry("test", tmp_path, uuid.uuid4().hex)
    assert cache.cached_bytes(entry, compute) == b"the value" and cache.cached_bytes(entry, compute) == b"the value"
    assert len(calls) == 1
    entry.write_bytes(b"the valuf")  # a flipped bit
    assert cache.cached_bytes(entry, compute) == b"the value" and len(calls) == 2
    assert "does not match its checksum" in capfd.readouterr().err
    entry.write_bytes(b"the v")  # cut short
    assert cache.cached_bytes(entry, compute) == b"the value" and len(calls) == 3
    entry.with_name(entry.name + cache.SUFFIX).unlink()  # no checksum: not trusted
    assert cache.cached_bytes(entry, compute) == b"the value" and len(calls) == 4


def test_a_weight_file_hash_in_a_damaged_cache_is_computed_again(tmp_path, tiny_teachers, monkeypatch):
    import hashlib

    from recipes.manifest import load_manifest
    from recipes.weights_files import files_sha256, folder_of

    monkeypatch.setenv("OLAF_CACHE", str(tmp_path / "cache"))
    ref = load_manifest(tiny_teachers).teachers["depth"].weights
    files = sorted(p for p in folder_of(ref).iterdir() if p.suffix in (".safetensors", ".bin"))
    want = hashlib.sha256("".join(f"{p.name}|{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                                  for p in files).encode()).hexdigest()
    assert files_sha256(ref) == want
    (entry,) = [p for p in (tmp_path / "cache" / "weights_files").iterdir() if not p.name.endswith(cache.SUFFIX)]
    data = bytearray(entry.read_bytes())
    data[0] = ord("0") if data[0] != ord("0") else ord("1")
    entry.write_bytes(bytes(data))
    assert files_sha256(ref) == want


def test_a_damaged_copy_of_a_remote_index_is_fetched_again(seaweedfs, monkeypatch, tmp_path):
    from test_order import make_store

    monkeypatch.setenv("OLAF_CACHE", str(tmp_path / "cache"))
    url = make_store(f"s3://{seaweedfs.bucket}/cached-index-{uuid.uuid4().hex[:8]}")
    w = store.StoreWriter.open(url)
    w.build_index()
    index, _ = store.load_index(w.loc)
    offsets = np.array(index.columns["offset"])
    (copy,) = (tmp_path / "cache" / "index").glob("*/index/offset.npy")
    data = bytearray(copy.read_bytes())
    data[-3] ^= 0x10
    copy.write_bytes(bytes(data))
    index, _ = store.load_index(w.loc)
    assert np.array_equal(np.array(index.columns["offset"]), offsets)
