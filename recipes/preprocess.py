"""A recipe's geometric ops on one decoded image, to the teacher's uint8 input: with PIL on the CPU (the
original's own ops), or with `pil_exact` on any torch device (the same bytes). Normalisation is the teacher's,
on its device (teachers.base)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from recipes.imageops import apply_ops
from recipes.manifest import TeacherSpec


def _checked(spec: TeacherSpec, shape: tuple[int, ...]) -> None:
    if tuple(shape[:2]) != spec.preprocess.input_size:
        raise ValueError(
            f"teacher '{spec.task}': preprocessing gave {tuple(shape[:2])}, the manifest's input_size is "
            f"{spec.preprocess.input_size}; the ops list must end at the input size"
        )


def preprocess(spec: TeacherSpec, rgb: Image.Image) -> np.ndarray:
    """The recipe's PIL ops on a decoded RGB image: a uint8 (H, W, 3) array of the teacher's input size."""
    if rgb.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image (decode with imageops.decode_rgb), got mode {rgb.mode}")
    arr = apply_ops(rgb, spec.preprocess.ops)
    _checked(spec, arr.shape)
    return arr


def preprocess_on_device(spec: TeacherSpec, image):
    """`preprocess` of a decoded uint8 (h, w, 3) tensor, on its device, bit-identical (recipes.pil_exact)."""
    from recipes import pil_exact

    out = pil_exact.apply_ops(image, spec.preprocess.ops)
    _checked(spec, tuple(out.shape))
    return out
