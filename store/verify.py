"""Checking a store against its records: sizes and sha256 of every file (streamed, never whole objects in
memory), Zarr chunk CRCs, Zarr == WebDataset sample by sample, orphan objects and damaged records."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from store import layout, tar
from store.codec import meta_of, raw_targets
from store.fs import Location
from store.identity import check_identity
from store.index import index_problems
from store.manifest import ShardRecord
from store.recovery import orphans


def check_files(loc: Location, record: ShardRecord | dict, full: bool = True, on_bytes=None) -> list[str]:
    """Problems with the files a record lists (a ShardRecord, or its `files` dict): missing, wrong size, or
    (full) wrong sha256. Empty if all good."""
    files = record.files if isinstance(record, ShardRecord) else record
    problems = []
    for name, info in files.items():
        size = loc.size(name)
        if info.get("absent"):
            if size is not None:
                problems.append(f"{name}: present but recorded as absent")
            continue
        if size is None:
            problems.append(f"{name}: missing")
        elif size != info["bytes"]:
            problems.append(f"{name}: {size} bytes, recorded {info['bytes']} (truncated or rewritten)")
        elif full and loc.sha256(name, on_bytes) != info["sha256"]:
            problems.append(f"{name}: sha256 mismatch (corrupted)")
    return problems


def check_tar_index(loc: Location, record: ShardRecord) -> list[str]:
    """Problems between a shard's record and what its tar holds: the samples' ids (the record's, the tar's keys
    and json members) and byte ranges, position by position. Empty if they agree."""
    name = layout.tar_name(record.shard)
    info = record.files.get(name)
    if info is None or info.get("absent"):
        return []
    held = tar.index(loc, name)
    problems = [] if len(held) == record.count else [f"{name}: holds {len(held)} samples, the record {record.count}"]
    ranges = info.get("samples")
    for pos, sample in enumerate(held[:record.count]):
        where = f"{name}: sample {record.start + pos}"
        if record.ids is not None and (sample["id"] != record.ids[pos] or
                                       sample["key"] != layout.tar_key(record.ids[pos])):
            problems.append(f"{where} is {sample['id']!r} in the tar, {record.ids[pos]!r} in the record")
        if ranges is not None and list(ranges[pos]) != sample["range"]:
            problems.append(f"{where} lies at {sample['range']} in the tar, at {list(ranges[pos])} by the record")
    return problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])


def agreement(store, shard: int, full: bool, spot: int) -> list[str]:
    """Stream the shard's tar once: every sample's key must follow Zarr's keys in order, and the samples at the
    checked positions (all with `full`) must hold exactly Zarr's bytes. Reading them from Zarr also checks
    their chunks' CRCs. Only one tar sample is in memory at a time."""
    rec = store.records[shard]
    start, n = rec.start, rec.count
    checked = set(range(n)) if full else {0, n - 1, *np.linspace(0, n - 1, min(spot, n)).astype(int).tolist()}
    keys = store.keys(shard)
    problems = []
    count = 0
    for pos, raw in enumerate(store.iter_raw(shard)):
        count += 1
        if pos >= n:
            continue
        if raw["__key__"] != layout.tar_key(keys[pos]):
            problems.append(f"sample {start + pos}: tar order has {raw['__key__']!r}, zarr keys {keys[pos]!r}")
        elif pos in checked:
            problems += _compare_sample(store, rec.tasks, start + pos, keys[pos], raw)
    if count != n:
        problems.append(f"tar has {count} samples, the shard {n}")
    return problems


def _compare_sample(store, tasks, index: int, key: str, raw: dict) -> list[str]:
    problems = []
    meta = meta_of(raw)
    for t in tasks:
        zvalid = store.valid(t, index)
        if zvalid != bool(meta["valid"].get(t)):
            problems.append(f"sample {key} {t}: valid is {zvalid} in zarr, {meta['valid'].get(t)} in the tar")
            continue
        if not zvalid:
            continue
        zv, zs = store.zarr_values(t, index)
        tv, ts = raw_targets(raw, store.manifest, t) or (None, None)
        if tv is None or zv.dtype != tv.dtype or zv.shape != tv.shape or not np.array_equal(zv.view(np.uint8),
                                                                                          tv.view(np.uint8)):
            problems.append(f"sample {key} {t}: zarr and tar values differ")
        if zs is not None and not np.array_equal(zs, ts):
            problems.append(f"sample {key} {t}: zarr and tar scales differ")
    return problems


def verify_store(store, full: bool = False, spot: int = 4, threads: int = 4, progress: bool = True) -> dict:
    """sha256 of every file every done shard lists, damaged records, orphan objects, and Zarr/WebDataset
    agreement (a few samples per shard, all with `full`). Returns {"ok", "bad_shards": {shard: [problems]},
    ...}."""
    from tqdm import tqdm

    shards = store.done_shards([])
    bad: dict[int, list[str]] = {i: [f"damaged record: {p}"] for i, p in store.damaged_records.items()}
    total = sum(info.get("bytes", 0) for i in shards for info in store.records[i].files.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify checksums", disable=not progress, leave=False)

    def check(i):
        problems = check_files(store.loc, store.records[i], full=True, on_bytes=bar.update)
        return i, problems or check_tar_index(store.loc, store.records[i])

    with ThreadPoolExecutor(threads) as pool:  # hashlib and object reads release the GIL
        for i, problems in pool.map(check, shards):
            if problems:
                bad[i] = problems
    bar.close()
    both = set(store.formats) == {"zarr", "wds"}
    if both:
        for i in tqdm(shards, desc="verify zarr == wds", disable=not progress, leave=False):
            if i in bad:
                continue
            try:
                problems = agreement(store, i, full, spot)
            except Exception as e:  # a CRC mismatch or an unreadable member
                problems = [f"cannot read: {type(e).__name__}: {e}"]
            if problems:
                bad[i] = problems
    store_problems = check_identity(store.loc, store.manifest.teachers, store.records).problems
    index_problems_, index_notes = index_problems(store.loc, store.manifest)
    store_problems += index_problems_
    return {"ok": not bad and not store_problems, "store_problems": store_problems,
            "bad_shards": {str(k): v for k, v in sorted(bad.items())}, "shards_checked": len(shards),
            "bytes_hashed": total, "agreement": ("all samples" if full else f"{spot} samples per shard") if both else "n/a",
            "orphans": orphans(store.loc, store.records), "shards_not_done": store.pending_shards([]),
            "notes": index_notes}
