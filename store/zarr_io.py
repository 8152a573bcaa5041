"""The store's Zarr v3 arrays: creating them, writing one extraction shard's objects (built in one buffer,
byte-identical to zarr-python's own), hashing every object as it goes out, and opening the group to read."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from store import layout
from store.fs import Location, StoreError
from store.manifest import RunManifest


def _codecs(compression: str):
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=3), Crc32cCodec()] if compression == "zstd" else [Crc32cCodec()]


def open_group(loc: Location, mode: str, hashes: dict | None = None):
    """The store's Zarr group. With `hashes` (a dict), every object written through it is hashed on its way
    out -- {key: {"bytes", "sha256"}} -- so a commit need not read its objects back (a download on S3)."""
    import zarr

    zstore = loc.zarr_store(layout.ZARR, read_only=mode == "r")
    if hashes is not None:
        zstore = _hashing_store(zstore, hashes)
    return zarr.open_group(zstore, mode=mode, zarr_format=3)


def _hashing_store(inner, hashes: dict):
    from zarr.storage import WrapperStore

    class HashingStore(WrapperStore):
        async def set(self, key, value):
            data = value.as_numpy_array()
            hashes[key] = {"bytes": int(data.nbytes), "sha256": hashlib.sha256(memoryview(data)).hexdigest()}
            await self._store.set(key, value)

        async def set_partial_values(self, key_start_values):  # not whole objects: hash them from the store
            for key, _, _ in key_start_values:
                hashes.pop(key, None)
            await self._store.set_partial_values(key_start_values)

        def _with_store(self, store):
            return type(self)(store)

    return HashingStore(inner)


def create_arrays(loc: Location, m: RunManifest) -> None:
    """Create the group and every array the manifest's tasks need (idempotent). The store's writer does it before
    any shard is written: shard writers write chunk/shard objects, never metadata."""
    if "zarr" not in m.formats:
        return
    n, s = m.num_samples, m.shard_size
    g = open_group(loc, "a")
    g.attrs.update({"format": layout.FORMAT, "tasks": list(m.tasks), "token_order": m.token_order})
    cfg = {"write_empty_chunks": True}
    crc = _codecs("none")
    if layout.KEYS not in g:
        g.create_array(layout.KEYS, shape=(n,), chunks=(s,), dtype=str, compressors=crc, config=cfg)
    valid = g.require_group(layout.VALID)
    for task, lay in m.tasks.items():
        t, w = lay.shape
        if task not in g:
            g.create_array(task, shape=(n, t, w), chunks=(1, t, w), shards=(s, t, w), dtype=lay.values_dtype,
                           fill_value=0, compressors=_codecs(m.zarr_compression), config=cfg,
                           attributes={"encoding": lay.encoding, "grid": list(lay.grid) if lay.grid else None})
        if lay.scaled and layout.scale_array(task) not in g:
            g.create_array(layout.scale_array(task), shape=(n, t), chunks=(1, t), shards=(s, t), dtype="float32",
                           fill_value=0, compressors=_codecs(m.zarr_compression), config=cfg)
        if task not in valid:
            valid.create_array(task, shape=(n,), chunks=(s,), dtype="uint8", fill_value=0, compressors=crc, config=cfg)


MAX_UINT64 = 2**64 - 1  # the sharding index's mark of a chunk that is not in the shard


def plain_sharding(arr) -> bool:
    """Whether `arr` is laid out as create_arrays makes uncompressed target arrays: shards of whole rows, chunks
    of one row, chunk and index codecs [bytes (little-endian), crc32c], the index at the end."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    def plain(codecs) -> bool:
        return (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)
                and getattr(codecs[0].endian, "value", "little") == "little")

    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sc = codecs[0]
    return (plain(sc.codecs) and plain(sc.index_codecs) and sc.index_location.value == "end"
            and tuple(sc.chunk_shape) == (1, *arr.shape[1:]))


def shard_object(arr, shard: int, values: np.ndarray) -> bytearray | None:
    """The bytes of one Zarr shard object of a `plain_sharding` array holding rows `values` (the shard's rows,
    fewer in the store's last shard): byte for byte what zarr-python writes for `arr[rows] = values`
    (tests/test_store.py compares them), built in one buffer with one copy of the data instead of zarr's
    per-chunk buffers, checksum appends and final concatenation (~2x the CPU of the write itself at real
    target sizes, `benchmarks/extract.py --shape-true`). None: every row is the fill (no object at all)."""
    import google_crc32c

    rows_per_shard = arr.metadata.chunk_grid.chunk_shape[0]
    src = np.ascontiguousarray(values, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    n = src.shape[0]
    if n > rows_per_shard or src.shape[1:] != arr.shape[1:] or n != min(rows_per_shard, arr.shape[0] - shard * rows_per_shard):
        raise StoreError(f"shard {shard}: {src.shape} rows do not fill the shard of {arr.shape} in {rows_per_shard}s")
    raw = src.reshape(n, -1).view(np.uint8)
    kept = np.flatnonzero(raw.any(axis=1))  # like zarr, a row whose bits are all zero (the fill) is not stored
    if len(kept) == 0:
        return None
    chunk = raw.shape[1] + 4  # the row and its crc32c
    index = np.full((rows_per_shard, *(1,) * (arr.ndim - 1), 2), MAX_UINT64, dtype="<u8")
    out = bytearray(len(kept) * chunk + index.nbytes + 4)
    body = np.frombuffer(out, dtype=np.uint8, count=len(kept) * chunk).reshape(len(kept), chunk)
    body[:, :-4] = raw[kept]
    crcs = np.array([google_crc32c.value(raw[i]) for i in kept], dtype="<u4")
    body[:, -4:] = crcs.view(np.uint8).reshape(-1, 4)
    flat = index.reshape(rows_per_shard, 2)
    flat[kept, 0] = np.arange(len(kept), dtype=np.uint64) * chunk
    flat[kept, 1] = chunk
    tail = index.tobytes()
    out[len(kept) * chunk:] = tail + np.array([google_crc32c.value(tail)], dtype="<u4").tobytes()
    return out


def _object_name(arr, name: str, shard: int) -> str:
    return f"{layout.ZARR}/{name}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"


def _write_rows(loc: Location, g, name: str, start: int, stop: int, values: np.ndarray, shard: int,
                written: dict) -> None:
    """g[name][start:stop] = values, through `shard_object` when the array is plainly sharded (hashing the object
    as it goes out), else through zarr (whose hashing store records the hash)."""
    arr = g[name]
    if not plain_sharding(arr):
        arr[start:stop] = values
        return
    rel = _object_name(arr, name, shard)
    data = shard_object(arr, shard, values)
    if data is None:  # every row is fill: no object, as zarr leaves none (the record says "absent")
        loc.remove(rel)
        return
    loc.write_bytes(rel, data)
    written[rel[len(layout.ZARR) + 1:]] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def shard_objects(g, m: RunManifest, tasks: Iterable[str], shard: int, with_keys: bool = True) -> list[str]:
    """Names (relative to the store) of the one Zarr object per array that holds extraction shard `shard`."""
    names = ([layout.KEYS] if with_keys else []) + [a for t in tasks for a in layout.task_arrays(t, m.tasks[t].scaled)]
    return [_object_name(g[name], name, shard) for name in names]


def write_shard(loc: Location, m: RunManifest, result, tasks_kept: list[str]) -> dict[str, dict]:
    """One shard's Zarr objects for the tasks `result` computed (rows aligned with its samples); returns
    {name: {"bytes", "sha256"} or {"absent": True}} for every object of the shard, the tasks kept from an
    earlier pass included (hashed from the store: they are not rewritten)."""
    i = result.shard
    start, stop = m.shard_range(i)
    written: dict[str, dict] = {}
    g = open_group(loc, "r+", hashes=written)
    # always (re)written: the same bytes each time, and a shard being redone may have a damaged keys chunk
    g[layout.KEYS][start:stop] = np.array([s.id for s in result.samples], dtype=object)
    for t in result.tasks:
        _write_rows(loc, g, t, start, stop, result.values[t], i, written)
        if m.tasks[t].scaled:
            _write_rows(loc, g, layout.scale_array(t), start, stop, result.scales[t], i, written)
        g[layout.valid_array(t)][start:stop] = result.valid[t].astype(np.uint8)
    files = {}
    all_tasks = [t for t in m.tasks if t in tasks_kept or t in result.tasks]
    for name in shard_objects(g, m, all_tasks, i):
        key = name[len(layout.ZARR) + 1:]
        if key in written:  # hashed as it was written
            files[name] = written[key]
            continue
        size = loc.size(name)  # an earlier pass's object (a task kept), or an empty one
        files[name] = {"bytes": size, "sha256": loc.sha256(name)} if size is not None else {"absent": True}
    return files
