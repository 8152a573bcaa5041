"""Write a small dataset in the exact LLaVA-Pretrain format, with synthetic but meaningful images.

    python -m pipeline.sample OUT_DIR --num-samples 64 [--seed 0] [--bad 6] [--odd 6]

Each image is a simple scene: one to three shapes (circle, square, triangle, diamond) of a named colour and
size, each centred in one cell of a 3x3 grid, on a plain background; sizes and aspect ratios vary like real
photos. The caption describes exactly that scene ("a large red circle at the top left and a small blue square
in the center on a gray background."), so a tiny PT run has something real to learn and tests can check that
captions match pixels. Output is deterministic for a seed.

`--bad N` adds N records that a real crawl also has (missing file, truncated JPEG, not an image, empty file,
a path escaping the image folder, a text-only record, a decompression bomb); `--odd N` adds N valid images in
awkward modes (grayscale, palette, RGBA, CMYK, 16-bit, 1 pixel, extreme aspect ratio). Both are placed at
seeded random positions so that they share shards and batches with good samples.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.inputs import DATASET_JSON, IMAGE_TOKEN
from pipeline.llava import image_relpath
from store import StoreError, refuse_inside_store

# Saturated, well-separated colours: the nearest palette entry to a drawn pixel is unambiguous after JPEG.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (215, 200, 160),
    "teal": (40, 120, 120),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.22, "large": 0.42}  # radius as a fraction of the cell's shorter side
# 3x3 grid cells, row-major; the phrase is how the caption names the cell.
POSITIONS = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
PHRASE_TO_CELL = {v: k for k, v in POSITIONS.items()}
# The instruction phrasings of LLaVA-Pretrain; the image token goes before or after, as in the real file.
PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
ASPECTS = (0.5, 0.6, 0.75, 1.0, 1.0, 1.33, 1.5, 1.78, 2.0)
BAD_KINDS = ("missing", "truncated", "not_an_image", "empty", "escapes_folder", "text_only", "bomb")
ODD_KINDS = ("grayscale", "palette", "rgba", "cmyk", "16bit", "one_pixel", "extreme_aspect")
BOMB_SIDE = 20_000  # 400 Mpx in a ~50 kB PNG: over any sane decode cap


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: tuple[int, int]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        parts = [s.phrase() for s in self.shapes]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{body} on a {self.background} background."


def cell_box(scene_w: int, scene_h: int, cell: tuple[int, int]) -> tuple[float, float, float, float]:
    """(centre x, centre y, cell width, cell height) of a grid cell."""
    cw, ch = scene_w / 3, scene_h / 3
    row, col = cell
    return (col + 0.5) * cw, (row + 0.5) * ch, cw, ch


def random_scene(rng: random.Random, long_side: int | None = None, aspect: float | None = None) -> Scene:
    long_side = long_side or rng.randint(180, 640)
    aspect = aspect or rng.choice(ASPECTS)  # width / height
    if aspect >= 1:
        w, h = long_side, max(8, round(long_side / aspect))
    else:
        w, h = max(8, round(long_side * aspect)), long_side
    n = rng.choice((1, 1, 2, 2, 3))
    cells = rng.sample(sorted(POSITIONS), n)
    cells.sort()  # caption reads the scene top-left to bottom-right
    background = rng.choice(sorted(BACKGROUNDS))
    shapes = tuple(
        Shape(kind=rng.choice(SHAPES), colour=rng.choice(sorted(COLOURS)), size=rng.choice(sorted(SIZES)), cell=c)
        for c in cells
    )
    return Scene(width=w, height=h, background=background, shapes=shapes)


def draw_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, cw, ch = cell_box(scene.width, scene.height, s.cell)
        r = SIZES[s.size] * min(cw, ch)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            q = r * 0.85
            d.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        elif s.kind == "triangle":
            # centroid at the cell centre: the centre pixel is always inside
            d.polygon([(cx, cy - r), (cx - r * 0.866, cy + r * 0.5), (cx + r * 0.866, cy + r * 0.5)], fill=fill)
        elif s.kind == "diamond":
            d.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(s.kind)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def conversation(rng: random.Random, caption: str) -> list[dict]:
    prompt = rng.choice(PROMPTS)
    human = f"{IMAGE_TOKEN}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{IMAGE_TOKEN}"
    return [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]


def _odd_image(kind: str, rng: random.Random) -> tuple[Image.Image | bytes, str, str]:
    """A valid image in an awkward mode: (image or encoded bytes, file extension, caption)."""
    if kind == "one_pixel":
        colour = rng.choice(sorted(COLOURS))
        return Image.new("RGB", (1, 1), COLOURS[colour]), "png", f"a single {colour} pixel."
    if kind == "extreme_aspect":
        scene = random_scene(rng, long_side=1200, aspect=rng.choice((12.0, 1 / 12.0)))
        return draw_scene(scene), "jpg", scene.caption()
    scene = random_scene(rng)
    img = draw_scene(scene)
    caption = scene.caption()
    if kind == "grayscale":
        return img.convert("L"), "jpg", "a black and white picture of " + caption
    if kind == "palette":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "png", caption
    if kind == "rgba":
        rgba = img.convert("RGBA")
        rgba.putalpha(255)
        return rgba, "png", caption
    if kind == "cmyk":
        return img.convert("CMYK"), "jpg", caption
    if kind == "16bit":
        g16 = img.convert("L").convert("I").point(lambda v: v * 256)  # spread to the 16-bit range
        return g16.convert("I;16"), "png", "a black and white picture of " + caption
    raise ValueError(kind)


def _bad_record(kind: str, sample_id: str, images: Path, rng: random.Random) -> dict:
    """A record whose image is broken in one of the ways a real crawl is; returns the record."""
    rel = image_relpath(sample_id)
    path = images / rel
    scene = random_scene(rng)
    rec = {"id": sample_id, "image": rel, "conversations": conversation(rng, scene.caption())}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        pass  # referenced, never written
    elif kind == "truncated":
        full = jpeg_bytes(draw_scene(scene))
        path.write_bytes(full[: len(full) // 3])
    elif kind == "not_an_image":
        path.write_bytes(b"<html><body>404 Not Found</body></html>\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "escapes_folder":
        rec["image"] = f"../outside_{sample_id}.jpg"
        (images.parent / f"outside_{sample_id}.jpg").write_bytes(jpeg_bytes(draw_scene(scene)))
    elif kind == "text_only":
        del rec["image"]
        rec["conversations"][0]["value"] = rec["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
    elif kind == "bomb":
        rec["image"] = image_relpath(sample_id, "png")
        (images / rec["image"]).write_bytes(png_bytes(Image.new("1", (BOMB_SIDE, BOMB_SIDE))))
    else:  # pragma: no cover
        raise ValueError(kind)
    return rec


def generate(out_dir: str | Path, num_samples: int, seed: int = 0, bad: int = 0, odd: int = 0) -> Path:
    """Write OUT_DIR/blip_laion_cc_sbu_558k.json and OUT_DIR/images/<bucket>/<id>.jpg; returns the JSON path.

    `num_samples` normal samples, plus `bad` broken and `odd` awkward-but-valid ones interleaved at seeded
    positions.
    """
    if num_samples < 0 or bad < 0 or odd < 0:
        raise ValueError("counts must be >= 0")
    if num_samples + bad + odd == 0:
        raise ValueError("nothing to generate: --num-samples, --bad and --odd are all 0")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total = num_samples + bad + odd
    ids = [f"{n:09d}" for n in rng.sample(range(10**9), total)]
    kinds = ["normal"] * num_samples + [("bad", BAD_KINDS[i % len(BAD_KINDS)]) for i in range(bad)]
    kinds += [("odd", ODD_KINDS[i % len(ODD_KINDS)]) for i in range(odd)]
    rng.shuffle(kinds)

    records = []
    for sample_id, kind in zip(ids, kinds, strict=True):
        if kind == "normal":
            scene = random_scene(rng)
            rel = image_relpath(sample_id)
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            (images / rel).write_bytes(jpeg_bytes(draw_scene(scene)))
            records.append({"id": sample_id, "image": rel, "conversations": conversation(rng, scene.caption())})
        elif kind[0] == "bad":
            records.append(_bad_record(kind[1], sample_id, images, rng))
        else:
            img, ext, caption = _odd_image(kind[1], rng)
            rel = image_relpath(sample_id, ext)
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            (images / rel).write_bytes(jpeg_bytes(img) if ext == "jpg" else png_bytes(img))
            records.append({"id": sample_id, "image": rel, "conversations": conversation(rng, caption)})

    json_path = out / DATASET_JSON
    json_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return json_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sample",
        description="Write a synthetic dataset in the exact LLaVA-Pretrain format (JSON + images/<bucket>/<id>.jpg). "
        "Images are simple scenes (shapes, colours, positions, sizes) with captions that describe them.",
    )
    p.add_argument("out_dir", help="output folder; gets blip_laion_cc_sbu_558k.json and images/")
    p.add_argument("--num-samples", "-n", type=int, default=64, help="number of normal samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--bad", type=int, default=0, help="add N broken records (missing, truncated, not an image, ...)")
    p.add_argument("--odd", type=int, default=0, help="add N valid images in awkward modes (grayscale, CMYK, ...)")
    args = p.parse_args(argv)
    try:
        refuse_inside_store(args.out_dir, "OUT_DIR")
        path = generate(args.out_dir, args.num_samples, seed=args.seed, bad=args.bad, odd=args.odd)
    except (ValueError, StoreError) as e:
        p.error(str(e))
    total = args.num_samples + args.bad + args.odd
    print(f"wrote {total} records to {path} (images under {Path(args.out_dir) / 'images'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
