"""After a crash: what an interrupted write left behind (objects no record accounts for, temporary files), and
removing it. A shard another job holds the lease of is that job's write in progress, never an orphan."""

from __future__ import annotations

import os

from store import layout
from store.fs import Location, final_name
from store.lease import Leases
from store.manifest import ShardRecord, read_records


def _zarr_temporaries(loc: Location) -> list[tuple[str, int | None]]:
    """Half-written Zarr objects of a local store killed mid-write (ours: `.<key>.tmp-*`, zarr-python's:
    `*.partial`), with the extraction shard each belongs to. Object storage has none: an upload appears whole."""
    if not loc.local:
        return []
    found = []
    for folder, _, files in os.walk(loc.path(layout.ZARR)):
        for f in files:
            if not ((f.startswith(".") and ".tmp-" in f) or f.endswith(".partial")):
                continue
            name = os.path.relpath(os.path.join(folder, f), loc.path("")).replace(os.sep, "/")
            parts = name.split("/")  # targets.zarr/<array path>/c/<shard>/...: the first coordinate is the shard
            coord = parts[parts.index("c", 2) + 1] if "c" in parts[2:-1] else ""
            found.append((name, int(coord) if coord.isdigit() else None))
    return sorted(found)


def orphans(loc: Location, records: dict[int, ShardRecord] | None = None, leases: Leases | None = None) -> list[str]:
    """Data objects no record accounts for: left by a crash between the data writes and the commit (a redo
    overwrites them), or temporary files of an interrupted local write."""
    records = read_records(loc) if records is None else records
    leases = leases or Leases(loc)
    listed = {name for r in records.values() for name in r.files}

    def free(shard: int | None) -> bool:  # not another job's shard, in flight
        return shard is None or leases.holder(shard) is None

    out = [n for n in loc.list(layout.WDS) if n not in listed and free(layout.shard_of_tar(final_name(n)))]
    out += [n for n in loc.list(layout.SHARDS) if layout.shard_of_record(n) is None and not layout.is_lease(n)]
    out += [n for n, shard in _zarr_temporaries(loc) if free(shard)]
    return out


def recover(loc: Location) -> list[str]:
    """Remove what an interrupted write left (temporary files, objects of uncommitted tars); returns what it did.
    Run by the extraction before work starts, never while its writers run."""
    actions = []
    for name in orphans(loc):
        loc.remove(name)
        actions.append(f"{name}: removed (left by an interrupted write)")
    return actions
