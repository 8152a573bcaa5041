"""Planning, before any model is loaded: validate the dataset and split it into the store's shards (fixed,
contiguous, in dataset order; the store says which samples a shard holds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import store
from pipeline.llava import DatasetError, Record, load_records


@dataclass
class Plan:
    data_path: Path
    image_folder: Path
    records: list[Record]
    records_in_file: int
    limit: int | None
    shard_size: int
    dataset_sha256: str

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def num_shards(self) -> int:
        return store.num_shards(self.num_samples, self.shard_size)

    def shard_records(self, shard: int) -> list[Record]:
        start, stop = store.shard_range(self.num_samples, self.shard_size, shard)
        return self.records[start:stop]

    def dataset_info(self) -> dict:
        return {"json": str(self.data_path), "sha256": self.dataset_sha256, "image_folder": str(self.image_folder),
                "records_in_file": self.records_in_file, "limit": self.limit}


def make_plan(data_path: str | Path, image_folder: str | Path, shard_size: int, limit: int | None = None) -> Plan:
    """Structural problems raise DatasetError (all listed at once); per-sample problems are left to decode."""
    data_path, image_folder = Path(data_path).resolve(), Path(image_folder).resolve()
    if shard_size < 1:
        raise DatasetError(f"--shard-size must be >= 1, got {shard_size}")
    if not image_folder.is_dir():
        raise DatasetError(f"image folder not found: {image_folder}")
    records, in_file = load_records(data_path, limit=limit)
    sha = store.Location(data_path.parent).sha256(data_path.name)
    return Plan(data_path, image_folder, records, in_file, limit, shard_size, sha)
