"""The LLaVA-Pretrain-558K dataset format (SPEC section 1), in one place.

A JSON list of records
    {"id": "004539375", "image": "00453/004539375.jpg",
     "conversations": [{"from": "human", "value": "...\\n<image>"}, {"from": "gpt", "value": "<caption>"}]}
with images under an image folder at the record's relative `image` path.
The record's `id` is the sample key everywhere in olaf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATASET_JSON = "blip_laion_cc_sbu_558k.json"
IMAGE_TOKEN = "<image>"


def bucket_of(sample_id: str) -> str:
    """LLaVA-Pretrain stores image `004539375` under the folder `00453/`."""
    return sample_id[:5]


def image_relpath(sample_id: str, ext: str = "jpg") -> str:
    return f"{bucket_of(sample_id)}/{sample_id}.{ext}"


class DatasetError(ValueError):
    """The dataset file is structurally unusable; the message lists every problem found."""


@dataclass(frozen=True)
class Record:
    """One dataset record, as the pipeline carries it (the raw JSON object is kept verbatim)."""

    index: int  # position in the dataset file
    id: str
    image: str | None  # relative path, or None for a text-only record
    raw: dict
    problem: str | None = None  # why the record cannot be a training sample (it is stored as a bad sample)
    blob: tuple | None = None  # (url, offset, size, compression) of its image's bytes in an input tar
    # (store url, shard, offset, size): its sample in a committed shard of the store, whose image a shard gaining
    # tasks computes from (never the input again)
    stored: tuple[str, int, int, int] | None = None

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


def _id_problem(rid) -> str | None:
    if not isinstance(rid, str) or not rid.strip():
        return "missing or empty 'id'"
    if rid != rid.strip() or any(c in rid for c in "\n\r\t\0"):
        return f"id {rid!r} has surrounding whitespace or control characters"
    try:  # every store writes ids as UTF-8 (Zarr keys, tar names, JSON): a lone surrogate cannot be
        rid.encode("utf-8")
    except UnicodeEncodeError:
        return f"id {rid!r} is not valid Unicode text (a lone surrogate): it cannot be stored"
    return None


def _record(i: int, rec, first_seen: dict[str, int]) -> tuple[Record | None, str | None]:
    """(the record, None) or (None, the structural problem of record `i`)."""
    if not isinstance(rec, dict):
        return None, f"record {i}: not a JSON object ({type(rec).__name__})"
    rid = rec.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    problem = _id_problem(rid)
    if problem:
        return None, f"record {i}: {problem}"
    if rid in first_seen:
        return None, f"record {i}: duplicate id {rid!r} (first at record {first_seen[rid]})"
    first_seen[rid] = i
    conv = rec.get("conversations")
    if conv is not None and not isinstance(conv, list):
        return None, f"record {i} (id {rid}): 'conversations' is not a list"
    image = rec.get("image")
    return Record(index=i, id=rid, image=image if isinstance(image, str) and image else None, raw=rec,
                  problem=conversation_problem(conv)), None


def record_of(i: int, rec) -> tuple[Record | None, str | None]:
    """One record of a listing read line by line: (the record, None) or (None, its structural problem);
    duplicate ids are the caller's to find."""
    record, problem = _record(i, rec, {})
    return record, problem.removeprefix(f"record {i}: ") if problem else None


def load_records(path: str | Path, limit: int | None = None, max_problems: int = 50) -> tuple[list[Record], int]:
    """Read and structurally validate a LLaVA JSON file.

    Structural problems (not a JSON list, a record that is not an object, a record without a usable id,
    duplicate ids, conversations that are not a list) make the whole dataset unusable: they are all collected
    and raised together as one DatasetError, before any work starts. Per-sample problems (missing or bad images,
    text-only records) are not checked here; the pipeline records them as bad samples.

    `limit` keeps a prefix of the records (smoke runs); validation covers only that prefix.
    Returns (records, number of records in the file).
    """
    path = Path(path)
    data = _read_json(path)
    in_file = len(data)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        data = data[:limit]
    problems: list[str] = []
    records: list[Record] = []
    first_seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        record, problem = _record(i, rec, first_seen)
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



# ---- any image folder (or a COCO caption file) as a LLaVA-format dataset -----------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PROBE_QUERY = "Describe the image in two lines."  # the paper's probing query (Sec. 3)


def _conversation(query: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{query}"}, {"from": "gpt", "value": answer}]


def _printable(path: str) -> str:
    """A path as JSON can carry it (a name that is not UTF-8 shows its bytes escaped)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _image_files(root: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """(relative path, path) of every regular image file under `root`, in path order, and what was skipped: files
    that are not images by their extension, entries that are not regular files (a symlink to a device, a FIFO),
    links that leave the folder, names no store can hold (not UTF-8, surrounding spaces, control characters)."""
    files, skipped = [], []
    real_root = root.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": _printable(rel), "reason": f"not an image file ({path.suffix or 'no extension'})"})
            continue
        resolved = path.resolve()
        if real_root not in resolved.parents:
            skipped.append({"path": _printable(rel), "reason": "a link that leaves the image folder"})
        elif not resolved.is_file():
            skipped.append({"path": _printable(rel), "reason": "not a regular file (a device, a FIFO, a broken link)"})
        elif problem := _id_problem(rel) or _id_problem(rel[: -len(path.suffix)]):
            skipped.append({"path": _printable(rel), "reason": f"its name cannot be stored: {problem}"})
        else:
            files.append((rel, path))
    return files, skipped


def _from_folder(files: list[tuple[str, Path]], query: str) -> tuple[list[dict], list[dict]]:
    records, skipped, seen = [], [], {}
    for rel, path in files:
        rid = rel[: -len(path.suffix)]
        if rid in seen:
            skipped.append({"path": rel, "reason": f"same id {rid!r} as {seen[rid]} (names differ only in extension)"})
            continue
        seen[rid] = rel
        records.append({"id": rid, "image": rel, "conversations": _conversation(query, "")})
    return records, skipped


def _coco_images(coco: Path) -> tuple[list, dict]:
    try:
        data = json.loads(coco.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{coco}: not a readable COCO annotation file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{coco}: not a COCO annotation file (no 'images' list)")
    captions: dict = {}
    for a in data.get("annotations") or []:
        if isinstance(a, dict) and isinstance(a.get("caption"), str):
            captions.setdefault(a.get("image_id"), []).append(a["caption"].strip())
    return data["images"], captions


def _from_coco(files: list[tuple[str, Path]], coco: Path, query: str) -> tuple[list[dict], list[dict]]:
    """COCO's images that are in the folder, by file name; every entry that cannot be one sample is skipped with
    its reason (not an object, no usable id, a repeated id, a name found twice in the folder, a file not there)."""
    images, captions = _coco_images(coco)
    by_name: dict[str, list[str]] = {}
    for rel, path in files:
        by_name.setdefault(path.name, []).append(rel)
    records, skipped, seen = [], [], set()
    for k, img in enumerate(images):
        name, iid = (img.get("file_name"), img.get("id")) if isinstance(img, dict) else (None, None)
        where = {"path": name if isinstance(name, str) else None, "coco_entry": k}
        reason = None
        if not isinstance(img, dict):
            reason = f"not an object ({type(img).__name__})"
        elif isinstance(iid, bool) or not isinstance(iid, int | str) or _id_problem(str(iid)):
            reason = f"no usable 'id' ({iid!r})"
        elif str(iid) in seen:
            reason = f"id {iid!r} repeats an earlier image's"
        elif not isinstance(name, str) or not by_name.get(name):
            reason = f"in {coco.name} but not under the image folder"
        elif len(by_name[name]) > 1:
            reason = f"{name} is in the folder {len(by_name[name])} times ({', '.join(by_name[name][:3])}): ambiguous"
        if reason:
            skipped.append({**where, "reason": reason})
            continue
        seen.add(str(iid))
        records.append({"id": str(iid), "image": by_name[name][0],
                        "conversations": _conversation(query, (captions.get(iid) or [""])[0])})
    return records, skipped


def records_from_images(images_dir: str | Path, query: str = PROBE_QUERY, coco: str | Path | None = None
                        ) -> tuple[list[dict], list[dict]]:
    """(records, skipped) for every image file under `images_dir`, nested folders included, in path order.

    The id is the image's path relative to the folder without its extension ("val2017/000000000139"), so two
    files of one name in different folders stay two samples; two files that differ only in extension
    ("a.jpg", "a.png") would share an id: the second is skipped and said why, as is every file that is not an
    image by its extension, not a regular file, or named so that no store can hold it. With `coco` (a COCO
    captions annotation file) the images are those the file names, the id is the COCO image id, and the answer
    is its first caption; an entry that cannot be one sample is skipped and said why. Images are not decoded
    here: extraction records the undecodable ones. Everything returned can be extracted."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    files, skipped = _image_files(root)
    records, more = _from_coco(files, Path(coco), query) if coco is not None else _from_folder(files, query)
    return records, skipped + more


def main(argv=None) -> int:
    import argparse
    import sys

    from store import StoreError, atomic_write, refuse_inside_store

    p = argparse.ArgumentParser(prog="python -m pipeline.llava", description="LLaVA-format datasets from other sources")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-images", help="an image folder (nested) or a COCO caption file -> a LLaVA JSON that "
                                           "pipeline.extract_teachers reads with --image-folder IMAGES_DIR")
    f.add_argument("images_dir")
    f.add_argument("--query", default=PROBE_QUERY, help=f"the human turn's text (default: {PROBE_QUERY!r})")
    f.add_argument("--coco", help="a COCO captions annotation file (e.g. captions_val2017.json): its images, ids and "
                                  "first captions")
    f.add_argument("--out", required=True, help="the LLaVA JSON to write; skipped files go to OUT.skipped.jsonl")
    a = p.parse_args(argv)
    try:
        refuse_inside_store(a.out, "--out")
        records, skipped = records_from_images(a.images_dir, a.query, a.coco)
    except (DatasetError, StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no image under {a.images_dir} ({len(skipped)} files skipped)", file=sys.stderr)
        return 2
    out, side = Path(a.out), Path(a.out + ".skipped.jsonl")
    # built whole, then written whole: a failure leaves an existing --out as it was
    atomic_write(out, json.dumps(records, ensure_ascii=False, indent=0).encode("utf-8"))
    atomic_write(side, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped).encode("utf-8"))
    print(f"wrote {out}: {len(records)} images" + (f"; {len(skipped)} files skipped, see {side}" if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
