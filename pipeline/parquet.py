"""Parquet inputs: `--data-path 'in/*.parquet'` (local or s3://), img2dataset's parquet output and HF datasets'
parquet exports.

    image     bytes in a column (img2dataset's `jpg`; HF's Image feature, a struct {bytes, path}), or a relative
              path under --image-folder (a string column, or the struct's path when it holds no bytes)
    caption   a string column (img2dataset's `caption`, HF's `text`)
    id        a string or integer column (img2dataset's `key`), or, without one, `<file stem>/<row>`

The columns are found by name (`--image-column`, `--caption-column`, `--id-column`; by default the first present of
IMAGE_COLUMNS, CAPTION_COLUMNS, ID_COLUMNS). Each file is listed once (its row groups' sizes, its ids, its size and
sha256) and the listing cached on the node as a tar's is (`inputs.cached_input`); the dataset's identity is the
files' sizes and sha256s. Records are read row group by row group without the image column; a decode reads a
batch's images with one read of the image column per row group. A row without a usable image, caption or id is a
recorded bad sample; ids repeated across the files are refused as a tar's are.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import numpy as np

from pipeline.inputs import (
    DatasetError,
    Record,
    Source,
    _location_of,
    cached_input,
    expand_braces,
    id_problem,
    input_file,
    llava_record,
    refuse_repeated_ids,
)
from recipes.imageops import BadImage

IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg", "img")
CAPTION_COLUMNS = ("caption", "txt", "text")
ID_COLUMNS = ("key", "id")
LISTING_VERSION = 1


def expand(pattern: str) -> list[str]:
    """The files a pattern names: braces, then globs (local or any fsspec URL), sorted."""
    import fsspec

    out = []
    for p in expand_braces(pattern):
        fs, path = fsspec.core.url_to_fs(p)
        found = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        proto = p.split("://", 1)[0] + "://" if "://" in p else ""
        out += [proto + f if proto and not f.startswith(proto) else f for f in found]
    return out


def _open(url: str):
    import pyarrow.parquet as pq

    loc, name = _location_of(url)
    return pq.ParquetFile(loc.open(name))


def pick(names: list[str], given: str | None, options: tuple, what: str, url: str, required: bool = True) -> str | None:
    if given:
        if given not in names:
            raise DatasetError(f"{url}: no column {given!r} (--{what}-column); it has {', '.join(names)}")
        return given
    found = next((c for c in options if c in names), None)
    if found is None and required:
        raise DatasetError(f"{url}: no {what} column among {', '.join(options)}; it has {', '.join(names)}: name it "
                           f"with --{what}-column")
    return found


class ParquetFiles(Source):
    kind = "parquet"

    def __init__(self, pattern: str, image_folder: str | None, shard_size: int, limit: int | None,
                 columns: tuple = (None, None, None), threads: int = 8):
        self.pattern, self.image_folder, self.limit = pattern, image_folder, limit
        self.given = tuple(columns)
        urls = expand(pattern)
        if not urls:
            raise DatasetError(f"--data-path {pattern!r} names no parquet file")
        with ThreadPoolExecutor(threads) as pool:
            self.listings = list(pool.map(self._listing, urls))
        self.count([x["rows"] for x in self.listings], limit, "the parquet files hold no row")
        self._refuse_duplicate_ids()

    def _listing(self, url: str) -> dict:
        """The file's listing, from this machine's cache when the file has not changed, else listed now."""
        loc, name, info, etag = input_file(url, "parquet", self.pattern)

        def listed() -> dict:
            try:
                return self._list(url, loc.sha256(name), int(info.get("size") or 0))
            except DatasetError:
                raise
            except Exception as e:  # not parquet, cut short, unreadable
                raise DatasetError(f"input parquet {url} cannot be read: {type(e).__name__}: {str(e)[:200]}") from None

        key = ("parquet", LISTING_VERSION, url, info.get("size"), etag or info.get("mtime") or info.get("LastModified"),
               *[c or "" for c in self.given])
        return cached_input(key, listed, None if etag else (lambda: loc.sha256(name)))

    def _list(self, url: str, sha256: str, size: int) -> dict:
        f = _open(url)
        names = f.schema_arrow.names
        image = pick(names, self.given[0], IMAGE_COLUMNS, "image", url)
        caption = pick(names, self.given[1], CAPTION_COLUMNS, "caption", url)
        ident = pick(names, self.given[2], ID_COLUMNS, "id", url, required=False)
        groups = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
        ids = [None if v is None else str(v) for v in f.read(columns=[ident]).column(0).to_pylist()] if ident else None
        return {"url": url, "bytes": size, "sha256": sha256, "rows": sum(groups), "row_groups": groups,
                "columns": {"image": image, "caption": caption, "id": ident}, "ids": ids}

    def _id(self, k: int, row: int) -> str:
        x = self.listings[k]
        given = x["ids"][row] if x["ids"] is not None else None
        return given if given is not None else f"{PurePosixPath(x['url']).stem}/{row:09d}"

    def _refuse_duplicate_ids(self) -> None:
        refuse_repeated_ids(self, [x["rows"] for x in self.listings], self._id, "--id-column names another column")

    def records(self, start: int, stop: int) -> list[Record]:
        out = []
        k = int(np.searchsorted(self.first, start, side="right")) - 1
        j = start
        while j < stop:
            lo = j - int(self.first[k])
            hi = min(self.listings[k]["rows"], stop - int(self.first[k]))
            out += self._file_records(k, lo, hi, j)
            j += hi - lo
            k += 1
        return out

    def _file_records(self, k: int, lo: int, hi: int, first_index: int) -> list[Record]:
        """Records of rows [lo, hi) of file k: its caption column and, for an image given as a path, the image
        column, read by row group (never the image bytes)."""
        x = self.listings[k]
        cols = x["columns"]
        f = _open(x["url"])
        starts = np.r_[0, np.cumsum(x["row_groups"])]
        out = []
        for g in range(len(x["row_groups"])):
            a, b = max(lo, int(starts[g])), min(hi, int(starts[g + 1]))
            if a >= b:
                continue
            captions = f.read_row_group(g, columns=[cols["caption"]]).column(0).to_pylist()
            paths, path_only = self._paths(f, g, cols["image"])
            for row in range(a, b):
                at_row = row - int(starts[g])
                out.append(self._record(first_index + row - lo, k, row, g, at_row, captions[at_row],
                                        paths[at_row] if paths is not None else None, path_only))
        return out

    @staticmethod
    def _paths(f, g: int, column: str) -> tuple[list | None, bool]:
        """(each row's image path, or None where its bytes are in the file; whether the column holds paths only): a
        string column's paths, an HF Image struct's path where it holds no bytes; nothing for a bytes column."""
        import pyarrow as pa

        kind = f.schema_arrow.field(column).type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return f.read_row_group(g, columns=[column]).column(0).to_pylist(), True
        if pa.types.is_struct(kind) and "path" in [kind.field(i).name for i in range(kind.num_fields)]:
            rows = f.read_row_group(g, columns=[column]).column(0).to_pylist()
            return [v.get("path") if v is not None and not v.get("bytes") else None for v in rows], False
        return None, False

    def _record(self, index: int, k: int, row: int, g: int, at_row: int, caption, path, path_only: bool) -> Record:
        x = self.listings[k]
        sid, name = self._id(k, row), f"{PurePosixPath(x['url']).name}#{row}"
        problem = id_problem(sid)
        if problem is None and (not isinstance(caption, str) or not caption.strip()):
            problem = f"no caption in column {x['columns']['caption']!r} (row {row})"
        at = ("parquet", x["url"], g, at_row, x["columns"]["image"])
        if path is not None or path_only:
            name, at = path or name, self._folder_at(path, row)
            if isinstance(at, str):
                problem, at = problem or at, None
        return Record(index, sid, name, llava_record(sid, name, caption if isinstance(caption, str) else None),
                      problem, at)

    def _folder_at(self, path, row: int):
        """("folder", root, path) of an image given as a relative path, or why it cannot be read."""
        if not path:
            return f"no image path (row {row})"
        if "://" in path:
            return f"image {path!r} is a URL: olaf reads no URL, download the images first (img2dataset)"
        if not self.image_folder:
            return f"image {path!r} is a path: give --image-folder, the folder it is relative to"
        return ("folder", str(self.image_folder), path)

    def identity(self) -> dict:
        files = [{"url": x["url"], "bytes": x["bytes"], "sha256": x["sha256"], "rows": x["rows"]}
                 for x in self.listings]
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"parquet": self.pattern, "sha256": digest, "columns": self.listings[0]["columns"],
                "image_folder": str(self.image_folder) if self.image_folder else None,
                "records_in_file": self.records_in_input, "limit": self.limit, "files": files}


def read_images(ats: list[tuple]) -> list:
    """Images' bytes from parquet files (records' ("parquet", url, row group, row, column)), in order: one read of
    the image column per (file, row group). One that cannot be read is a BadImage (returned: that sample's
    problem)."""
    out: list = [None] * len(ats)
    groups: dict[tuple, list[int]] = {}
    for k, (_, url, g, _, column) in enumerate(ats):
        groups.setdefault((url, g, column), []).append(k)
    files: dict[str, object] = {}
    for (url, g, column), ks in groups.items():
        try:
            if url not in files:
                files[url] = _open(url)
            values = files[url].read_row_group(g, columns=[column]).column(0).to_pylist()
        except Exception as e:  # the file gone or changed since its listing
            for k in ks:
                out[k] = BadImage(f"image unreadable in {url} (row group {g}): {type(e).__name__}: {str(e)[:200]}")
            continue
        for k in ks:
            v = values[ats[k][3]] if ats[k][3] < len(values) else None
            v = v.get("bytes") if isinstance(v, dict) else v
            out[k] = bytes(v) if isinstance(v, bytes | bytearray) and v else \
                BadImage(f"no image bytes in column {column!r} (row {ats[k][3]} of row group {g} of {url})")
    return out
