"""LLaVA-format datasets made from what users have: LLaVA-Pretrain-558K's image layout (`bucket_of`,
`image_relpath`), and `from-images`: any image folder (or a COCO caption file) as a LLaVA JSON. Reading a LLaVA
JSON into records is an input kind of pipeline.inputs (`load_records`), where the format's rules live.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.inputs import IMAGE_TOKEN, DatasetError, id_problem


def bucket_of(sample_id: str) -> str:
    """LLaVA-Pretrain stores image `004539375` under the folder `00453/`."""
    return sample_id[:5]


def image_relpath(sample_id: str, ext: str = "jpg") -> str:
    return f"{bucket_of(sample_id)}/{sample_id}.{ext}"


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
        elif problem := id_problem(rel) or id_problem(rel[: -len(path.suffix)]):
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
        elif isinstance(iid, bool) or not isinstance(iid, int | str) or id_problem(str(iid)):
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
