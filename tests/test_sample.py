"""The bundled sample generator writes real LLaVA-format data whose captions describe the pixels."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import sample
from pipeline.inputs import DATASET_JSON, IMAGE_TOKEN

# Parse captions with a grammar written here, independent of the generator's own phrase builder.
SHAPE_RE = re.compile(
    r"an? (?P<size>small|large) (?P<colour>\w+) (?P<kind>circle|square|triangle|diamond) "
    r"(?P<pos>at the top left|at the top right|at the top|on the left|in the center|on the right|"
    r"at the bottom left|at the bottom right|at the bottom)"
)
BG_RE = re.compile(r" on an? (?P<bg>\w+) background\.$")
CELLS = {
    "at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2),
    "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
    "at the bottom left": (2, 0), "at the bottom": (2, 1), "at the bottom right": (2, 2),
}
NAMED = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (245, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}
BGS = {"gray": (128, 128, 128), "beige": (215, 200, 160), "teal": (40, 120, 120)}


def nearest(rgb, palette):
    return min(palette, key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, palette[k], strict=True)))


def patch_mean(arr, x, y, r=1):
    h, w, _ = arr.shape
    x, y = int(round(x)), int(round(y))
    p = arr[max(0, y - r): min(h, y + r + 1), max(0, x - r): min(w, x + r + 1)]
    return tuple(p.reshape(-1, 3).mean(0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    sample.generate(out, num_samples=60, seed=7, bad=7, odd=7)
    return out, json.loads((out / DATASET_JSON).read_text())


def test_schema_and_unique_ids(dataset):
    out, recs = dataset
    assert isinstance(recs, list) and len(recs) == 74
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(ids)
    for r in recs:
        assert re.fullmatch(r"\d{9}", r["id"])
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[1]["value"].strip()
        if "image" in r:
            assert conv[0]["value"].count(IMAGE_TOKEN) == 1
            if not r["image"].startswith(".."):
                bucket, name = r["image"].split("/")
                assert bucket == r["id"][:5] and name.split(".")[0] == r["id"]
        else:
            assert IMAGE_TOKEN not in conv[0]["value"]


def test_normal_images_decode_and_captions_match_pixels(dataset):
    out, recs = dataset
    checked_shapes = checked_sizes = 0
    for r in recs:
        cap = r["conversations"][1]["value"]
        shapes = [m.groupdict() for m in SHAPE_RE.finditer(cap)]
        bg = BG_RE.search(cap)
        if not shapes or not bg or cap.startswith(("a black and white", "a single")) or r.get("image", "..").startswith(".."):
            continue
        path = out / "images" / r["image"]
        if not path.is_file() or path.stat().st_size < 200:
            continue  # the --bad kinds; covered below
        try:
            img = Image.open(path).convert("RGB")
        except Exception:
            continue  # truncated or not an image: a bad record, checked in test_bad_records
        arr = np.asarray(img).astype(np.float64)
        h, w, _ = arr.shape
        if max(w, h) / min(w, h) > 4:
            continue  # extreme aspect odd image: cells too thin to probe reliably
        cw, ch = w / 3, h / 3
        used = set()
        for s in shapes:
            row, col = CELLS[s["pos"]]
            used.add((row, col))
            cx, cy = (col + 0.5) * cw, (row + 0.5) * ch
            assert nearest(patch_mean(arr, cx, cy), NAMED | BGS) == s["colour"], (r["id"], cap, s)
            checked_shapes += 1
            # size: a point 0.3 cell above the centre is inside a large shape and outside a small one
            if min(cw, ch) >= 60:
                probe = nearest(patch_mean(arr, cx, cy - 0.3 * min(cw, ch)), NAMED | BGS)
                assert (probe == s["colour"]) == (s["size"] == "large"), (r["id"], cap, s, probe)
                checked_sizes += 1
        free = [c for c in CELLS.values() if c not in used]
        row, col = free[0]
        assert nearest(patch_mean(arr, (col + 0.5) * cw, (row + 0.5) * ch), NAMED | BGS) == bg["bg"]
    assert checked_shapes >= 60 and checked_sizes >= 20


def test_odd_images_decode_and_bad_ones_are_really_bad(dataset):
    out, recs = dataset
    modes = set()
    failures = {}
    for r in recs:
        if "image" not in r:
            failures[r["id"]] = "text_only"
            continue
        path = (out / "images" / r["image"])
        if r["image"].startswith(".."):
            failures[r["id"]] = "escapes"
            continue
        try:
            with Image.open(path) as im:
                modes.add(im.mode)
                im.convert("RGB").load()
        except FileNotFoundError:
            failures[r["id"]] = "missing"
        except Image.DecompressionBombError:
            failures[r["id"]] = "bomb"
        except Exception as e:  # truncated, not an image, empty
            failures[r["id"]] = type(e).__name__
    assert len(failures) == 7
    assert {"text_only", "escapes", "missing", "bomb"} <= set(failures.values())
    assert {"L", "P", "RGBA", "CMYK", "I;16", "RGB"} <= modes


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sample.generate(a, 12, seed=1, bad=2, odd=2)
    sample.generate(b, 12, seed=1, bad=2, odd=2)
    sample.generate(c, 12, seed=2, bad=2, odd=2)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_mixed_sizes_and_aspect_ratios(dataset):
    out, recs = dataset
    sizes = set()
    for r in recs[:40]:
        p = out / "images" / r.get("image", "-")
        if p.is_file() and p.stat().st_size > 200:
            try:
                sizes.add(Image.open(p).size)
            except Exception:
                pass
    ratios = {round(w / h, 1) for w, h in sizes}
    assert len(sizes) >= 15 and len(ratios) >= 4


def test_cli_rejects_nothing_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([str(tmp_path / "x"), "--num-samples", "0"])
    assert e.value.code == 2
    assert "nothing to generate" in capsys.readouterr().err
