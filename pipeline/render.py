"""Pictures of targets: PCA-to-RGB maps of token grids and a colour strip for vectors, beside the image.

A person should be able to see that the targets look like the image: the first three principal components of
a 24x24 grid of features, as RGB, show the scene's layout (objects, regions) when the teacher is real.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

PANEL = 256


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(T, W) features on a row-major grid -> (rows, cols, 3) uint8: top-3 principal components, each stretched
    between its 1st and 99th percentile."""
    x = np.asarray(tokens, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T  # (T, <=3)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    img = np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return (img.reshape(grid[0], grid[1], 3) * 255).astype(np.uint8)


def vector_strip(vec: np.ndarray, width: int, height: int = 28) -> Image.Image:
    """A vector as a strip of blue (negative) - white - red (positive) cells, scaled by its max |value|."""
    v = np.asarray(vec, dtype=np.float64).reshape(-1)
    v = v / max(np.abs(v).max(), 1e-12)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - np.maximum(pos, neg), 1 - pos], axis=-1)  # white at 0
    strip = (rgb[None] * 255).astype(np.uint8)
    return Image.fromarray(strip).resize((width, height), Image.Resampling.NEAREST)


def compose(image_bytes: bytes | None, maps: dict[str, np.ndarray], vectors: dict[str, np.ndarray], title: str) -> bytes:
    """PNG bytes: the image, then one PCA panel per map, vectors as strips underneath, with labels."""
    panels: list[tuple[str, Image.Image]] = []
    if image_bytes is not None:
        try:
            im = Image.open(io.BytesIO(image_bytes)).convert("RGB")
            im.thumbnail((PANEL, PANEL))
            canvas = Image.new("RGB", (PANEL, PANEL), (32, 32, 32))
            canvas.paste(im, ((PANEL - im.width) // 2, (PANEL - im.height) // 2))
            panels.append(("image", canvas))
        except Exception as e:  # a bad image still gets its targets rendered
            panels.append((f"image: {type(e).__name__}", Image.new("RGB", (PANEL, PANEL), (64, 0, 0))))
    for name, arr in maps.items():
        panels.append((f"{name} (PCA of {arr.shape[0]}x{arr.shape[1]} tokens)",
                       Image.fromarray(arr).resize((PANEL, PANEL), Image.Resampling.NEAREST)))
    label_h, pad = 18, 8
    title_h = 14 * (title.count("\n") + 1) + 6
    width = max(1, len(panels)) * (PANEL + pad) + pad
    height = pad + title_h + label_h + PANEL + pad + len(vectors) * (28 + label_h + pad)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.multiline_text((pad, pad), title, fill=(0, 0, 0), spacing=2)
    y = pad + title_h
    for k, (label, panel) in enumerate(panels):
        x = pad + k * (PANEL + pad)
        draw.text((x, y), label, fill=(0, 0, 0))
        out.paste(panel, (x, y + label_h))
    y += label_h + PANEL + pad
    for name, vec in vectors.items():
        draw.text((pad, y), f"{name} ({vec.size} values; blue < 0 < red)", fill=(0, 0, 0))
        out.paste(vector_strip(vec, width - 2 * pad), (pad, y + label_h))
        y += 28 + label_h + pad
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
