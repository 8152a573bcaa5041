"""Planning, before any model is loaded: open the input (pipeline.inputs: a LLaVA JSON, a JSONL listing or
WebDataset tars), validate it and split it into the store's shards (fixed, contiguous, in input order; the store
says which samples a shard holds). A shard's records are made when it is scheduled: the plan holds none."""

from __future__ import annotations

from dataclasses import dataclass

import store
from pipeline.inputs import IMAGE_KEYS, Source, open_source
from pipeline.llava import Record


@dataclass
class Plan:
    source: Source
    shard_size: int

    @property
    def num_samples(self) -> int:
        return self.source.num_samples

    @property
    def records_in_input(self) -> int:
        return self.source.records_in_input

    @property
    def num_shards(self) -> int:
        return store.num_shards(self.num_samples, self.shard_size)

    @property
    def image_folder(self) -> str | None:
        """Where records' images are, for the decode tasks (None: each record's image is a byte range of an input
        tar)."""
        return str(self.source.image_folder) if self.source.image_folder else None

    @property
    def dataset_sha256(self) -> str:
        return self.source.dataset_info()["sha256"]

    def shard_count(self, shard: int) -> int:
        """Samples of one shard, by arithmetic (no record is made)."""
        start, stop = store.shard_range(self.num_samples, self.shard_size, shard)
        return stop - start

    def shard_records(self, shard: int) -> list[Record]:
        return self.source.records(*store.shard_range(self.num_samples, self.shard_size, shard))

    def dataset_info(self) -> dict:
        return {"kind": self.source.kind, **self.source.dataset_info()}

    def describe(self) -> str:
        return f"{self.num_samples} samples ({self.records_in_input} in the {self.source.kind} input)"


def make_plan(data_path, image_folder, shard_size: int, limit: int | None = None, image_keys=IMAGE_KEYS,
              caption_key: str = "txt", id_prefix: str = "none") -> Plan:
    """Structural problems raise DatasetError (all listed at once); per-sample problems are left to decode."""
    return Plan(open_source(str(data_path), image_folder and str(image_folder), shard_size, limit, image_keys,
                            caption_key, id_prefix), shard_size)
