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


def records_from_images(images_dir: str | Path, query: str = PROBE_QUERY, coco: str | Path | None = None
                        ) -> tuple[list[dict], list[dict]]:
    """(records, skipped) for every image file under `images_dir`, nested folders included, in path order.

    The id is the image's path relative to the folder without its extension ("val2017/000000000139"), so two
    files of one name in different folders stay two samples; two files that differ only in extension
    ("a.jpg", "a.png") would share an id: the second is skipped and said why, as is every file that is not an
    image by its extension. With `coco` (a COCO captions annotation file) the images are those the file names,
    the id is the COCO image id, and the answer is its first caption; an annotated image missing from the
    folder is skipped and said why. Images are not decoded here: extraction records the undecodable ones."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    skipped: list[dict] = []
    records: list[dict] = []
    if coco is not None:
        data = json.loads(Path(coco).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(f"{coco}: not a COCO annotation file (no 'images' list)")
        captions: dict[int, list[str]] = {}
        for a in data.get("annotations") or []:
            if isinstance(a, dict) and isinstance(a.get("caption"), str):
                captions.setdefault(a.get("image_id"), []).append(a["caption"].strip())
        by_name = {p.name: p for p in root.rglob("*") if p.is_file()}
        for img in sorted(data["images"], key=lambda d: d.get("id", 0)):
            name = img.get("file_name")
            path = by_name.get(name) if isinstance(name, str) else None
            if path is None:
                skipped.append({"path": name, "reason": f"in {Path(coco).name} but not under {root}"})
                continue
            records.append({"id": str(img["id"]), "image": path.relative_to(root).as_posix(),
                            "conversations": _conversation(query, (captions.get(img["id"]) or [""])[0])})
        return records, skipped
    seen: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": rel, "reason": f"not an image file ({path.suffix or 'no extension'})"})
            continue
        rid = rel[: -len(path.suffix)]
        if rid in seen:
            skipped.append({"path": rel, "reason": f"same id {rid!r} as {seen[rid]} (names differ only in extension)"})
            continue
        seen[rid] = rel
        records.append({"id": rid, "image": rel, "conversations": _conversation(query, "")})
    return records, skipped


def main(argv=None) -> int:
    import argparse
    import sys

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
        records, skipped = records_from_images(a.images_dir, a.query, a.coco)
    except (DatasetError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no image under {a.images_dir} ({len(skipped)} files skipped)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False, indent=0), encoding="utf-8")
    side = out.with_name(out.name + ".skipped.jsonl")
    side.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped), encoding="utf-8")
    print(f"wrote {out}: {len(records)} images" + (f"; {len(skipped)} files skipped, see {side}" if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
