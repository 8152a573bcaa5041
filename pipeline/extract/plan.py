"""Planning, before any model is loaded: open the input (pipeline.inputs: a LLaVA JSON, a JSONL listing or
WebDataset tars), validate it and split it into the store's shards (fixed, contiguous, in input order; the store
says which samples a shard holds). A shard's records are made when it is scheduled: the plan holds none; what the
input is (its identity, its description) the source says."""

from __future__ import annotations

from dataclasses import dataclass

import store
from pipeline.inputs import IMAGE_KEYS, Record, Source, open_source


@dataclass
class Plan:
    """The shard arithmetic over a source's samples."""

    source: Source
    shard_size: int

    @property
    def num_samples(self) -> int:
        return self.source.num_samples

    @property
    def num_shards(self) -> int:
        return store.num_shards(self.num_samples, self.shard_size)

    def shard_count(self, shard: int) -> int:
        """Samples of one shard, by arithmetic (no record is made)."""
        start, stop = store.shard_range(self.num_samples, self.shard_size, shard)
        return stop - start

    def shard_records(self, shard: int) -> list[Record]:
        return self.source.records(*store.shard_range(self.num_samples, self.shard_size, shard))


def make_plan(data_path, image_folder, shard_size: int, limit: int | None = None, image_keys=IMAGE_KEYS,
              caption_key: str = "txt", id_prefix: str = "none", columns: tuple = (None, None, None)) -> Plan:
    """Structural problems raise DatasetError (all listed at once); per-sample problems are left to decode."""
    return Plan(open_source(str(data_path), image_folder and str(image_folder), shard_size, limit, image_keys,
                            caption_key, id_prefix, columns), shard_size)
