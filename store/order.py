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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from store.fs import StoreError

ORDER_VERSION = "olaf.order/1"


@dataclass(frozen=True)
class SampleTable:
    """The usable samples of a store, in dataset order, with where each one's bytes are: row r is the sample of
    global index `index[r]`, at `[offset[r], offset[r] + size[r])` of the tar of shard `shard[r]`."""

    index: np.ndarray  # int64 (N,)
    shard: np.ndarray  # int64 (N,)
    offset: np.ndarray  # int64 (N,)
    size: np.ndarray  # int64 (N,)
    ids: tuple[str, ...] | None  # per row, when every record lists its ids

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def from_records(cls, records: dict, shards: list[int], tar_name) -> SampleTable:
        """From the shard records (no data object is read): the tar's per-sample ranges, minus the samples
        whose image was bad (errors with no task)."""
        index, shard, offset, size, ids = [], [], [], [], []
        with_ids = True
        for i in shards:
            rec = records[i]
            ranges = rec.files.get(tar_name(i), {}).get("samples")
            if ranges is None or len(ranges) != rec.count:
                raise StoreError(f"shard {i}'s record gives no byte range for each sample (written by an older "
                                 f"olaf): re-extract the store to train from it with a global order")
            bad = rec.bad_indices()
            with_ids = with_ids and rec.ids is not None
            for pos, (a, n) in enumerate(ranges):
                j = rec.start + pos
                if j in bad:
                    continue
                index.append(j)
                shard.append(i)
                offset.append(a)
                size.append(n)
                if with_ids:
                    ids.append(rec.ids[pos])
        as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return cls(as64(index), as64(shard), as64(offset), as64(size), tuple(ids) if with_ids else None)

    def fingerprint(self) -> str:
        """sha256 of the usable indices: a resumed run must see the same set of samples."""
        return hashlib.sha256(self.index.tobytes()).hexdigest()


def _draws(n: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """n raw 64-bit draws of one (seed, epoch, stream); streams differ in the counter's top word, so they never
    overlap."""
    bits = np.random.Philox(key=np.array([seed % (1 << 64), epoch], dtype=np.uint64),
                            counter=np.array([0, 0, 0, stream], dtype=np.uint64))
    return bits.random_raw(n)


class GlobalOrder:
    """Rows of a `SampleTable` at each global position. `chunk` and `mix` as in the module docstring."""

    def __init__(self, table: SampleTable, seed: int, chunk: int = 4, mix: int = 32):
        if chunk < 1 or mix < chunk or mix % chunk:
            raise ValueError(f"order: chunk must be >= 1 and mix a multiple of it (chunk {chunk}, mix {mix})")
        if len(table) == 0:
            raise StoreError("the store has no usable sample (every image was bad, see errors.jsonl): nothing to "
                             "train on")
        self.table, self.seed, self.chunk, self.mix = table, int(seed), int(chunk), int(mix)
        # chunk k = rows [starts[k], stops[k]): consecutive usable rows of one shard
        starts = []
        shard = table.shard
        begin = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])  # first row of each shard
        ends = np.r_[begin[1:], len(table)]
        for a, b in zip(begin, ends, strict=True):
            starts.extend(range(a, b, chunk))
        self._starts = np.asarray(starts, dtype=np.int64)
        self._stops = np.minimum(np.r_[self._starts[1:], len(table)], self._starts + chunk)
        self._epoch = lru_cache(maxsize=2)(self._compute_epoch)

    def __len__(self) -> int:
        return len(self.table)

    def describe(self) -> dict:
        """What a checkpoint records, so a resume can refuse an order that is not the same."""
        return {"version": ORDER_VERSION, "seed": self.seed, "chunk": self.chunk, "mix": self.mix,
                "samples": len(self), "fingerprint": self.table.fingerprint()}

    def _compute_epoch(self, epoch: int) -> np.ndarray:
        chunks = np.argsort(_draws(len(self._starts), self.seed, epoch, 1), kind="stable")
        lengths = (self._stops - self._starts)[chunks]
        # rows of the permuted chunks, concatenated
        first = np.repeat(self._starts[chunks], lengths)
        within = np.arange(len(self)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows = first + within
        span = np.arange(len(self)) // self.mix
        mixed = np.lexsort((_draws(len(self), self.seed, epoch, 2), span))  # by span, then by a random key inside it
        return rows[mixed]

    def epoch(self, epoch: int) -> np.ndarray:
        """Table rows of one epoch, in position order (read-only)."""
        out = self._epoch(int(epoch))
        out.flags.writeable = False
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Table rows at global positions [start, stop), across epoch boundaries."""
        n = len(self)
        parts = []
        p = start
        while p < stop:
            e, off = divmod(p, n)
            take = min(stop - p, n - off)
            parts.append(self.epoch(e)[off:off + take])
            p += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def indices(self, start: int, stop: int) -> np.ndarray:
        """Global dataset indices of the samples at positions [start, stop)."""
        return self.table.index[self.rows(start, stop)]
