"""The trainer's reader: a store's WebDataset shards as a torch IterableDataset, on any filesystem.

    shard list (seeded order per epoch, split by rank and worker) -> open (fsspec: local, s3://, gs://)
    -> tar members -> samples (grouped by key) -> shuffle buffer (seeded) -> skip (resume)
    -> decode (image bytes, record, targets, valid) -> map_fn (the trainer's preprocessing)
"""

from __future__ import annotations

import random

import torch.utils.data as tud

from pipeline.store.codec import decode_sample
from pipeline.store.fs import StoreError
from pipeline.store.reader import Store


def split_streams(num_shards: int, rank: int, world: int, worker: int, workers: int) -> tuple[int, int, bool]:
    """(stream id, number of streams, split by shard?) for one DataLoader worker of one rank. With at least as
    many shards as streams each stream reads its own shards; with fewer (small stores), every stream reads every
    shard and keeps every n-th sample, so no rank or worker ever runs dry."""
    streams = world * workers
    return rank * workers + worker, streams, num_shards >= streams


def open_urls(src):
    """webdataset stage: {"url"} -> {"url", "stream"} through fsspec, so every backend streams the same way."""
    import fsspec

    for sample in src:
        yield {**sample, "stream": fsspec.open(sample["url"], "rb").open()}


class TargetStream(tud.IterableDataset):
    """An iterable over a store's shards for training. The order is a pure function of (seed, world size,
    number of workers), so a run resumed with `skip` (per worker stream) and `worker_offset` sees the same
    samples in the same order as an uninterrupted one; every sample carries `stream` = (worker stream,
    position) for that bookkeeping. `map_fn` may return None to drop a sample. `repeat=True` streams epoch
    after epoch (the trainer stops at its step budget)."""

    def __init__(self, store_or_path, tasks, *, expected_teachers: dict | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, repeat: bool = True,
                 compact: bool = True, check: str = "size", allow_partial: bool = False,
                 skip: int | list[int] = 0, worker_offset: int = 0, map_fn=None):
        s = store_or_path if isinstance(store_or_path, Store) else Store(store_or_path)
        self.tasks = list(tasks)
        s.require(self.tasks, expected_teachers=expected_teachers, allow_partial=allow_partial, formats=["wds"])
        self.notes = list(s.notes)
        self.urls = s.tar_urls(self.tasks, check=check)
        self.manifest = s.manifest
        self.num_samples = s.samples_done(self.tasks)
        self.shuffle_buffer, self.seed, self.repeat, self.compact = shuffle_buffer, seed, repeat, compact
        self.rank, self.world_size, self.skip, self.map_fn = rank, world_size, skip, map_fn
        self.worker_offset = worker_offset

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        import webdataset as wds

        info = tud.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader asks its workers in turn, starting with worker 0: after k batches a resumed loader must
        # start with the stream that was next, so DataLoader worker i plays stream (i + k) % workers
        worker = (worker + self.worker_offset) % workers
        rank, world = self._rank_world()
        stream, streams, by_shard = split_streams(len(self.urls), rank, world, worker, workers)
        skip = self.skip[worker] if isinstance(self.skip, list | tuple) else self.skip

        def samples():  # (epoch, raw sample)
            epoch = 0
            while True:
                order = list(self.urls)
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
                mine = order[stream::streams] if by_shard else order
                raw = iter(wds.DataPipeline(wds.SimpleShardList(mine), open_urls, wds.tariterators.tar_file_expander,
                                            wds.tariterators.group_by_keys))
                if not by_shard:
                    raw = (x for k, x in enumerate(raw) if k % streams == stream)
                rng = random.Random(f"{self.seed}/{epoch}/{stream}")
                shuffled = wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw) \
                    if self.shuffle_buffer > 1 else raw
                yield from ((epoch, x) for x in shuffled)
                epoch += 1
                if not self.repeat:
                    return

        it = samples()
        for _ in range(skip):  # resume: drop what was consumed, before any decoding
            next(it, None)
        # an epoch seen whole in which map_fn dropped every sample would repeat forever: say so instead
        epoch, seen, used, whole = None, 0, 0, skip == 0
        for pos, (e, raw) in enumerate(it, start=skip):
            if e != epoch:
                if epoch is not None and whole and seen and not used:
                    raise StoreError(f"{self.manifest.num_samples} samples, and none of the {seen} this reader saw "
                                     f"in epoch {epoch} was usable (every image was dropped): nothing to train on")
                epoch, seen, used, whole = e, 0, 0, whole or epoch is not None
            seen += 1
            sample = decode_sample(raw, self.manifest, self.tasks, compact=self.compact)
            # where this sample sits in its worker's stream: a consumer that checkpoints the largest position it
            # used, per worker, resumes exactly with skip = position + 1 (filtered samples included)
            sample["stream"] = (worker, pos)
            out = self.map_fn(sample) if self.map_fn is not None else sample
            if out is not None:  # map_fn may drop a sample (e.g. an unusable image)
                used += 1
                yield out
        if whole and seen and not used:
            raise StoreError(f"none of the {seen} samples this reader saw was usable (every image was dropped)")
