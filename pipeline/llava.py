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
    in_file = len(data)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        data = data[:limit]

    problems: list[str] = []
    records: list[Record] = []
    first_seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            problems.append(f"record {i}: not a JSON object ({type(rec).__name__})")
            continue
        rid = rec.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid.strip():
            problems.append(f"record {i}: missing or empty 'id'")
            continue
        if rid != rid.strip() or any(c in rid for c in "\n\r\t\0"):
            problems.append(f"record {i}: id {rid!r} has surrounding whitespace or control characters")
            continue
        try:  # every store writes ids as UTF-8 (Zarr keys, tar names, JSON): a lone surrogate cannot be
            rid.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"record {i}: id {rid!r} is not valid Unicode text (a lone surrogate): it cannot be stored")
            continue
        if rid in first_seen:
            problems.append(f"record {i}: duplicate id {rid!r} (first at record {first_seen[rid]})")
            continue
        first_seen[rid] = i
        conv = rec.get("conversations")
        if conv is not None and not isinstance(conv, list):
            problems.append(f"record {i} (id {rid}): 'conversations' is not a list")
            continue
        image = rec.get("image")
        records.append(Record(index=i, id=rid, image=image if isinstance(image, str) and image else None, raw=rec,
                              problem=conversation_problem(conv)))

    if problems:
        shown = problems[:max_problems]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DatasetError(
            f"{path}: {len(problems)} structural problem(s); fix the file before extracting:\n  "
            + "\n  ".join(shown)
            + more
        )
    if not records:
        raise DatasetError(f"{path}: the dataset has no records")
    return records, in_file

