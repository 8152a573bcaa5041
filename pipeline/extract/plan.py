"""Planning, before any model is loaded: open the input (pipeline.inputs: a LLaVA JSON, a JSONL listing or
WebDataset tars; pipeline.parquet: parquet files; `open_source` picks the kind), validate it and split it into the store's shards (fixed, contiguous, in input order; the store
says which samples a shard holds). A shard's records are made when it is scheduled: the plan holds none; what the
input is (its identity, its description) the source says."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import store
from pipeline.inputs import IMAGE_KEYS, DatasetError, JsonlListing, LlavaJson, Record, Source, TarShards
from pipeline.parquet import ParquetFiles


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


# ---- which kind ------------------------------------------------------------------------------------------------------

def open_source(data_path: str, image_folder: str | None, shard_size: int, limit: int | None = None,
                image_keys=IMAGE_KEYS, caption_key: str = "txt", id_prefix: str = "none",
                columns: tuple = (None, None, None)) -> Source:
    """The source `data_path` names: tars (a brace pattern or one .tar, .tar.gz, .tgz, local or a URL), parquet
    files (a pattern ending in .parquet; `columns`: the image, caption and id columns' names, None: found by name;
    pipeline.parquet), a .jsonl listing or a LLaVA JSON (both with `image_folder`). DatasetError says what is
    wrong, in one message."""
    if shard_size < 1:
        raise DatasetError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {limit}")
    if data_path.endswith(".parquet"):
        folder = Path(image_folder).resolve() if image_folder else None
        return ParquetFiles(data_path, folder, shard_size, limit, columns)
    if re.search(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$|\{[^}]*\}", data_path):
        return TarShards(data_path, shard_size, limit, image_keys, caption_key, id_prefix=id_prefix)
    if id_prefix != "none":
        raise DatasetError("--id-prefix is for WebDataset tars: a JSON or JSONL listing names its own ids")
    path = Path(data_path).resolve()
    if not image_folder or not Path(image_folder).is_dir():
        raise DatasetError(f"image folder not found: {image_folder} (a JSON or JSONL listing names images in a "
                           f"folder: --image-folder)")
    if path.suffix == ".jsonl":
        return JsonlListing(path, Path(image_folder).resolve(), shard_size, limit)
    return LlavaJson(path, Path(image_folder).resolve(), limit)
