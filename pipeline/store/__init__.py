"""THE store format, as a package: the only code that knows it. Extraction writes through `writer`, the trainer
reads through `stream`, the inspector through `reader` and `verify`; docs/format.md is the contract for readers
in other languages. A store is a local folder or any fsspec URL (s3://bucket/prefix, gs://...).

    layout     every name and path: objects, tar members, Zarr arrays, shard ranges
    fs         Location: one store root on one filesystem (local, shared, object storage)
    manifest   typed run manifest, task layouts, shard records, teacher identity
    codec      one sample's targets to and from tar members / Zarr rows
    writer     open or resume a store, write a shard, commit its record exactly once, recover
    reader     Store: what is there, `require`, random access by key or index
    verify     checksums, CRCs, Zarr == WebDataset, orphans
    order      the global training order: a pure function of (seed, epoch), whatever the world size
    stream     TargetStream: the trainer's IterableDataset (this rank's micro-batches, O(1) resume), loader
"""

from pipeline.store.fs import Location, StoreError, is_url
from pipeline.store.layout import COMPRESSIONS, FORMATS
from pipeline.store.manifest import (
    RunManifest,
    ShardRecord,
    TaskLayout,
    code_version,
    now,
    read_manifest,
    read_record,
    read_records,
    read_teachers,
    teacher_mismatches,
    write_manifest,
    write_teachers,
)
from pipeline.store.order import GlobalOrder, SampleTable
from pipeline.store.reader import Store
from pipeline.store.stream import TargetStream, loader
from pipeline.store.verify import check_files, verify_store
from pipeline.store.writer import (
    LEASE_TTL,
    SampleResult,
    ShardResult,
    begin_redo,
    commit_record,
    commit_shard,
    ensure_zarr,
    existing_manifest,
    lease_holder,
    lease_owner,
    orphans,
    rebuild_errors,
    recover,
    release_lease,
    renew_lease,
    resume_problems,
    take_lease,
    write_shard,
)

__all__ = [
    "COMPRESSIONS", "FORMATS", "GlobalOrder", "LEASE_TTL", "Location", "RunManifest", "SampleTable", "SampleResult", "ShardRecord", "ShardResult",
    "Store", "StoreError", "TargetStream", "TaskLayout", "begin_redo", "check_files", "code_version", "commit_record",
    "commit_shard", "ensure_zarr", "existing_manifest", "is_url", "lease_holder", "lease_owner", "now", "orphans", "read_manifest",
    "read_record", "read_records", "read_teachers", "rebuild_errors", "recover", "release_lease", "renew_lease",
    "resume_problems", "take_lease", "loader", "teacher_mismatches", "verify_store", "write_manifest", "write_shard",
    "write_teachers",
]
