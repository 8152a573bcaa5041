"""The trainer's reader: a store's samples in the global order (`store.order`), as micro-batches, on
any filesystem, resumable in O(1) and elastic.

    global position -> (rank, micro-batch, DataLoader worker) by fixed arithmetic
    -> table rows -> coalesced byte ranges of the tars (one request per contiguous run; concurrent on S3), of
       the members a row needs: its json and image, and the tasks the stream reads (store.index's task columns)
    -> raw samples (keys checked against the order) -> decode -> map_fn -> collate_fn -> one micro-batch

Several stores (`store_or_path` a list, `weights` their shares) are one table and one order (store.order
`mix_tables`); each row knows its store, which reads it, and each sample carries it ("store").

Global batch k is positions [k*G, (k+1)*G). It is cut into G / m micro-batches of m positions; rank r of W
takes micro-batches r*A .. (r+1)*A - 1 (A = G / (m*W), its gradient-accumulation steps), and DataLoader worker
w of a rank takes the rank's micro-batches w, w + workers, ... (which the DataLoader hands out in turn, so they
arrive in order). The micro-batches themselves do not depend on W: a run stopped on N processes continues on M
with the same micro-batches, the same global batches, the same losses.

The stream owns the data position: `state_dict()` is {"position": first position of the next step, ...,
the order's description}; `load_state_dict` refuses another order. Resuming reads nothing that was consumed:
the first request is the first new micro-batch's.
"""

from __future__ import annotations

import numpy as np
import torch.utils.data as tud

from store import layout, tar
from store.codec import decode_sample, meta_of
from store.fs import StoreError, cache_root
from store.order import GlobalOrder, mix_counts, mix_tables
from store.reader import Store

INDEX_ADVISED = 100_000  # samples above which a store without its index is worth a note (the records take seconds)


def micro_batch_positions(step: int, part: int, *, global_batch: int, micro_batch: int) -> tuple[int, int]:
    """[start, stop) of micro-batch `part` (0 .. G/m - 1) of global batch `step`."""
    start = step * global_batch + part * micro_batch
    return start, start + micro_batch


class TargetStream(tud.IterableDataset):
    """This rank's micro-batches of a store, from `position` on. Each yielded batch is `collate_fn(rows)` (or
    {"rows": rows}) plus {"step", "part", "positions": (start, stop), "row_offset" (start within the global batch),
    "resume_at"}; each row is `map_fn(sample)`
    (or the sample) and each sample is `decode_sample`'s dict plus its global "position". `stop_step` ends the
    stream after that global batch (None: forever).

    A path is opened here and checked once (`Store.require`: tasks, done shards, `expected_teachers`); a `Store`
    is one its caller has checked so (the trainer's open_store), and is not checked again."""

    def __init__(self, store_or_path, tasks, *, global_batch: int, micro_batch: int, seed: int = 0, chunk: int = 4,
                 mix: int = 32, rank: int | None = None, world_size: int | None = None,
                 expected_teachers: dict | None = None, allow_partial: bool = False, compact: bool = True,
                 check: str = "size", map_fn=None, collate_fn=None, stop_step: int | None = None,
                 weights: list[float] | None = None):
        self.tasks = list(tasks)
        weights = None if weights is None else [float(w) for w in weights]
        given = list(store_or_path) if isinstance(store_or_path, list | tuple) else [store_or_path]
        self.stores = [self._open(s, expected_teachers, allow_partial, check) for s in given]
        self.store, self.manifest = self.stores[0], self.stores[0].manifest
        self.notes = [n for s in self.stores for n in s.notes]
        for s in self.stores:
            if not s.indexed and s.num_samples >= INDEX_ADVISED:
                self.notes.append(f"the store's sample index is not used ({s.no_index}): the shard records were "
                                  f"read instead, which costs memory and time per sample; build it with `python -m "
                                  f"pipeline.inspect {s.url} index`")
        tables = [s.sample_table(self.tasks) for s in self.stores]
        self.mixed = len(self.stores) > 1
        # per store, the task columns of its index that this stream does not read (their members are left out)
        self._tables = tables
        self._skip = [[k for k, name in enumerate(tab.tasks) if name not in self.tasks] for tab in tables]
        self.table = mix_tables(tables, weights, seed) if self.mixed else tables[0]
        self.mix_info = [{"store": s.manifest.store_id or s.url, "url": s.url, "weight": w, "samples": n}
                         for s, w, n in zip(self.stores, weights or [None] * len(tables),
                                            mix_counts([len(t) for t in tables], weights), strict=True)]
        self.order = GlobalOrder(self.table, seed, chunk, mix, cache=cache_root() / "order")
        rank, world = _rank_world(rank, world_size)
        if global_batch % (micro_batch * world):
            raise ValueError(f"global batch {global_batch} is not micro batch {micro_batch} x {world} processes x "
                             f"an integer")
        self.global_batch, self.micro_batch, self.rank, self.world = global_batch, micro_batch, rank, world
        self.accum = global_batch // (micro_batch * world)
        self.compact, self.map_fn, self.collate_fn, self.stop_step = compact, map_fn, collate_fn, stop_step
        self.position = 0
        self.bytes_read = 0  # tar bytes this process fetched (each DataLoader worker counts its own)

    def _open(self, given, expected_teachers, allow_partial: bool, check: str) -> Store:
        if isinstance(given, Store):
            if expected_teachers is not None:
                raise TypeError("a Store given to TargetStream has passed Store.require: check its teachers there")
            s = given
        else:
            s = Store(given, use_index=True)
            s.require(self.tasks, expected_teachers=expected_teachers, allow_partial=allow_partial, formats=["wds"])
        s.tar_urls(self.tasks, check=check)  # every tar there and of its recorded size, before any training
        return s

    @property
    def num_samples(self) -> int:
        """Usable samples per epoch."""
        return len(self.order)

    # -- the data position
    def describe(self) -> dict:
        """The order's description, and for a mix each store's identity, weight and samples per epoch."""
        out = self.order.describe()
        if self.mixed:
            out["stores"] = [{k: m[k] for k in ("store", "weight", "samples")} for m in self.mix_info]
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "global_batch": self.global_batch, "micro_batch": self.micro_batch,
                "order": self.describe()}

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from a saved position; raises StoreError for another order or global batch. Returns notes
        (a different micro-batch size changes how a step's loss is averaged, not which samples it holds)."""
        mine = self.describe()
        theirs = state.get("order", {})
        if mine.get("stores") != theirs.get("stores"):
            raise StoreError(f"the saved run read {_mix_text(theirs.get('stores'))}, this one {_mix_text(mine.get('stores'))}: "
                             f"a run keeps its stores and mix; start a new --output-dir for another")
        problems = [f"{k}: saved {theirs.get(k)!r}, now {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if state.get("global_batch") != self.global_batch:
            problems.append(f"global batch: saved {state.get('global_batch')}, now {self.global_batch}")
        if state.get("position", -1) % self.global_batch:
            problems.append(f"position {state.get('position')} is not at a step boundary")
        if problems:
            raise StoreError("the saved data position belongs to another order (a different store, seed or global "
                             "batch):\n  " + "\n  ".join(problems))
        self.position = int(state["position"])
        notes = []
        if state.get("micro_batch") != self.micro_batch:
            notes.append(f"micro batch {state.get('micro_batch')} -> {self.micro_batch}: the same global batches, "
                         f"but NTP is averaged over other groups of samples, so losses differ slightly")
        return notes

    def consumed(self, batch: dict) -> None:
        """Called by the consumer (in the main process) for every batch it used: moves the position."""
        self.position = batch["resume_at"]

    # -- who reads what
    def rank_micro_batches(self, start_step: int):
        """(step, part) of this rank's micro-batches, in order, from global batch `start_step`."""
        step = start_step
        while self.stop_step is None or step < self.stop_step:
            for a in range(self.accum):
                yield step, self.rank * self.accum + a
            step += 1

    def ids_of(self, start: int, stop: int) -> list[str]:
        """The sample ids at positions [start, stop) (the global dataset index as text where the records do not
        list ids)."""
        return [self.table.id_of(r) for r in self.order.rows(start, stop)]

    def stores_of(self, start: int, stop: int) -> list[int] | None:
        """Which store (its place in the mix) each sample at positions [start, stop) comes from; None: one store."""
        return self.table.source[self.order.rows(start, stop)].tolist() if self.mixed else None

    # -- reading
    def _source(self, r) -> int:
        return int(self.table.source[r]) if self.mixed else 0

    def _pieces(self, r) -> list[tuple[int, int]]:
        """The byte ranges of row `r`'s members this stream reads: its whole range, less the members of the tasks it
        does not read where the index says where they lie (store.index's task columns)."""
        t = self.table
        a = int(t.offset[r])
        b = a + int(t.size[r])
        tab, row = (self._tables[int(t.source[r])], int(t.local[r])) if self.mixed else (t, r)
        skip = self._skip[int(t.source[r]) if self.mixed else 0]
        if not skip or tab.task_at is None or (tab.task_at[row, skip] < 0).any():
            return [(a, b)]
        out, p = [], a
        for lo, n in sorted((int(tab.task_at[row, k]), int(tab.task_len[row, k])) for k in skip):
            if n > 0:
                if a + lo > p:
                    out.append((p, a + lo))
                p = max(p, a + lo + n)
        return out + ([(p, b)] if p < b else [])

    def read_rows(self, rows: np.ndarray) -> list[dict]:
        """Raw tar samples of table rows, in the rows' order: the members each needs (the tasks this stream reads),
        with one range request per contiguous run of them (the requests of each store at once)."""
        t = self.table
        pieces = sorted((self._source(r), int(t.shard[r]), lo, hi, k) for k, r in enumerate(rows)
                        for lo, hi in self._pieces(r))
        requests: list[list] = []  # [source, shard, start, end, [(row position, start, end), ...]]
        for src, shard, lo, hi, k in pieces:
            if requests and requests[-1][:2] == [src, shard] and requests[-1][3] == lo:
                requests[-1][3] = hi
                requests[-1][4].append((k, lo, hi))
            else:
                requests.append([src, shard, lo, hi, [(k, lo, hi)]])
        parts: list[list[bytes]] = [[] for _ in rows]
        for src, store in enumerate(self.stores):
            mine = [q for q in requests if q[0] == src]
            got = store.loc.read_ranges([(layout.tar_name(q[1]), q[2], q[3]) for q in mine]) if mine else []
            for (_, _, base, _, held), data in zip(mine, got, strict=True):
                self.bytes_read += len(data)
                for k, lo, hi in held:
                    parts[k].append(data[lo - base:hi - base])
        return [self._one(r, self.stores[self._source(r)], layout.tar_name(int(t.shard[r])), b"".join(parts[k]))
                for k, r in enumerate(rows)]

    def _one(self, r: int, store: Store, name: str, data: bytes) -> dict:
        """Row `r`'s sample from its members' bytes read from tar `name`, checked to be exactly it."""
        t = self.table
        where = f"{store.loc.url_of(name)}@{t.offset[r]}"
        raw = tar.exact_sample(data, where)
        meta = meta_of(raw) if raw is not None else {}
        want_id = t.ids[r] if t.ids is not None else meta.get("id")
        if raw is None or meta.get("index") != int(t.index[r]) or meta.get("id") != want_id:
            raise StoreError(f"{where}: expected sample {int(t.index[r])} ({want_id}), "
                             + (f"found {meta.get('index')} ({meta.get('id')})" if raw is not None else
                                "found bytes that are not exactly one sample") + f": {self._which(store)}")
        return raw

    def _which(self, store: Store) -> str:
        """What names a sample's bytes, and how to mend it."""
        if store.indexed:
            return (f"the store's sample index says where each sample lies ({layout.INDEX}/offset.npy, "
                    f"{layout.INDEX}/size.npy), and one of them is damaged: rebuild it with `python -m "
                    f"pipeline.inspect {store.url} index` (`verify` names the damaged file)")
        return f"the tar does not match its record; run `python -m pipeline.inspect {store.url} verify`"

    def batch_at(self, step: int, part: int) -> dict:
        """Micro-batch `part` of global batch `step`, read, decoded, mapped and collated."""
        a, b = micro_batch_positions(step, part, global_batch=self.global_batch, micro_batch=self.micro_batch)
        batch = self.batch_of(a, b)
        last = part == (self.rank + 1) * self.accum - 1
        batch.update(step=step, part=part, positions=(a, b), row_offset=a - step * self.global_batch,
                     resume_at=(step + 1) * self.global_batch if last else step * self.global_batch)
        return batch

    def batch_of(self, a: int, b: int) -> dict:
        """The samples at global positions [a, b), read, decoded, mapped and collated (a held-out evaluation
        reads its fixed positions so)."""
        rows, samples = self.order.rows(a, b), []
        for pos, r, raw in zip(range(a, b), rows, self.read_rows(rows), strict=True):
            src = self._source(r)
            sample = decode_sample(raw, self.stores[src].manifest, self.tasks, compact=self.compact)
            sample["position"], sample["store"] = pos, src  # the store travels with its sample
            samples.append(self.map_fn(sample) if self.map_fn is not None else sample)
        return self.collate_fn(samples) if self.collate_fn is not None else {"rows": samples}

    def __iter__(self):
        info = tud.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start_step = self.position // self.global_batch
        for i, (step, part) in enumerate(self.rank_micro_batches(start_step)):
            if i % workers == worker:
                yield self.batch_at(step, part)


def _mix_text(stores: list[dict] | None) -> str:
    if not stores:
        return "one store"
    return " + ".join(f"{m['store']} (weight {m['weight']}, {m['samples']} samples an epoch)" for m in stores)


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None:
        return rank, world or 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loader(stream: TargetStream, num_workers: int = 0, pin_memory: bool = False, worker_init_fn=None,
           prefetch_factor: int = 2):
    """A DataLoader over the stream's micro-batches (workers build whole micro-batches, in turn), yielding them
    in order and moving the stream's position as each one is handed out."""
    dl = tud.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        worker_init_fn=worker_init_fn, persistent_workers=False,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None)
    for batch in dl:
        stream.consumed(batch)
        yield batch
