"""The training order: which sample sits at each global position, as a pure function of (seed, epoch).

Positions run over epoch after epoch: position p is slot p mod N of epoch p // N, where N is the number of
usable samples (the done shards' samples minus those whose image could not be decoded at extraction, which are
never trained on). Nothing here depends on the number of processes or DataLoader workers: they only decide who
reads which positions (`store.stream`), so a run can stop on 8 GPUs and continue on 4 with the same
global batches.

One epoch's order, in two steps:
  1. **chunks**: each shard's usable samples are cut into runs of `chunk` consecutive samples (a run is one
     contiguous byte range of the shard's tar, read with one request), and the chunks of the whole store are
     permuted;
  2. **mixing**: the positions are cut into aligned spans of `mix` (a multiple of `chunk`), and the samples
     inside each span are permuted.
Why: a global batch of G samples then draws its G / chunk chunks uniformly from the whole store (every shard
equally likely, unlike a shuffle buffer, which only mixes the few shards it has open), and consecutive samples
come from mix / chunk different chunks, so from that many shards. Reads stay coarse: a reader fetches a chunk,
or the part of a chunk its positions need, as one range; with the defaults (chunk 4, mix 32) and micro-batches
of 32, a micro-batch is 8 range reads of 4 samples (12 MB each at the real target sizes), and no byte is read
that the reader does not use. Compared with MosaicML Streaming's py1br (shuffle shards into blocks, samples
within blocks), chunks are smaller than shards, so the mixing does not need a rank to hold whole shards.

Randomness: NumPy's Philox bit generator, whose raw output is guaranteed stable across NumPy versions; a
permutation is the stable argsort of raw 64-bit draws. `ORDER_VERSION` names the algorithm in checkpoints.

Memory: an epoch keeps only its permutation of the chunks (one int32 and one int64 per chunk); the mixing of the
positions a reader asks for is computed for their spans alone (Philox jumps to a span's draws), so a process
holds a few bytes per sample beyond the table, which the store's index maps from disk (store.index). The rows
are those of the whole-epoch computation, bit for bit (tests/test_order.py holds them to the order of olaf
before the index).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from store.cache import cached_array
from store.fs import StoreError

ORDER_VERSION = "olaf.order/1"


@dataclass(frozen=True)
class SampleTable:
    """The usable samples of a store, in dataset order, with where each one's bytes are: row r is the sample of
    global index `index[r]`, at `[offset[r], offset[r] + size[r])` of the tar of shard `shard[r]`. The arrays may
    be mmapped (store.index)."""

    index: np.ndarray  # int64 (N,)
    shard: np.ndarray  # int (N,)
    offset: np.ndarray  # int64 (N,)
    size: np.ndarray  # int (N,)
    ids: Sequence[str] | None  # per row (a tuple, or the index's ids), when every record lists its ids
    source: np.ndarray | None = None  # int16 (N,): which store of a mix (`mix_tables`); None: one store
    local: np.ndarray | None = None  # a mix's rows: each one's row in its store's table
    tasks: tuple = ()  # the columns of task_at and task_len
    task_at: np.ndarray | None = None  # (N, tasks) int32: where a task's members start in the row's range (-1: unknown)
    task_len: np.ndarray | None = None  # (N, tasks) int32: their bytes (store.index)

    def __len__(self) -> int:
        return len(self.index)

    def fingerprint(self) -> str:
        """sha256 of the usable indices (as int64), and of each row's store in a mix: a resumed run must see the
        same samples."""
        h = hashlib.sha256(memoryview(np.ascontiguousarray(self.index, dtype=np.int64)))
        if self.source is not None:
            h.update(memoryview(np.ascontiguousarray(self.source)))
        return h.hexdigest()

    def id_of(self, row: int) -> str:
        """Row `row`'s sample id (its global index as text where the records list no ids)."""
        return self.ids[row] if self.ids is not None else str(int(self.index[row]))


class MixedIds(Sequence):
    """The ids of a mix's rows, looked up in their stores' tables (no copy of the strings)."""

    def __init__(self, tables: list[SampleTable], source: np.ndarray, local: np.ndarray):
        self.tables, self.source, self.local = tables, source, local

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row):
        return self.tables[int(self.source[row])].id_of(int(self.local[row]))


def mix_counts(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Samples each store gives one epoch: its size (the concatenation) without weights; with weights, the
    epoch keeps the stores' total and store i's share is w_i / sum(w), rounded by largest remainder. A count
    above a store's size repeats its samples, below it takes a subset (MosaicML Streaming's proportion)."""
    if weights is None:
        return list(sizes)
    total, w = sum(sizes), np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def mix_tables(tables: list[SampleTable], weights: list[float] | None, seed: int) -> SampleTable:
    """One table of several stores' samples, for one global order: store i's rows `count_i // size_i` times
    whole, then a subset of `count_i % size_i` of them chosen by the seed (the same every epoch), kept in dataset
    order so chunks stay contiguous byte ranges (`mix_counts`). A pure function of the tables, weights and seed."""
    parts = []
    for i, (t, count) in enumerate(zip(tables, mix_counts([len(t) for t in tables], weights), strict=True)):
        whole, rest = divmod(count, len(t))
        chosen = np.sort(np.argsort(_draws(len(t), seed, i, 3), kind="stable")[:rest]) if rest else []
        parts.append((i, np.concatenate([np.tile(np.arange(len(t)), whole), np.asarray(chosen, dtype=np.int64)])))
    source = np.concatenate([np.full(len(rows), i, dtype=np.int16) for i, rows in parts])
    local = np.concatenate([rows for _, rows in parts]).astype(np.int64)

    def column(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(tables[i], name))[rows] for i, rows in parts])

    return SampleTable(column("index"), column("shard"), column("offset"), column("size"),
                       MixedIds(tables, source, local), source, local)


def _draws(n: int, seed: int, epoch: int, stream: int, start: int = 0) -> np.ndarray:
    """Draws start .. start + n - 1 (raw 64-bit) of one (seed, epoch, stream); streams differ in the counter's top
    word, so they never overlap. Philox jumps to `start` (four draws per counter step) without drawing before it."""
    bits = np.random.Philox(key=np.array([seed % (1 << 64), epoch], dtype=np.uint64),
                            counter=np.array([0, 0, 0, stream], dtype=np.uint64))
    blocks, skip = divmod(start, 4)
    bits.advance(blocks)
    return bits.random_raw(skip + n)[skip:]


class GlobalOrder:
    """Rows of a `SampleTable` at each global position. `chunk` and `mix` as in the module docstring. With
    `cache` (a folder on this machine), the chunks and each epoch's permutation of them are kept there as .npy
    files and mmapped: the processes of a node (ranks, DataLoader workers) compute them once and share them."""

    def __init__(self, table: SampleTable, seed: int, chunk: int = 4, mix: int = 32, cache: Path | None = None):
        if chunk < 1 or mix < chunk or mix % chunk:
            raise ValueError(f"order: chunk must be >= 1 and mix a multiple of it (chunk {chunk}, mix {mix})")
        if len(table) == 0:
            raise StoreError("the store has no usable sample (every image was bad, see errors.jsonl): nothing to "
                             "train on")
        self.table, self.seed, self.chunk, self.mix = table, int(seed), int(chunk), int(mix)
        self._fingerprint = None
        self.cache = None if cache is None else Path(cache) / f"{self._table_key()}-{self.seed}-{chunk}-{mix}"
        # chunk k = rows [starts[k], starts[k] + lengths[k]): consecutive usable rows of one shard; rows and
        # positions in int32 below 2**31 samples (a few bytes a sample, whatever the store)
        self._position = np.int32 if len(table) < 2**31 else np.int64
        self._starts = self._kept("chunk-starts", lambda: self._chunk_starts().astype(self._position))
        self._lengths = self._kept("chunk-lengths", lambda: (np.minimum(np.r_[self._starts[1:], len(table)],
                                                                       self._starts + chunk) - self._starts
                                                            ).astype(np.int32))
        self._epoch = lru_cache(maxsize=2)(self._chunks_of_epoch)

    def _table_key(self) -> str:
        """What the cached arrays depend on: the usable samples and where the shards break them into chunks."""
        h = hashlib.sha256(self.describe()["fingerprint"].encode())
        h.update(memoryview(np.ascontiguousarray(self.table.shard)))
        if self.table.source is not None:
            h.update(memoryview(np.ascontiguousarray(self.table.source)))
        return h.hexdigest()[:32]

    def _chunk_starts(self) -> np.ndarray:
        n, shard, source = len(self.table), self.table.shard, self.table.source
        change = shard[1:] != shard[:-1]
        if source is not None:  # a mix: a chunk never spans two stores
            change |= source[1:] != source[:-1]
        begin = np.flatnonzero(np.r_[True, change])  # first row of each shard
        per_shard = -(-np.diff(np.r_[begin, n]) // self.chunk)  # chunks of each shard
        first = np.repeat(np.cumsum(per_shard) - per_shard, per_shard)
        return np.repeat(begin, per_shard) + (np.arange(len(first), dtype=np.int64) - first) * self.chunk

    def _kept(self, name: str, compute) -> np.ndarray:
        """`compute()`, or the copy the node's cache holds (store.cache: checked against its checksum)."""
        if self.cache is None:
            return compute()
        return cached_array(self.cache / f"{name}.npy", compute)

    def __len__(self) -> int:
        return len(self.table)

    def describe(self) -> dict:
        """What a checkpoint records, so a resume can refuse an order that is not the same."""
        if self._fingerprint is None:
            self._fingerprint = self.table.fingerprint()
        return {"version": ORDER_VERSION, "seed": self.seed, "chunk": self.chunk, "mix": self.mix,
                "samples": len(self), "fingerprint": self._fingerprint}

    def _chunks_of_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the chunks in the epoch's order, the position before the mixing at which each one starts)."""
        def permute():
            return np.argsort(_draws(len(self._starts), self.seed, epoch, 1), kind="stable").astype(self._position)

        chunks = self._kept(f"epoch-{epoch}-chunks", permute)
        at = self._kept(f"epoch-{epoch}-at", lambda: (np.cumsum(self._lengths[chunks], dtype=np.int64)
                                                       - self._lengths[chunks]).astype(self._position))
        for old in (self.cache.glob("epoch-*.npy*") if self.cache else []):  # an epoch two back is done with
            if int(old.name.split("-")[1]) < epoch - 1:
                old.unlink(missing_ok=True)
        return chunks, at

    def _premix_rows(self, epoch: int, q: np.ndarray) -> np.ndarray:
        """Rows at the epoch's positions `q` before the mixing: the permuted chunks laid end to end."""
        chunks, at = self._epoch(int(epoch))
        c = np.searchsorted(at, q, side="right") - 1
        return self._starts[chunks[c]].astype(np.int64) + (q - at[c])

    def _span_rows(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """Rows at the epoch's positions [lo, hi) (whole spans of `mix`, the last one possibly cut by the epoch's
        end): in each span, the positions sorted by their draws (stable), as the whole epoch's lexsort."""
        draws = _draws(hi - lo, self.seed, epoch, 2, start=lo)
        span = np.arange(lo, hi) // self.mix
        return self._premix_rows(epoch, lo + np.lexsort((draws, span)))

    def epoch(self, epoch: int) -> np.ndarray:
        """Table rows of one epoch, in position order (read-only)."""
        out = self._span_rows(int(epoch), 0, len(self))
        out.flags.writeable = False
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Table rows at global positions [start, stop), across epoch boundaries; only the spans they touch are
        computed."""
        n, parts, p = len(self), [], start
        while p < stop:
            e, off = divmod(p, n)
            take = min(stop - p, n - off)
            lo, hi = off // self.mix * self.mix, min(n, -(-(off + take) // self.mix) * self.mix)
            parts.append(self._span_rows(e, lo, hi)[off - lo:off - lo + take])
            p += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def indices(self, start: int, stop: int) -> np.ndarray:
        """Global dataset indices of the samples at positions [start, stop)."""
        return np.asarray(self.table.index[self.rows(start, stop)])
