"""Where a store's samples come from, each kind planned into the store's shards without more than a shard's
records in memory at once:

    LLaVA JSON      --data-path blip_laion_cc_sbu_558k.json --image-folder images/   (the whole file is parsed)
    JSONL listing   --data-path listing.jsonl --image-folder images/                 (a LLaVA record per line, or
                    {"id", "image", "caption"}; read line by line, the offsets of the shards' first lines kept)
    WebDataset      --data-path 'in/{00000..02999}.tar' (local or s3://...)          (img2dataset's shards: the
                    image and caption of each sample are members of its tar)

A source gives the records of a range of global indices, the identity the store keeps (`dataset_info`, whose
"sha256" a resume must match: the file's sha256, or that of the listing of the input tars' sizes and sha256s),
and where each record's image is (`Record.at`, the one channel a decode task reads: a file of the image folder, a
byte range of an input tar, or the sample of a committed shard of the store).
Samples a source cannot use (a tar member that cannot be read, a sample without an image or caption) stay in the
order as bad records, with their reason: never fatal, never dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from recipes.imageops import BadImage
from store import Location, cache, is_url

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LIST_THREADS = 8  # input tars listed at once
ID_PREFIXES = ("none", "tar")  # what a WebDataset sample's id is: its key, or its tar's path / its key
CAPTION_MAX = 1 << 20  # bytes a caption member may have
LISTING_VERSION = 2  # what a cached tar listing holds (2: its compression, member names escaped)


DATASET_JSON = "blip_laion_cc_sbu_558k.json"  # LLaVA-Pretrain-558K's listing (SPEC section 1)
IMAGE_TOKEN = "<image>"


# ---- a record, and the LLaVA format every kind gives (SPEC section 1) ------------------------------------------------
# A JSON list of records {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [{"from": "human",
# "value": "...\\n<image>"}, {"from": "gpt", "value": "<caption>"}]}, the images under an image folder at the
# record's relative `image` path. The record's `id` is the sample key everywhere in olaf.

class DatasetError(ValueError):
    """The dataset file is structurally unusable; the message lists every problem found."""


@dataclass(frozen=True)
class Record:
    """One dataset record, as the pipeline carries it (the raw JSON object is kept verbatim)."""

    index: int  # position in the dataset file
    id: str
    image: str | None  # the record's name for its image (a relative path; TAR/member), or None: text-only
    raw: dict
    problem: str | None = None  # why the record cannot be a training sample (it is stored as a bad sample)
    # where its image's bytes are, the one channel a decode reads (None: nowhere, a text-only record):
    #   ("folder", root, relative path)                 a LLaVA JSON's or a JSONL listing's image folder
    #   ("tar", url, offset, size, compression)         a member of an input tar (compression None, gz, bz2, xz)
    #   ("parquet", url, row group, row, column)        a parquet file's image column (pipeline.parquet)
    #   ("store", store url, shard, offset, size)       its sample in a committed shard of the store: what a shard
    #                                                   gaining tasks computes from (never the input again)
    at: tuple | None = None

    def caption(self) -> str:
        turns = self.raw.get("conversations") or []
        gpt = [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        return gpt[0] if gpt else ""


def conversation_problem(conv) -> str | None:
    """Why a record's conversations cannot be tokenised (each turn an object with string 'from' and 'value'),
    or None. Such a record is kept and stored as a bad sample, not a stop of the whole dataset."""
    for k, turn in enumerate(conv or []):
        if not isinstance(turn, dict):
            return f"conversations[{k}] is not an object ({type(turn).__name__})"
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                return f"conversations[{k}].{key} is not a string ({type(turn.get(key)).__name__})"
    return None


def _read_json(path: Path):
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path} (expected a LLaVA JSON such as {DATASET_JSON})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def id_problem(rid) -> str | None:
    if not isinstance(rid, str) or not rid.strip():
        return "missing or empty 'id'"
    if rid != rid.strip() or any(c in rid for c in "\n\r\t\0"):
        return f"id {rid!r} has surrounding whitespace or control characters"
    try:  # every store writes ids as UTF-8 (Zarr keys, tar names, JSON): a lone surrogate cannot be
        rid.encode("utf-8")
    except UnicodeEncodeError:
        return f"id {rid!r} is not valid Unicode text (a lone surrogate): it cannot be stored"
    return None


def _record(i: int, rec, first_seen: dict[str, int], image_folder: Path | None = None
            ) -> tuple[Record | None, str | None]:
    """(the record, None) or (None, the structural problem of record `i`)."""
    if not isinstance(rec, dict):
        return None, f"record {i}: not a JSON object ({type(rec).__name__})"
    rid = rec.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    problem = id_problem(rid)
    if problem:
        return None, f"record {i}: {problem}"
    if rid in first_seen:
        return None, f"record {i}: duplicate id {rid!r} (first at record {first_seen[rid]})"
    first_seen[rid] = i
    conv = rec.get("conversations")
    if conv is not None and not isinstance(conv, list):
        return None, f"record {i} (id {rid}): 'conversations' is not a list"
    image = rec.get("image")
    image = image if isinstance(image, str) and image else None
    at = ("folder", str(image_folder), image) if image is not None and image_folder is not None else None
    return Record(index=i, id=rid, image=image, raw=rec, problem=conversation_problem(conv), at=at), None


def record_of(i: int, rec, image_folder: Path | None = None) -> tuple[Record | None, str | None]:
    """One record of a listing read line by line: (the record, None) or (None, its structural problem);
    duplicate ids are the caller's to find."""
    record, problem = _record(i, rec, {}, image_folder)
    return record, problem.removeprefix(f"record {i}: ") if problem else None


def load_records(path: str | Path, limit: int | None = None, max_problems: int = 50,
                 image_folder: str | Path | None = None) -> tuple[list[Record], int]:
    """Read and structurally validate a LLaVA JSON file.

    Structural problems (not a JSON list, a record that is not an object, a record without a usable id,
    duplicate ids, conversations that are not a list) make the whole dataset unusable: they are all collected
    and raised together as one DatasetError, before any work starts. Per-sample problems (missing or bad images,
    text-only records) are not checked here; the pipeline records them as bad samples.

    `limit` (>= 1: open_source checks it) keeps a prefix of the records (smoke runs); validation covers only that
    prefix. With `image_folder`,
    each record says its image is there (`Record.at`).
    Returns (records, number of records in the file).
    """
    path = Path(path)
    data = _read_json(path)
    in_file = len(data)
    if limit is not None:
        data = data[:limit]
    problems: list[str] = []
    records: list[Record] = []
    first_seen: dict[str, int] = {}
    folder = Path(image_folder) if image_folder is not None else None
    for i, rec in enumerate(data):
        record, problem = _record(i, rec, first_seen, folder)
        if problem:
            problems.append(problem)
        else:
            records.append(record)
    if problems:
        shown = problems[:max_problems]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DatasetError(f"{path}: {len(problems)} structural problem(s); fix the file before extracting:\n  "
                           + "\n  ".join(shown) + more)
    if not records:
        raise DatasetError(f"{path}: the dataset has no records")
    return records, in_file


# ---- what every kind gives the plan -----------------------------------------------------------------------------

class Source:
    """What every kind gives the plan."""

    kind = ""
    num_samples: int
    records_in_input: int

    def records(self, start: int, stop: int) -> list[Record]:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def dataset_info(self) -> dict:
        """What the store records of its input: the kind, and the identity a resume must match ("sha256")."""
        return {"kind": self.kind, **self.identity()}

    def describe(self) -> str:
        return f"{self.num_samples} samples ({self.records_in_input} in the {self.kind} input)"

    def warnings(self) -> list[str]:
        """What the planning found that is not fatal (a tar that cannot be read to its end)."""
        return []

    def count(self, counts: list[int], limit: int | None, empty: str) -> None:
        """For inputs of several files (tars, parquet): each file's first global index (`first`), the records in
        them and the samples kept (`limit`); DatasetError(`empty`) when none is."""
        self.first = np.r_[0, np.cumsum(np.asarray(counts, dtype=np.int64))]
        self.records_in_input = int(self.first[-1])
        self.num_samples = min(self.records_in_input, limit) if limit is not None else self.records_in_input
        if self.num_samples == 0:
            raise DatasetError(f"--data-path {self.pattern!r}: {empty}")


def refuse_repeated_ids(source: Source, sizes: list[int], id_of, way_out: str) -> None:
    """Two samples under one id would be one sample to every reader: an input of several files (`source.listings`,
    `sizes` records each, `id_of(file, position)`) whose kept samples repeat an id is refused, naming the first id
    and both files, as a JSON listing's duplicates are (by 64-bit hashes of the ids; a collision is told apart by
    the ids themselves)."""
    where = [(k, pos) for k, n in enumerate(sizes) for pos in range(n)][:source.num_samples]
    hashes = np.fromiter((_id_hash(id_of(k, pos)) for k, pos in where), dtype=np.uint64, count=len(where))
    pairs = [(a, b) for a, b in equal_hashes(hashes) if id_of(*where[a]) == id_of(*where[b])]
    if pairs:
        (ka, _), (kb, _) = where[pairs[0][0]], where[pairs[0][1]]
        raise DatasetError(f"--data-path {source.pattern!r}: {len(pairs)} id(s) occur twice, the first "
                           f"{id_of(*where[pairs[0][0]])!r} in {source.listings[ka]['url']} and in "
                           f"{source.listings[kb]['url']}; ids must be unique: {way_out}")


def input_file(url: str, kind: str, pattern: str) -> tuple[Location, str, dict, str | None]:
    """(its location, its name, its filesystem info, its ETag on object storage) of one input file; DatasetError
    naming it when it is not there or cannot be reached."""
    loc, name = _location_of(url)
    try:
        info = loc.fs.info(loc.path(name))
    except FileNotFoundError:
        raise DatasetError(f"input {kind} not found: {url} (of --data-path {pattern!r})") from None
    except Exception as e:  # a bucket that refuses, an endpoint that does not answer
        raise DatasetError(f"input {kind} {url} cannot be read: {type(e).__name__}: {str(e)[:200]}") from None
    return loc, name, info, None if loc.local else (info.get("ETag") or info.get("etag"))


# ---- a LLaVA JSON, whole -------------------------------------------------------------------------------------------

class LlavaJson(Source):
    kind = "llava-json"

    def __init__(self, path: Path, image_folder: Path, limit: int | None):
        self.path, self.image_folder, self.limit = path, image_folder, limit
        self._records, self.records_in_input = load_records(path, limit=limit, image_folder=image_folder)
        self.num_samples = len(self._records)
        self.sha256 = Location(path.parent).sha256(path.name)

    def records(self, start: int, stop: int) -> list[Record]:
        return self._records[start:stop]

    def identity(self) -> dict:
        return {"json": str(self.path), "sha256": self.sha256, "image_folder": str(self.image_folder),
                "records_in_file": self.records_in_input, "limit": self.limit}


# ---- a JSONL listing, line by line ----------------------------------------------------------------------------------

class JsonlListing(Source):
    """One pass at planning: the file's sha256, the structure of every line (all problems at once, as the JSON's),
    duplicate ids (by 64-bit hashes: 16 bytes a record while planning), and the byte offset of every
    `shard_size`-th line. What it found is cached on the node, so a
    resume does not parse the listing again: the cached plan is used only when the file still hashes to the sha256
it was made from (`cached_input`)."""

    kind = "jsonl"

    def __init__(self, path: Path, image_folder: Path, shard_size: int, limit: int | None):
        self.path, self.image_folder, self.shard_size, self.limit = path, image_folder, shard_size, limit
        st = path.stat()
        planned = cached_input(("jsonl", path, st.st_size, st.st_mtime_ns, shard_size, limit), self._plan,
                               lambda: Location(path.parent).sha256(path.name))
        self.sha256, self.starts, self.num_samples = planned["sha256"], planned["starts"], planned["samples"]
        self.records_in_input = planned["samples"]

    def _plan(self) -> dict:
        from array import array

        h, starts, hashes, problems, n = hashlib.sha256(), [], array("Q"), [], 0
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                h.update(line)
                if line.strip() and (self.limit is None or n < self.limit):
                    if n % self.shard_size == 0:
                        starts.append(offset)
                    rec, problem = _listing_record(n, line)
                    if problem:
                        problems.append(f"line {n + 1}: {problem}")
                    # record n's id hash (a line without an id hashes a name no id can have: no false duplicate)
                    name = rec.id if problem is None else f"\0line {n}"
                    hashes.append(_id_hash(name))
                    n += 1
                offset += len(line)
        problems += _duplicates(self.path, np.frombuffer(hashes, dtype=np.uint64))
        if problems:
            raise DatasetError(f"{self.path}: {len(problems)} structural problem(s):\n  " + "\n  ".join(problems[:50]))
        if n == 0:
            raise DatasetError(f"{self.path}: the listing has no records")
        return {"sha256": h.hexdigest(), "starts": starts, "samples": n}

    def records(self, start: int, stop: int) -> list[Record]:
        out = []
        with open(self.path, "rb") as f:
            f.seek(self.starts[start // self.shard_size])
            n = start // self.shard_size * self.shard_size
            for line in f:
                if not line.strip():
                    continue
                if n >= stop:
                    break
                if n >= start:
                    out.append(_listing_record(n, line, self.image_folder)[0])
                n += 1
        return out

    def identity(self) -> dict:
        return {"jsonl": str(self.path), "sha256": self.sha256, "image_folder": str(self.image_folder),
                "records_in_file": self.records_in_input, "limit": self.limit}


def _listing_record(n: int, line: bytes, image_folder: Path | None = None) -> tuple[Record | None, str | None]:
    """A listing line as a record: a LLaVA record, or {"id", "image", "caption"} (given the LLaVA form)."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, f"not JSON ({str(e)[:80]})"
    if isinstance(obj, dict) and "caption" in obj and "conversations" not in obj:
        obj = llava_record(str(obj.get("id", "")), obj.get("image"), obj["caption"])
    return record_of(n, obj, image_folder)


def equal_hashes(hashes: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (a, b), a < b, of positions whose 64-bit hashes are equal, in the order of b (the first repeat
    first): sorted once (8 more bytes a record), and an argsort only when two are equal."""
    if len(hashes) < 2:
        return []
    ordered = np.sort(hashes)
    if not (ordered[1:] == ordered[:-1]).any():
        return []
    del ordered
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    return sorted(((int(order[k]), int(order[k + 1])) for k in same), key=lambda pair: pair[1])


def _duplicates(path: Path, hashes: np.ndarray) -> list[str]:
    """Ids that occur twice, by the 64-bit hashes of every record's id (record n: 0-based, blank lines not
    counted); a hash collision is read back from the file to tell it from a duplicate."""
    pairs = equal_hashes(hashes)
    want = {n for pair in pairs for n in pair}
    ids: dict[int, str] = {}
    if want:
        with open(path, "rb") as f:
            n = 0
            for line in f:
                if line.strip():
                    if n in want:
                        ids[n] = str(json.loads(line)["id"])  # a record that parsed and had an id
                    n += 1
    return [f"line {b + 1}: duplicate id {ids[a]!r} (first at line {a + 1})" for a, b in pairs if ids[a] == ids[b]]


def llava_record(sample_id: str, image: str | None, caption) -> dict:
    """A caption as LLaVA's PT writes a sample: the human turn the image, the gpt turn the caption."""
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}]}


def cached_input(key: tuple, compute, sha256_now=None) -> dict:
    """What planning found in an input (a JSONL plan, a tar's listing), from the node's cache (store.cache, checked
    on read) when it is there and the input is the same: `key` names it (path, size, mtime, settings), and
    `sha256_now()`, when given, hashes the input as it is now, which must equal the "sha256" the entry was made
    from (a file rewritten under the same size and mtime is planned again). Without `sha256_now` the key must
    already say the content (an object's ETag)."""
    path = cache.entry("inputs", *key)
    raw = cache.read(path)
    if raw is not None:
        try:
            found = json.loads(raw)
            if sha256_now is None or found.get("sha256") == sha256_now():
                return found
        except (ValueError, AttributeError):
            pass
    found = compute()
    cache.write(path, json.dumps(found).encode())
    return found


# ---- WebDataset tars -----------------------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """'in/{00000..00002}.tar' -> in/00000.tar, in/00001.tar, in/00002.tar (zero padding kept; several braces and
    comma lists {a,b} too), as webdataset's brace expansion."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


class TarShards(Source):
    """Input tars, each listed once (streamed: its samples' keys, where each image member's bytes are, the
    caption; the tar's size and sha256) and the listing cached on this machine (`cached_input`: a local tar is
    hashed again and must match, an object's ETag is its content's), so a resume lists only tars that changed.
    Keys must be unique across the tars (`id_prefix="tar"` makes two datasets' keys so: each id is prefixed with
    its tar's path relative to the pattern's root, without .tar)."""

    kind = "webdataset"

    def __init__(self, pattern: str, shard_size: int, limit: int | None, image_keys=IMAGE_KEYS,
                 caption_key: str = "txt", threads: int = LIST_THREADS, id_prefix: str = "none"):
        if id_prefix not in ID_PREFIXES:
            raise DatasetError(f"--id-prefix must be one of {', '.join(ID_PREFIXES)}, got {id_prefix!r}")
        self.pattern, self.limit, self.id_prefix = pattern, limit, id_prefix
        self.image_keys, self.caption_key = tuple(k.lower() for k in image_keys), _lower_suffix(caption_key)
        urls = expand_braces(pattern)
        if not urls:
            raise DatasetError(f"--data-path {pattern!r} names no tar")
        with ThreadPoolExecutor(threads) as pool:
            self.listings = list(pool.map(self._listing, urls))
        unreadable = [x for x in self.listings if not x["samples"] and x.get("problem")]
        if unreadable:
            first = unreadable[0]
            raise DatasetError(f"input tar {first['url']}: nothing in it can be read ({first['problem']})"
                               + (f"; and {len(unreadable) - 1} more such tar(s)" if len(unreadable) > 1 else "")
                               + ": repair or remove it from --data-path")
        self.prefixes = tar_prefixes(pattern, urls) if id_prefix == "tar" else [""] * len(urls)
        self.count([len(x["samples"]) for x in self.listings], limit, "the tars hold no sample")
        self._refuse_duplicate_keys()

    def _listing(self, url: str) -> dict:
        """The tar's listing, from this machine's cache when the tar has not changed, else listed now."""
        loc, name, info, etag = input_file(url, "tar", self.pattern)

        def listed() -> dict:
            try:
                return list_tar(url, self.image_keys, self.caption_key)
            except OSError as e:
                raise DatasetError(f"input tar {url} cannot be read: {type(e).__name__}: {str(e)[:200]}") from None

        key = ("tar", LISTING_VERSION, url, info.get("size"), etag or info.get("mtime") or info.get("LastModified"),
               ",".join(self.image_keys), self.caption_key)
        return cached_input(key, listed, None if etag else (lambda: loc.sha256(name)))

    def _key(self, k: int, pos: int) -> str:
        key = self.listings[k]["samples"][pos][0]
        return f"{self.prefixes[k]}/{key}" if self.prefixes[k] else key

    def _refuse_duplicate_keys(self) -> None:
        refuse_repeated_ids(self, [len(x["samples"]) for x in self.listings], self._key,
                            "pass --id-prefix tar to prefix each id with its tar's path (docs/extraction.md)")

    def records(self, start: int, stop: int) -> list[Record]:
        out = []
        k = int(np.searchsorted(self.first, start, side="right")) - 1
        j = start
        while j < stop:
            listing = self.listings[k]
            for pos in range(j - int(self.first[k]), min(len(listing["samples"]), stop - int(self.first[k]))):
                out.append(_tar_record(j, listing, pos, self.caption_key, self.image_keys, self.prefixes[k]))
                j += 1
            k += 1
        return out

    def warnings(self) -> list[str]:
        said = [f"warning: {x['url']}: {x['problem']}; its {len(x['samples'])} samples before that are kept"
                for x in self.listings if x.get("problem")]
        said += [f"warning: {x['url']} is {x['compression']}-compressed: each batch decompresses it from its start to "
                 f"read its images (uncompressed tars are read by byte range)" for x in self.listings
                 if x.get("compression")][:1]
        return said + [f"warning: {x['url']} holds no sample" for x in self.listings if not x["samples"]]

    def identity(self) -> dict:
        shards = [{"url": x["url"], "bytes": x["bytes"], "sha256": x["sha256"], "samples": len(x["samples"]),
                   "problem": x.get("problem")} for x in self.listings]
        digest = hashlib.sha256(json.dumps(shards, sort_keys=True).encode())
        if self.id_prefix != "none":  # another prefix, other ids: another dataset (none keeps older stores' digest)
            digest.update(f"|id_prefix={self.id_prefix}".encode())
        return {"webdataset": self.pattern, "sha256": digest.hexdigest(), "image_keys": list(self.image_keys),
                "caption_key": self.caption_key, "id_prefix": self.id_prefix, "records_in_file": self.records_in_input,
                "limit": self.limit, "shards": shards}


def _lower_suffix(caption_key: str) -> str:
    """Member suffixes match whatever their case (IMG_1.TXT is a txt); a json field keeps its own."""
    head, sep, field = caption_key.partition(":")
    return head.lower() + sep + field


def _id_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "backslashreplace"), digest_size=8).digest(), "little")


def tar_prefixes(pattern: str, urls: list[str]) -> list[str]:
    """Each tar's path relative to the pattern's root (the folder before its first brace), without the tar suffix:
    '{cc,laion}/00000.tar' gives cc/00000 and laion/00000."""
    fixed = pattern.split("{", 1)[0]
    root = fixed.rpartition("/")[0] + "/" if "/" in fixed else ""
    return [re.sub(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", "", u[len(root):] if u.startswith(root) else u)
            for u in urls]


def _location_of(url: str) -> tuple[Location, str]:
    if is_url(url):
        head, _, name = url.rpartition("/")
        return Location(head), name
    p = Path(url).resolve()
    return Location(str(p.parent)), p.name


def _tar_record(j: int, listing: dict, pos: int, caption_key: str, image_keys=IMAGE_KEYS, prefix: str = "") -> Record:
    key, member, offset, size, caption, problem = listing["samples"][pos]
    sample_id = f"{prefix}/{key}" if prefix else key
    tar_name = PurePosixPath(listing["url"]).name
    image = f"{tar_name}/{member}" if member else None
    raw = llava_record(sample_id, image, caption)
    if problem is None and member is None:
        problem = f"no image member ({key}.{{{'/'.join(image_keys)}}})"
    if problem is None and caption is None:
        problem = f"no caption ({key}.{caption_key})"
    at = ("tar", listing["url"], offset, size, listing.get("compression")) if member else None
    return Record(j, sample_id, image, raw, problem, at=at)


class _Hashing:
    """A read-only stream that hashes what is read through it (a tar streamed once: listed and hashed)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        self.n += len(b)
        return b


def _member_name(name: str) -> tuple[str, str | None]:
    """(the name as text, a problem): a name that is not UTF-8 is kept with its bytes escaped (\\xe9), and its
    sample is bad, not its whole tar."""
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        escaped = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return escaped, f"the member name {escaped!r} is not UTF-8"


def list_tar(url: str, image_keys=IMAGE_KEYS, caption_key: str = "txt") -> dict:
    """{"url", "bytes", "sha256", "compression", "samples": [[key, image member, its data's offset, size, caption,
    problem]], "problem"}: one streamed pass (a gzip, bzip2 or xz tar too: offsets are then in the decompressed
    stream). A sample is a run of members sharing the name up to the first dot of its base name (webdataset's
    rule); suffixes match whatever their case. A tar that cannot be read to its end keeps the samples read before,
    and says why."""
    loc, name = _location_of(url)
    image_keys, caption_key = tuple(k.lower() for k in image_keys), _lower_suffix(caption_key)
    samples: list[list] = []
    groups: dict[str, dict] = {}
    problem, compression = None, None
    field = caption_key.split(":", 1)[1] if caption_key.startswith("json:") else None
    text_suffix = "json" if field else caption_key
    last_end, last_name = 0, None
    with loc.open(name) as f:
        hashing = _Hashing(f)
        try:
            with tarfile.open(fileobj=hashing, mode="r|*") as tf:
                compression = None if tf.fileobj.comptype == "tar" else tf.fileobj.comptype
                for m in tf:
                    last_end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    last_name = m.name
                    if not m.isfile():
                        continue
                    member, bad_name = _member_name(m.name)
                    folder, _, base = member.rpartition("/")
                    stem, _, suffix = base.partition(".")
                    suffix = suffix.lower()
                    key = f"{folder}/{stem}" if folder else stem
                    g = groups.get(key)
                    if g is None:
                        if groups:  # webdataset's grouping: a new key closes the previous sample
                            samples.append(_sample(groups.popitem()[1], image_keys, text_suffix, field))
                        g = groups[key] = {"key": key, "members": {}, "problem": None}
                    g["problem"] = g["problem"] or bad_name
                    small = suffix == text_suffix and m.size <= CAPTION_MAX
                    g["members"][suffix] = (member, m.offset_data, m.size, tf.extractfile(m).read() if small else None)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            problem = f"the tar cannot be read past {hashing.n} bytes: {type(e).__name__}: {str(e)[:200]}"
        while True:  # the rest of a damaged tar, if any, still counts in its hash
            if not hashing.read(8 << 20):
                break
    if problem is None and compression is None and hashing.n < last_end + 2 * tarfile.BLOCKSIZE:  # no end blocks
        problem = f"the tar ends at {hashing.n} bytes, after {last_name}, without its end blocks: it may be cut short"
    if groups:
        samples.append(_sample(groups.popitem()[1], image_keys, text_suffix, field))
    return {"url": url, "bytes": hashing.n, "sha256": hashing.h.hexdigest(), "compression": compression,
            "samples": samples, "problem": problem}


def _sample(g: dict, image_keys, text_suffix: str, field: str | None) -> list:
    members = g["members"]
    image = next((members[k] for k in image_keys if k in members), None)
    text = members.get(text_suffix)
    caption, problem = None, g["problem"]
    if problem is None and text is not None and text[3] is None:
        problem = f"its caption member {text[0]} is {text[2]:,} bytes, over the {CAPTION_MAX:,} a caption may have"
    elif problem is None and text is not None:
        try:
            caption = json.loads(text[3]).get(field) if field else text[3].decode("utf-8").strip()
            if field and not isinstance(caption, str):
                caption, problem = None, f"its json member has no string {field!r}"
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            problem = f"its caption member cannot be read: {type(e).__name__}"
    return [g["key"], image[0] if image else None, image[1] if image else 0, image[2] if image else 0, caption,
            problem]


def read_blob(at: tuple) -> bytes:
    """An image's bytes from an input tar (`at`: a record's ("tar", url, offset, size, compression)): one range read
    (a compressed tar: decompressed from its start); BadImage when they cannot be read (the sample is recorded as
    bad, its neighbours are not)."""
    got = read_blobs([at])[0]
    if isinstance(got, BadImage):
        raise got
    return got


def read_blobs(ats: list[tuple]) -> list[bytes]:
    """Several images' bytes from input tars (records' ("tar", url, offset, size, compression)), in order: a range
    read each, and one decompressing pass per compressed tar for all of its images (in offset order). One that
    cannot be read is a BadImage (returned, not raised: it is that sample's problem)."""
    out: list = [None] * len(ats)
    compressed: dict[tuple[str, str], list[int]] = {}
    for k, (_, url, offset, size, comp) in enumerate(ats):
        if comp:
            compressed.setdefault((url, comp), []).append(k)
            continue
        try:
            loc, name = _location_of(url)
            out[k] = loc.read_range(name, offset, offset + size)
        except Exception as e:  # a tar gone or cut short since its listing, a bucket that refuses
            out[k] = BadImage(f"image unreadable at {url}@{offset}: {type(e).__name__}: {str(e)[:200]}")
    for (url, comp), ks in compressed.items():
        _read_compressed(url, comp, sorted(ks, key=lambda k: ats[k][2]), ats, out)
    for k, (_, url, offset, size, _) in enumerate(ats):
        if isinstance(out[k], bytes) and len(out[k]) != size:
            out[k] = BadImage(f"image at {url}@{offset}: {len(out[k])} of its {size} bytes could be read (the tar is "
                              f"cut short, or changed since its listing)")
    return out


def _read_compressed(url: str, comp: str, ks: list[int], ats: list[tuple], out: list) -> None:
    import bz2
    import gzip
    import lzma

    opener = {"gz": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}[comp]
    try:
        loc, name = _location_of(url)
        with loc.open(name) as raw, opener(fileobj=raw) if comp == "gz" else opener(raw) as f:
            for k in ks:
                f.seek(ats[k][2])  # forward only: decompresses what lies between
                out[k] = f.read(ats[k][3])
    except Exception as e:
        for k in ks:
            if out[k] is None:
                out[k] = BadImage(f"image unreadable in {url} ({comp}): {type(e).__name__}: {str(e)[:200]}")
