"""Probing from stores (the paper's Section 3): any image folder as a dataset, probes at every layer of a frozen
MLLM for every task, one MLLM forward per batch, cosine similarity per (task, layer)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pipeline.llava import load_records
from pipeline.llava import main as llava_main


def _jpeg(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def test_from_images_takes_nested_folders_and_says_what_it_skips(tmp_path):
    root = tmp_path / "imgs"
    _jpeg(root / "a" / "cat.jpg", (255, 0, 0))
    _jpeg(root / "b" / "cat.jpg", (0, 255, 0))  # the same name in another folder: another sample
    _jpeg(root / "b" / "deep" / "dog.png", (0, 0, 255))
    _jpeg(root / "a" / "cat.png", (9, 9, 9))  # differs from a/cat.jpg only in extension: same id, skipped
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "README").write_text("no extension")
    out = tmp_path / "ds.json"
    assert llava_main(["from-images", str(root), "--out", str(out)]) == 0
    records, n = load_records(out)  # a LLaVA JSON extraction reads
    assert n == 3 and [r.id for r in records] == ["a/cat", "b/cat", "b/deep/dog"]
    assert [r.image for r in records] == ["a/cat.jpg", "b/cat.jpg", "b/deep/dog.png"]
    assert records[0].raw["conversations"][0]["value"] == "<image>\nDescribe the image in two lines."
    skipped = [json.loads(x) for x in (tmp_path / "ds.json.skipped.jsonl").read_text().splitlines()]
    assert {s["path"]: s["reason"].split(" (")[0] for s in skipped} == {
        "a/cat.png": "same id 'a/cat' as a/cat.jpg", "notes.txt": "not an image file", "b/README": "not an image file"}
    # a COCO caption file: its ids and first captions; an image it names that is not there is said
    coco = {"images": [{"id": 139, "file_name": "dog.png"}, {"id": 7, "file_name": "gone.jpg"}],
            "annotations": [{"image_id": 139, "caption": " A dog. "}, {"image_id": 139, "caption": "Another."}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert llava_main(["from-images", str(root), "--coco", str(tmp_path / "captions.json"), "--query", "Q?",
                       "--out", str(tmp_path / "coco.json")]) == 0
    coco_records, _ = load_records(tmp_path / "coco.json")
    assert [(r.id, r.image, r.caption()) for r in coco_records] == [("139", "b/deep/dog.png", "A dog.")]
    assert "gone.jpg" in (tmp_path / "coco.json.skipped.jsonl").read_text()
    assert llava_main(["from-images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2
    assert np.asarray(Image.open(root / records[2].image)).shape == (30, 40, 3)
