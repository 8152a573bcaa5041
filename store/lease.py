"""Leases: while a job computes a shard it holds `shards/NNNNNN.lease` ({"owner", "expires"}), so that two jobs on
one store never compute a shard twice (docs/format.md, "Leases"). Created with the same conditional create as
records; an expired lease, or one whose owner is a dead process on this host, holds nothing.

Time comes from `clock` (default `time.time`), so tests decide when a lease lapses instead of waiting for it."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable

from store import layout
from store.fs import Location, StoreError

LEASE_TTL = 120.0  # seconds a lease holds without renewal; holders renew every TTL / 4


def lease_owner() -> str:
    """This job's lease owner id: host, pid and a random run id."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
    """A lease of a process on this host that no longer runs (a driver killed with -9) is stale at once; on other
    hosts only its expiry tells."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _parse(data: bytes) -> dict | None:
    """A lease object's {"owner": str, "expires": float}, or None when it is damaged (not JSON, a field missing or
    of another type): a damaged lease holds nothing, as a lapsed one."""
    try:
        d = json.loads(data)
        lease = {"owner": str(d["owner"]), "expires": float(d["expires"])}
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None
    return lease if 0 <= lease["expires"] < 1e11 else None  # a time no clock reaches (year 5138 on) is damage


def _holder(loc: Location, name: str, now: float) -> dict | None:
    """The live lease object `name` ({"owner", "expires"}), or None: absent, damaged, lapsed, or its owner a dead
    process on this host."""
    try:
        d = _parse(loc.read_bytes(name))
    except FileNotFoundError:
        return None
    return None if d is None or d["expires"] <= now or _owner_is_dead(d["owner"]) else d


def _take(loc: Location, name: str, owner: str, body: bytes, now: float) -> bool:
    """Create the lease object `name` exclusively; one that holds nothing (`_holder`) is broken first and raced for
    like anyone else. True when `owner` holds it."""
    if loc.create_exclusive(name, body):
        return True
    held = _holder(loc, name, now)
    if held is not None:
        return held["owner"] == owner
    loc.remove(name)
    return loc.create_exclusive(name, body)


def _release(loc: Location, name: str, owner: str, now: float) -> None:
    """Remove the lease object `name` unless another owner's live one holds it."""
    held = _holder(loc, name, now)
    if held is None or held["owner"] == owner:
        loc.remove(name)


class Leases:
    """One job's leases on one store. `held` are the shards this job holds."""

    def __init__(self, loc: Location, owner: str | None = None, ttl: float = LEASE_TTL,
                 clock: Callable[[], float] = time.time):
        self.loc, self.owner, self.ttl, self.clock = loc, owner or lease_owner(), ttl, clock
        self.held: set[int] = set()
        self._renewed = clock()

    def all(self) -> dict[int, dict]:
        """Every lease object of the store: {shard: {"owner", "expires", "live", "damaged"}} ("live": it still
        holds; a damaged one never does)."""
        out = {}
        for name in self.loc.list(layout.SHARDS):
            shard = layout.shard_of_lease(name)
            if shard is None:
                continue
            try:
                lease = _parse(self.loc.read_bytes(name))
            except FileNotFoundError:  # released since the listing
                continue
            out[shard] = {**(lease or {"owner": None, "expires": None}), "damaged": lease is None,
                          "live": self.holder(shard) is not None}
        return out

    def break_lease(self, shard: int, force: bool = False) -> dict:
        """Remove another job's lease on `shard` (what it was); a live one only with `force` (StoreError
        otherwise: that job may still be writing the shard)."""
        held = self.all().get(shard)
        if held is None:
            raise StoreError(f"shard {shard} has no lease")
        if held["live"] and not force:
            raise StoreError(f"shard {shard} is leased by {held['owner']}, live for {held['expires'] - self.clock():.0f} "
                             f"s more: that job may still be writing it; stop it, or pass --force if it is gone")
        self.loc.remove(layout.lease_name(shard))
        return held

    def holder(self, shard: int) -> dict | None:
        """The live lease on a shard ({"owner", "expires"}), or None when there is none, it expired, or its owner
        is a dead process on this host."""
        return _holder(self.loc, layout.lease_name(shard), self.clock())

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl}).encode()

    def take(self, shard: int) -> bool:
        """Claim a shard: a lease object created exclusively. An expired or damaged lease is broken first. False
        when another job holds it."""
        got = _take(self.loc, layout.lease_name(shard), self.owner, self._body(), self.clock())
        if got:
            self.held.add(shard)
        return got

    def renew(self, shard: int) -> None:
        held = self.holder(shard)
        if held is None or held.get("owner") == self.owner:
            self.loc.write_bytes(layout.lease_name(shard), self._body())

    def renew_due(self) -> None:
        """Renew every held lease once a quarter of the TTL has passed since the last renewal."""
        if self.clock() - self._renewed > self.ttl / 4:
            for shard in self.held:
                self.renew(shard)
            self._renewed = self.clock()

    def release(self, shard: int) -> None:
        _release(self.loc, layout.lease_name(shard), self.owner, self.clock())
        self.held.discard(shard)

    def release_all(self) -> None:
        for shard in list(self.held):
            self.release(shard)


class ManifestLock:
    """Held while a job reads, merges and writes the manifest (`StoreWriter.save`): `olaf_store.lock`, created with
    the same conditional create as a lease, so that two jobs' saves never interleave; a lock whose holder died or
    that lapsed (`ttl`) holds nothing. Waits for a live one, up to `wait` seconds (StoreError then)."""

    def __init__(self, loc: Location, ttl: float = 30.0, wait: float = 120.0, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.loc, self.ttl, self.wait, self.clock, self.sleep = loc, ttl, wait, clock, sleep
        self.owner = lease_owner()

    def __enter__(self) -> ManifestLock:
        give_up = self.clock() + self.wait
        body = json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl}).encode()
        while not _take(self.loc, layout.MANIFEST_LOCK, self.owner, body, self.clock()):
            if self.clock() > give_up:
                held = _holder(self.loc, layout.MANIFEST_LOCK, self.clock()) or {"owner": "another job"}
                raise StoreError(f"{self.loc.url_of(layout.MANIFEST_LOCK)} has been held by {held['owner']} for over "
                                 f"{self.wait:.0f} s: if that job is gone, remove the file")
            self.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        _release(self.loc, layout.MANIFEST_LOCK, self.owner, self.clock())
