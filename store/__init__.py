"""THE store format, as a package: the only code that knows it, and it imports nothing else of olaf (what it
records about the code and the teachers is handed in as data). The extraction writes through `StoreWriter`, the
trainer reads through `TargetStream`, the inspector through `Store` and `verify_store`; docs/format.md is the
contract for readers in other languages. A store is a local folder or any fsspec URL (s3://bucket/prefix, ...).

    layout      every name and path: objects, tar members, Zarr arrays, shard ranges
    fs          Location: one store root on one filesystem (local, shared, object storage); the atomic write
    cache       the node's caches (input listings, weight hashes, the order's arrays, a remote index), checked on read
    manifest    typed run manifest, task layouts, shard records
    identity    teachers.yaml: the teacher identity, and the rule readers compare it by
    encodings   how target values are stored (fp16, bf16, fp8)
    codec       one sample's targets to and from tar members
    tar         the WebDataset tars: written deterministically, read whole, by shard or by byte range
    zarr_io     the Zarr arrays: created, one shard's objects written and hashed, opened to read
    lease       one job per shard
    recovery    what a crash left, and removing it
    writer      StoreWriter: create / open / existing, redo, write, commit (exactly once)
    reader      Store: what is there, `require`, random access by key or index
    verify      checksums, CRCs, Zarr == WebDataset, orphans
    order       the global training order: a pure function of (seed, epoch), whatever the world size
    stream      TargetStream: the trainer's IterableDataset (this rank's micro-batches, O(1) resume), loader
    index       the sample index: the records' per-sample columns as mmapped arrays, what the trainer starts from
"""

from store import encodings
from store.fs import (
    Location,
    StoreError,
    atomic_path,
    atomic_write,
    cache_root,
    enclosing_store,
    is_url,
    refuse_inside_store,
)
from store.identity import teacher_mismatches, weights_mismatches
from store.index import StoreIndex, load_index
from store.layout import COMPRESSIONS, FORMATS, MANIFEST, TOKEN_ORDER, num_shards, shard_range
from store.lease import LEASE_TTL, Leases, lease_owner
from store.manifest import RunManifest, ShardRecord, TaskLayout, now, read_manifest, read_records
from store.order import GlobalOrder, SampleTable
from store.reader import Store, committed_images
from store.recovery import orphans
from store.tar import member_sizes
from store.verify import check_files, verify_store
from store.writer import SampleResult, ShardResult, StoreExists, StoreWriter, check_writable


def __getattr__(name: str):
    """The trainer's stream needs torch; the rest of the store does not (extraction's decode and writer workers
    start faster without it), so the stream is imported when it is asked for."""
    if name in ("TargetStream", "loader"):
        from store import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")


__all__ = [
    "COMPRESSIONS", "FORMATS", "LEASE_TTL", "MANIFEST", "TOKEN_ORDER", "GlobalOrder", "Leases", "Location", "RunManifest",
    "SampleResult", "SampleTable", "StoreIndex", "load_index", "ShardRecord", "ShardResult", "Store", "StoreError", "StoreExists", "StoreWriter", "TargetStream",
    "TaskLayout", "atomic_path", "atomic_write", "cache_root", "check_files", "enclosing_store", "check_writable", "committed_images", "encodings", "is_url", "lease_owner", "loader", "member_sizes", "now",
    "num_shards", "orphans", "read_manifest", "read_records", "refuse_inside_store", "shard_range", "teacher_mismatches", "verify_store", "weights_mismatches",
]
