"""Reading a store: what it holds (manifest, records, teachers), refusing what does not match, and random
access to samples by key or index through Zarr or the tars. Works on any `Location`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from store import encodings, layout, tar, zarr_io
from store.codec import decode_sample, meta_of
from store.fs import Location, StoreError
from store.identity import evidence_mismatches, read_teachers, teacher_mismatches
from store.index import StoreIndex, index_in_memory, load_index
from store.manifest import RunManifest, ShardRecord, read_manifest, read_records
from store.order import SampleTable


class Store:
    """A store, opened for reading: a local path or any fsspec URL (s3://bucket/prefix). Checks the format
    version on open; `require` checks tasks, completeness and teacher identity before anything relies on them.
    With `expected_teachers` (a `TeacherManifest.identity()` dict) the check happens on open, for `tasks`
    (default: all the store has), so random access (`get`) refuses a mismatch exactly as the stream does.

    What is there (done shards, usable samples, their byte ranges and ids, the teachers the records name) is always
    read through the store's sample index (store.index), its one catalog: with `use_index`, the index files when
    they are fresh (not one record read); otherwise, or when they are absent or stale, the index built in memory
    by the same function that writes them (`indexed` says which; `no_index` why not the files). The records
    themselves are read when something asks for them (`records`)."""

    def __init__(self, path, expected_teachers: dict | None = None, tasks=None, use_index: bool = False):
        self.loc = path if isinstance(path, Location) else Location(path)
        self.manifest: RunManifest = read_manifest(self.loc)
        self.damaged_records: dict[int, str] = {}
        self._records: dict[int, ShardRecord] | None = None
        self.use_index = use_index
        self._catalog: StoreIndex | None = None
        self.indexed, self.no_index = False, "not asked for"
        self.notes: list[str] = []
        self._key_index = None
        self._zarr = None
        self._zarr_checked: set[tuple[int, str]] = set()
        self.bytes_read = 0  # bytes fetched by read_sample
        if expected_teachers is not None:
            self.require(tasks if tasks is not None else self.tasks, expected_teachers, allow_partial=True)

    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def index(self) -> StoreIndex:
        """The store's catalog: its index files when fresh (`use_index`), else the same index built in memory."""
        if self._catalog is None:
            found, self.no_index = load_index(self.loc) if self.use_index else (None, self.no_index)
            self.indexed = found is not None
            self._catalog = found or index_in_memory(self.loc, self.manifest, self.records)
        return self._catalog

    @property
    def records(self) -> dict[int, ShardRecord]:
        """Every readable shard record (read on first use; damaged ones are in `damaged_records`)."""
        if self._records is None:
            self._records = read_records(self.loc, self.damaged_records)
        return self._records

    # -- what is there
    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    @property
    def formats(self) -> list[str]:
        return list(self.manifest.formats)

    def has_teachers(self) -> bool:
        return self.loc.isfile(layout.TEACHERS)

    def teachers(self) -> dict:
        return read_teachers(self.loc)

    def done_shards(self, tasks: Iterable[str] | None = None) -> list[int]:
        tasks = list(tasks) if tasks is not None else self.tasks
        return self.index.shards["shard"][self.index.done_mask(tasks)].astype(int).tolist()

    def pending_shards(self, tasks: Iterable[str] | None = None) -> list[int]:
        done = set(self.done_shards(tasks))
        return [i for i in range(self.num_shards) if i not in done]

    def samples_done(self, tasks: Iterable[str] | None = None) -> int:
        return int(self.index.shards["count"][self.index.done_mask(self.tasks if tasks is None else list(tasks))].sum())

    def usable_samples(self, tasks: Iterable[str]) -> int:
        """Samples of the done shards whose image was usable (what an epoch trains on)."""
        return int(self.index.shards["usable"][self.index.done_mask(list(tasks))].sum())

    def sample_table(self, tasks: Iterable[str]) -> SampleTable:
        """The usable samples of the shards done for `tasks`, with their tar byte ranges and ids: a view of the
        catalog's arrays (mmapped from the index files, or held in memory)."""
        tasks = list(tasks)
        shards = self.done_shards(tasks)
        cols, ix = self.index.columns, self.index
        if len(shards) == len(ix.shards):  # every shard: the mmapped arrays themselves
            rows, ids = None, ix.ids
        else:
            rows = np.flatnonzero(np.isin(cols["shard"], np.asarray(shards, dtype=np.int32)))
            ids = ix.ids.take(rows)
        pick = (lambda a: a) if rows is None else (lambda a: np.asarray(a[rows]))  # noqa: E731
        if len(shards) and int(np.min(pick(cols["size"]), initial=0)) < 0:
            raise StoreError(f"{self.url}: its records give no byte range for each sample (no tars, or written by "
                             f"an older olaf): re-extract the store to train from it with a global order")
        if not ix.meta.get("ids_recorded", True):  # records of an older olaf name no ids: the tars' own are used
            ids = None
        tasks = tuple(ix.meta["tasks"]) if "task_at" in cols else ()
        return SampleTable(pick(cols["index"]), pick(cols["shard"]), pick(cols["offset"]), pick(cols["size"]), ids,
                           tasks=tasks, task_at=pick(cols["task_at"]) if tasks else None,
                           task_len=pick(cols["task_len"]) if tasks else None)

    def bytes_used(self) -> dict:
        return {"zarr": self.loc.du(layout.ZARR), "wds": self.loc.du(layout.WDS), "total": self.loc.du()}

    def require(self, tasks: Iterable[str], expected_teachers: dict | None = None, allow_partial: bool = False,
                formats: Iterable[str] = ()) -> None:
        """Refuse, with one message listing every reason, a store that lacks tasks, formats, finished shards or
        the expected teachers. Notes (e.g. weights at another location) are kept in `self.notes`."""
        tasks = list(tasks)
        problems = []
        missing = [t for t in tasks if t not in self.manifest.tasks]
        if missing:
            problems.append(f"tasks {missing} are not in the store (it has {self.tasks})")
        for f in formats:
            if f not in self.manifest.formats:
                problems.append(f"the store has no {f} output (formats: {self.manifest.formats})")
        if not missing:
            pending = self.pending_shards(tasks)
            if pending and not allow_partial:
                problems.append(f"{len(pending)} of {self.num_shards} shards are not done for {tasks} "
                                f"(e.g. {pending[:5]}): finish the extraction by re-running it")
            if len(pending) == self.num_shards:
                problems.append("no shard is done")
        if expected_teachers is not None and not missing:
            mismatches, notes = teacher_mismatches(self.teachers(), expected_teachers, tasks)
            # teachers.yaml is a claim; each shard's record says what computed it: both must be the expected ones
            evidence, mixed = self.index.meta["teachers"], self.index.meta["teachers_problems"]
            mismatches += [m for m in mixed if m.split(":", 1)[0] in tasks]
            mismatches += [f"{m} (by the shards' records)" for m in evidence_mismatches(evidence, expected_teachers,
                                                                                          tasks)]
            problems += [f"teacher mismatch: {m}" for m in mismatches]
            self.notes += notes
        if problems:
            raise StoreError(f"store {self.url} cannot be used as asked:\n  " + "\n  ".join(problems))

    # -- WebDataset
    def tar_urls(self, tasks: Iterable[str] | None = None, check: str = "size") -> list[str]:
        """URLs of the done shards' tars, checked against their records ('size', 'sha256' or 'none')."""
        if "wds" not in self.manifest.formats:
            raise StoreError(f"{self.url} has no WebDataset shards (formats: {self.manifest.formats})")
        from store.verify import check_files

        if check == "size":  # one listing of wds/, not a request per tar
            return self._tar_urls_by_listing(tasks)
        out = []
        for i in self.done_shards(tasks):
            name = layout.tar_name(i)
            info = self.records[i].files.get(name)
            problems = [f"{name}: not in its record"] if info is None else []
            if info is not None and check != "none":
                problems = check_files(self.loc, {name: info}, full=(check == "sha256"))
            if problems:
                raise StoreError(f"shard {i} is damaged: {'; '.join(problems)}; run `python -m pipeline.inspect "
                                 f"{self.url} verify` and re-run the extraction to redo it")
            out.append(self.loc.url_of(name))
        return out

    def _tar_urls_by_listing(self, tasks) -> list[str]:
        shards = self.index.shards[self.index.done_mask(self.tasks if tasks is None else list(tasks))]
        held = self.loc.sizes(layout.WDS)
        out = []
        for i, want in zip(shards["shard"].tolist(), shards["tar_bytes"].tolist(), strict=True):
            name = layout.tar_name(i)
            if held.get(name) != want:
                rec = self.records.get(i)
                if rec is not None and name in held and (rec.files.get(name) or {}).get("bytes") == held[name]:
                    raise StoreError(f"the store's sample index is stale: it says {name} has {want} bytes, the tar "
                                     f"has {held[name]}, as its record says (the shard is sound); rebuild the index "
                                     f"with `python -m pipeline.inspect {self.url} index`")
                what = "missing" if name not in held else f"{held[name]} bytes, recorded {want} (truncated or rewritten)"
                raise StoreError(f"shard {i} is damaged: {name}: {what}; run `python -m pipeline.inspect {self.url} "
                                 f"verify` and re-run the extraction to redo it")
            out.append(self.loc.url_of(name))
        return out

    def iter_raw(self, shard: int) -> Iterator[dict]:
        """Raw samples of one shard's tar, in order, one in memory at a time."""
        yield from tar.iter_tar(self.loc, layout.tar_name(shard))

    def iter_decoded(self, shard: int, tasks: Iterable[str], compact: bool = False) -> Iterator[dict]:
        tasks = list(tasks)
        for raw in self.iter_raw(shard):
            yield decode_sample(raw, self.manifest, tasks, compact=compact)

    # -- Zarr random access
    def zarr(self):
        if "zarr" not in self.manifest.formats:
            raise StoreError(f"{self.url} has no Zarr arrays (formats: {self.manifest.formats})")
        if self._zarr is None:
            self._zarr = zarr_io.open_group(self.loc, "r")
        return self._zarr

    def _require_zarr_objects(self, shard: int, array: str) -> None:
        """Zarr hands out its fill value (zeros) for a missing chunk object: before any read, check that the
        objects the shard's record lists for `array` are there, whole."""
        if (shard, array) in self._zarr_checked:
            return
        rec = self.records.get(shard)
        if rec is None:
            raise StoreError(f"shard {shard} of {self.url} is not done")
        prefix = f"{layout.ZARR}/{array}/"
        for name, info in rec.files.items():
            if name.startswith(prefix) and not info.get("absent"):  # "seg/" is not "seg_scale/" or "valid/seg/"
                size = self.loc.size(name)
                if size != info["bytes"]:
                    what = "missing" if size is None else f"{size} bytes, recorded {info['bytes']}"
                    raise StoreError(f"shard {shard}: {name} is {what}: Zarr would read zeros for its samples. "
                                     f"Run `python -m pipeline.inspect {self.url} verify`, then re-run the "
                                     f"extraction to redo the shard")
        self._zarr_checked.add((shard, array))

    def keys(self, shard: int) -> list[str]:
        """The sample ids of one shard, in order (Zarr keys, else the tar's json members)."""
        if "zarr" in self.manifest.formats:
            a, b = self.manifest.shard_range(shard)
            self._require_zarr_objects(shard, layout.KEYS)
            return [str(k) for k in self.zarr()[layout.KEYS][a:b]]
        return [meta_of(raw)["id"] for raw in self.iter_raw(shard)]

    def index_of(self, key: str) -> int:
        if self._key_index is None:
            self._key_index = {}
            for i in self.done_shards([]):
                a, _ = self.manifest.shard_range(i)
                self._key_index.update({k: a + j for j, k in enumerate(self.keys(i))})
        if key not in self._key_index:
            raise KeyError(f"sample {key!r} is not in a done shard of {self.url}")
        return self._key_index[key]

    def shard_of_key(self, key: str) -> int:
        return self.manifest.shard_of(self.index_of(key))

    def valid(self, task: str, index: int) -> bool:
        self._require_zarr_objects(self.manifest.shard_of(index), layout.valid_array(task))
        return bool(self.zarr()[layout.valid_array(task)][index])

    def zarr_values(self, task: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The encoded (values, scales) Zarr holds for one sample (its objects checked against the record)."""
        for array in layout.task_arrays(task, self.manifest.tasks[task].scaled):
            self._require_zarr_objects(self.manifest.shard_of(index), array)
        g = self.zarr()
        scale = g[layout.scale_array(task)][index] if self.manifest.tasks[task].scaled else None
        return g[task][index], scale

    def decode_zarr(self, task: str, index: int, dtype=None):
        """One sample's target from Zarr as a tensor (float32 unless `dtype`)."""
        import torch

        values, scale = self.zarr_values(task, index)
        return encodings.decode(values, scale, self.manifest.tasks[task].encoding, dtype or torch.float32)

    def get(self, key: str, tasks: Iterable[str] | None = None) -> dict:
        """Everything Zarr holds for one sample: {"id", "index", "shard", "valid": {task: bool},
        "targets": {task: float32 tensor (T, W)}} (targets only where valid)."""
        tasks = list(tasks) if tasks is not None else self.tasks
        j = self.index_of(key)
        shard = self.manifest.shard_of(j)
        rec = self.records[shard]
        out = {"id": key, "index": j, "shard": shard, "valid": {}, "targets": {}}
        for t in tasks:
            if t not in rec.tasks:
                continue
            ok = self.valid(t, j)
            out["valid"][t] = ok
            if ok:
                out["targets"][t] = self.decode_zarr(t, j)
        return out

    def sample_range(self, shard: int, position: int) -> tuple[int, int] | None:
        """(offset, size) of the `position`-th sample of a shard's tar, from its record; None for a store
        written before sample ranges were recorded."""
        ranges = self.records[shard].sample_ranges()
        return tuple(ranges[position]) if ranges else None

    def read_sample(self, shard: int, position: int) -> dict:
        """One raw tar sample ({"__key__", suffix: bytes}) by its position in the shard, with one range read of
        exactly its bytes (local seek or an HTTP range GET); `bytes_read` counts what was fetched."""
        where = self.sample_range(shard, position)
        if where is None:
            raise StoreError(f"shard {shard} of {self.url} records no sample offsets (written by an older olaf): "
                             f"re-extract it to read samples by position")
        offset, size = where
        name = layout.tar_name(shard)
        data = self.loc.read_range(name, offset, offset + size)
        self.bytes_read += len(data)
        return tar.sample_in(data, f"{self.loc.url_of(name)}@{offset}")

    def raw_sample(self, shard: int, key: str) -> dict | None:
        """The raw tar sample of `key` in `shard` ({"__key__", suffix: bytes}), or None: one range read where the
        record lists ids and ranges, else a scan of the tar."""
        rec = self.records[shard]
        if "wds" not in self.manifest.formats or layout.tar_name(shard) not in rec.files:
            return None
        if rec.ids is not None and self.sample_range(shard, 0) is not None:
            return self.read_sample(shard, rec.ids.index(key)) if key in rec.ids else None
        tk = layout.tar_key(key)
        return next((raw for raw in self.iter_raw(shard) if raw["__key__"] == tk), None)

    def find(self, key: str) -> tuple[int, dict | None]:
        """(shard, raw tar sample or None) for a key, through Zarr keys when there are any, else the tars."""
        if "zarr" in self.manifest.formats:
            shard = self.shard_of_key(key)
            return shard, self.raw_sample(shard, key)
        for i in self.done_shards([]):
            raw = self.raw_sample(i, key)
            if raw is not None:
                return i, raw
        raise KeyError(f"sample {key!r} is not in a done shard of {self.url}")

    def first_valid_key(self) -> str:
        for i in self.done_shards([]):
            bad = {e["id"] for e in self.records[i].errors}
            if "wds" in self.manifest.formats:
                for raw in self.iter_raw(i):
                    meta = meta_of(raw)
                    if meta["id"] not in bad and all(meta["valid"].values()):
                        return meta["id"]
            else:
                for k in self.keys(i):
                    if k not in bad:
                        return k
        raise KeyError(f"{self.url} has no done shard with a valid sample")

    def decode(self, raw: dict, tasks: Iterable[str], compact: bool = False) -> dict:
        return decode_sample(raw, self.manifest, tasks, compact=compact)


def committed_images(url: str, shard: int, ranges: list[tuple[int, int]], ids: list[str]) -> list[bytes | None]:
    """The images a committed shard's tar holds for the samples `ids` at the byte ranges of its record; None for a
    sample stored without one (it was bad). What a shard gaining tasks computes from: the bytes the store already
    holds (checked by the tar's sha256 before: verify), never the input again. Bytes at a range that are not
    their sample (the tar rewritten by an attempt that did not commit) are found by a scan of the tar."""
    loc, name = Location(url), layout.tar_name(shard)
    found = {}
    try:
        datas = loc.read_ranges([(name, a, a + n) for a, n in ranges])
    except StoreError:  # the tar is shorter than the ranges: scanned below
        datas = []
    for (offset, _), data in zip(ranges, datas, strict=False):
        try:
            raw = tar.sample_in(data, f"{loc.url_of(name)}@{offset}")
        except Exception:  # not a sample's bytes: scanned below
            continue
        if raw is not None and layout.META_MEMBER in raw:
            found[meta_of(raw).get("id")] = raw
    if any(i not in found for i in ids):
        found = {meta_of(raw).get("id"): raw for raw in tar.iter_tar(loc, name) if layout.META_MEMBER in raw}
    missing = [i for i in ids if i not in found]
    if missing:
        raise StoreError(f"{loc.url_of(name)} holds no sample {missing[0]!r} although its record lists it; run "
                         f"`python -m pipeline.inspect {loc.url} verify`")
    image = [meta_of(found[i]).get("image_member") for i in ids]
    return [found[i].get(m) if m else None for i, m in zip(ids, image, strict=True)]
