"""Image decoding and the PIL resizes of the original recipes, as small pure functions on the CPU.

The original OLA-VLM code resizes with PIL (`img.resize(...)` and transformers' PIL image processors), so
every op here is a PIL operation with a uint8 result, reproduced bit-exactly: the same output size rule, the
same resampling filter, no `reducing_gap`. Normalisation is not done here: uint8 arrays go to the device and
the teachers normalise there (4x fewer bytes to move than float32).

Used by the extraction's decode workers (through `teachers`), by the trainer's data workers (base encoder
preprocessing), and by the tests' references. Nothing here imports torch.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused before decoding (decompression bombs)
# What any resize of a recipe may produce: a 98-byte 4000x1 PNG resized to a shortest edge of 224 would be
# 896,000 x 224 (2.9 GB on the device path). Real recipes produce at most a few Mpx; a thin sliver of an image
# holds nothing a teacher can use.
MAX_RESIZE_PIXELS = 16_000_000
MAX_ASPECT_RATIO = 200


class BadImage(ValueError):
    """A sample's image cannot be used; the message is the reason recorded in errors.jsonl."""


def resolve_inside(image_folder: str | Path, relpath: str) -> Path:
    """The image's path, refused if it would leave the image folder (absolute paths, '..', symlinks out)."""
    root = Path(image_folder).resolve()
    if not relpath or Path(relpath).is_absolute():
        raise BadImage(f"image path {relpath!r} is not relative to the image folder")
    path = (root / relpath).resolve()
    if path != root and root not in path.parents:
        raise BadImage(f"image path {relpath!r} escapes the image folder")
    return path


def read_image_bytes(image_folder: str | Path, relpath: str, max_bytes: int = 256 << 20) -> bytes:
    path = resolve_inside(image_folder, relpath)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadImage(f"image file not found: {relpath}") from None
    except OSError as e:
        raise BadImage(f"image file unreadable: {relpath}: {e.strerror or e}") from None
    if size == 0:
        raise BadImage(f"image file is empty: {relpath}")
    if size > max_bytes:
        raise BadImage(f"image file is {size} bytes, over the {max_bytes}-byte cap: {relpath}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImage(f"image file unreadable: {relpath}: {e.strerror or e}") from None


def image_libraries() -> dict:
    """The versions the bit-exact recipes depend on: Pillow, and the libjpeg-turbo and zlib it was built with
    (their decoders and resamplers define the exact uint8 pixels)."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "zlib": features.version("zlib")}


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image, exactly like the original's `Image.open(path).convert('RGB')`.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. Grayscale, palette, alpha, CMYK and 16-bit images are converted by PIL's `convert('RGB')`, as the
    original does (alpha is dropped, not composited).
    """
    if not data:
        raise BadImage("image file is empty")
    saved = Image.MAX_IMAGE_PIXELS
    try:
        # Our own cap replaces PIL's global one (which warns at 89 Mpx and raises at 179 Mpx).
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w < 1 or h < 1:
                raise BadImage(f"image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels is over the cap of {max_pixels}")
            im.load()
            return im.convert("RGB")
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (no decoder recognises the bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated data, broken headers, bad modes
        raise BadImage(f"undecodable image: {e}") from None
    except Image.DecompressionBombError as e:  # pragma: no cover - our cap runs first
        raise BadImage(f"decompression bomb: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# ---- the recipes' geometric ops (PIL in, PIL out; sizes follow transformers' rules exactly) -------------


def shortest_edge_size(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (width, height) for a shortest-edge resize, with transformers' rounding: the rule of
    `get_resize_output_image_size(default_to_square=False, max_size=...)`, which CLIPImageProcessor uses (no
    cap) and OneFormerImageProcessor uses with `longest_edge` as the cap (transformers 4.x, the original's
    environment): the short side becomes `size` and the long side `int(size * long / short)`; if that exceeds
    `max_size`, the long side becomes `max_size` and the short side `int(max_size * size / long')`. (DETR's
    `get_size_with_aspect_ratio`, which transformers 5 moved OneFormer to, rounds differently by a pixel on
    about a quarter of capped non-square sizes; the released seg recipe resizes a square, so never caps.)"""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None:
        if max_size <= size:
            raise ValueError(f"max_size {max_size} must be larger than the short side's size {size}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def check_source(width: int, height: int) -> None:
    """Refuse (BadImage) a source image whose sides differ by more than MAX_ASPECT_RATIO: a sliver of pixels
    holds nothing a teacher can use (a policy on inputs, so not applied to each resize)."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImage(f"aspect ratio {max(width, height) / min(width, height):.0f}:1 ({width}x{height}) is over "
                       f"the cap of {MAX_ASPECT_RATIO}:1: the recipes would stretch a sliver of pixels")


def check_resize(src: tuple[int, int], out: tuple[int, int]) -> None:
    """Refuse (BadImage) a resize of a (width, height) image to `out` over MAX_RESIZE_PIXELS, before any pixel
    is made (memory, on the host or the device)."""
    (w, h), (ow, oh) = src, out
    if ow * oh > MAX_RESIZE_PIXELS:
        raise BadImage(f"a recipe would resize {w}x{h} to {ow}x{oh} = {ow * oh} pixels, over the cap of "
                       f"{MAX_RESIZE_PIXELS}")


def resize(img: Image.Image, width: int, height: int, resample: str) -> Image.Image:
    check_resize(img.size, (width, height))
    return img.resize((width, height), RESAMPLE[resample])


def resize_shortest_edge(img: Image.Image, size: int, resample: str, max_size: int | None = None) -> Image.Image:
    return resize(img, *shortest_edge_size(img.width, img.height, size, max_size), resample)


def center_crop(img: Image.Image, width: int, height: int, rounding: str = "floor") -> Image.Image:
    """transformers' centre crop: top-left corner at ((W - w) // 2, (H - h) // 2); an image smaller than the
    crop is first centred on a black canvas (padding rounded up on the top/left), as transformers does.
    `rounding="half_even"`: torchvision's CenterCrop (open_clip), corner at round((W - w) / 2)."""
    if rounding == "half_even" and img.width >= width and img.height >= height:
        left, top = int(round((img.width - width) / 2.0)), int(round((img.height - height) / 2.0))
        return img.crop((left, top, left + width, top + height))
    (canvas_w, canvas_h), (pad_left, pad_top), (left, top) = center_crop_geometry(img.width, img.height, width, height)
    if (canvas_w, canvas_h) != img.size:
        canvas = Image.new(img.mode, (canvas_w, canvas_h))
        canvas.paste(img, (pad_left, pad_top))
        img = canvas
    return img.crop((left, top, left + width, top + height))


def center_crop_geometry(img_w: int, img_h: int, width: int, height: int):
    """transformers' centre crop as numbers: (canvas size, where the image goes on it, the crop's top-left corner
    on it). The canvas is the image itself unless the image is smaller than the crop; then it is black, with the
    padding rounded up on the top/left. Shared by the PIL op here and the device op (recipes.pil_exact)."""
    canvas_w, canvas_h = max(width, img_w), max(height, img_h)
    pad_left, pad_top = -(-(canvas_w - img_w) // 2), -(-(canvas_h - img_h) // 2)
    left, top = (img_w - width) // 2 + pad_left, (img_h - height) // 2 + pad_top
    return (canvas_w, canvas_h), (pad_left, pad_top), (left, top)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of its longer side, filled with `fill`."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, fill)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


@dataclass(frozen=True)
class Op:
    """One geometric op of a recipe, as written in a teacher manifest."""

    op: str
    params: dict

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        p = self.params
        if self.op == "resize":
            return p["width"], p["height"]
        if self.op == "resize_shortest_edge":
            return shortest_edge_size(width, height, p["size"], p.get("max_size"))
        return p["width"], p["height"]  # center_crop

    def __call__(self, img: Image.Image) -> Image.Image:
        p = self.params
        if self.op == "resize":
            return resize(img, p["width"], p["height"], p["resample"])
        if self.op == "resize_shortest_edge":
            return resize_shortest_edge(img, p["size"], p["resample"], p.get("max_size"))
        if self.op == "center_crop":
            return center_crop(img, p["width"], p["height"])
        raise ValueError(f"unknown image op {self.op!r}")


OP_PARAMS = {
    "resize": ({"width", "height", "resample"}, set()),
    "resize_shortest_edge": ({"size", "resample"}, {"max_size"}),
    "center_crop": ({"width", "height"}, set()),
}


def parse_ops(specs: list[dict], where: str) -> tuple[Op, ...]:
    """Validate a manifest's `ops:` list into callables; errors name the manifest location."""
    ops = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "op" not in spec:
            raise ValueError(f"{where}[{i}]: expected a mapping with an 'op' key, got {spec!r}")
        name = spec["op"]
        if name not in OP_PARAMS:
            raise ValueError(f"{where}[{i}]: unknown op {name!r}; known: {', '.join(OP_PARAMS)}")
        required, optional = OP_PARAMS[name]
        params = {k: v for k, v in spec.items() if k != "op"}
        missing, extra = required - params.keys(), params.keys() - required - optional
        if missing or extra:
            raise ValueError(f"{where}[{i}] ({name}): missing {sorted(missing)}, unexpected {sorted(extra)}")
        if "resample" in params and params["resample"] not in RESAMPLE:
            raise ValueError(f"{where}[{i}]: unknown resample {params['resample']!r}; known: {', '.join(RESAMPLE)}")
        ops.append(Op(name, params))
    return tuple(ops)


def check_ops(ops: tuple[Op, ...], width: int, height: int) -> None:
    """A recipe's input and sizes, op after op, for a (width, height) image: BadImage for a sliver of an image
    (check_source) or where a resize would go over the pixel cap (check_resize). Sizes only: what decode runs
    before shipping an image to a device that resizes it."""
    check_source(width, height)
    for op in ops:
        out = op.output_size(width, height)
        if op.op != "center_crop":
            check_resize((width, height), out)
        width, height = out


def apply_ops(img: Image.Image, ops: tuple[Op, ...]) -> np.ndarray:
    """Run a recipe's ops on an RGB image; returns a contiguous uint8 (H, W, 3) array."""
    for op in ops:
        img = op(img)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
