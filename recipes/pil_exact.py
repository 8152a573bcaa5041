"""The recipes' PIL ops re-done in torch, bit-exactly, so that the resizes can run on the teachers' device.

Why: at real target sizes the resizes are most of the data path's CPU work (the seg recipe alone, 768 bicubic
then 800 bilinear, is ~20 CPU ms per image), which on a 16-core GPU node is the ceiling, not the GPU. Moved to
the device they cost ~1% of its time, and the decode workers ship one decoded RGB image per sample instead of
three resized ones (~4x fewer bytes through Ray's object store).

Why it is exact and not "close": Pillow's 8-bit resampling (src/libImaging/Resample.c) is two separable passes of
integer arithmetic. Per output position it computes float64 filter weights (`precompute_coeffs`), normalises
them, rounds them to 22-bit fixed point (`normalize_coeffs_8bpc`), and accumulates uint8 pixel x int32 weight
in an int32 starting at 1 << 21; the result is `acc >> 22` clamped to 0..255 (`clip8`); the horizontal pass
runs first and its uint8 output feeds the vertical one (whose source rows are those the vertical weights use).
Here the weights are computed with the same float64 operations in the same order (numpy does IEEE float64
exactly like C without FMA contraction), and the passes are integer gathers and sums in torch, which are exact
on any device. The one thing that could differ is a Pillow built to fuse multiply-adds in its weight code
(possible on aarch64): `self_check` compares against the installed Pillow before a job uses this path.

Only the ops and filters the recipes need: resize, resize_shortest_edge, center_crop; bilinear, bicubic, box
(hamming and lanczos call libm's sin/cos, whose last bit is not guaranteed equal to numpy's; nearest is a
different algorithm in Pillow). Anything else raises `Unsupported`, and the job resizes that recipe on the CPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from recipes.imageops import Op, center_crop_geometry, check_resize, shortest_edge_size

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 bits of result, 2 bits of headroom for negative lobes and overshoot


class Unsupported(ValueError):
    """An op or filter this module does not reproduce exactly."""


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Pillow's bicubic (Keys, a = -0.5); the expressions keep the C code's evaluation order
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "box": (_box, 0.5)}


@functools.lru_cache(maxsize=8192)  # image sizes repeat a lot in a crawl; one table is ~10-100 kB
def coefficients(in_size: int, out_size: int, resample: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's taps for one axis: (first source index per output (out,) int64, fixed-point weights (out, K)
    int32, zero past each output's last tap)."""
    if resample not in FILTERS:
        raise Unsupported(f"resample {resample!r} is not reproduced on the device (supported: {', '.join(FILTERS)})")
    fn, filter_support = FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    w = np.where(used, fn(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss), 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # sequential, as the C loop adds them (numpy's sum is pairwise)
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))
    return xmin, np.where(used, fixed, 0).astype(np.int32)


GATHER_ELEMENTS = 1 << 25  # int32 elements one fused gather may materialise (128 MB); larger passes go in chunks


def _pass(x: torch.Tensor, in_size: int, out_size: int, resample: str, dim: int) -> torch.Tensor:
    """One of Pillow's passes along `dim` (0: rows, vertical; 1: columns, horizontal) of uint8 (H, W, 3): per
    output line, the K source lines it uses, weighted, summed in int32, shifted and clamped as `clip8` does.
    One gather, one multiply and one sum per chunk of output lines: few kernel launches on a GPU."""
    xmin, fixed = coefficients(in_size, out_size, resample)
    k = fixed.shape[1]
    src = x.transpose(0, 1) if dim == 1 else x  # lines to combine along dim 0: (in, other, 3)
    src = src.to(torch.int32)
    idx = torch.from_numpy(np.minimum(xmin[:, None] + np.arange(k), in_size - 1)).to(x.device)  # (out, K)
    weights = torch.from_numpy(fixed).to(x.device)[:, :, None, None]
    line = src.shape[1] * src.shape[2]
    step = max(1, GATHER_ELEMENTS // max(1, k * line))
    parts = []
    for lo in range(0, out_size, step):
        hi = min(out_size, lo + step)
        taps = src.index_select(0, idx[lo:hi].reshape(-1)).view(hi - lo, k, src.shape[1], src.shape[2])
        acc = (taps * weights[lo:hi]).sum(dim=1, dtype=torch.int32) + (1 << (PRECISION_BITS - 1))
        parts.append((acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.transpose(0, 1) if dim == 1 else out


def pillow_version() -> str:
    import PIL

    return PIL.__version__


def pillow_major() -> int:
    return int(pillow_version().split(".")[0])


def horizontal_first(width: int, height: int, out_width: int, out_height: int, pillow: int | None = None) -> bool:
    """Which pass Pillow runs first (the first pass's uint8 output is the second's input, so the order shows in
    the pixels). Up to Pillow 12 -- the authors' environment pins Pillow 10.2 -- always the horizontal one;
    Pillow 13 runs the vertical one first when the height shrinks by more than twice as many pixels as the width
    (src/libImaging/Resample.c, ImagingResampleInner)."""
    if (pillow if pillow is not None else pillow_major()) < 13:
        return True
    return not (height - out_height > 0 and height - out_height > (width - out_width) * 2)


def resize(x: torch.Tensor, width: int, height: int, resample: str, pillow: int | None = None) -> torch.Tensor:
    """PIL `img.resize((width, height), resample)` of an RGB uint8 (H, W, 3) tensor, bit-exact for Pillow
    major version `pillow` (default: the installed one)."""
    h, w = x.shape[0], x.shape[1]
    if (w, h) == (width, height):
        return x
    check_resize((w, h), (width, height))
    passes = [(w, width, 1), (h, height, 0)]
    if not horizontal_first(w, h, width, height, pillow):
        passes.reverse()
    for in_size, out_size, dim in passes:
        if in_size != out_size:
            x = _pass(x, in_size, out_size, resample, dim)
    return x


def center_crop(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """imageops.center_crop (transformers' rule, black padding when the image is smaller) on a tensor."""
    h, w = x.shape[0], x.shape[1]
    (cw, ch), (pad_left, pad_top), (left, top) = center_crop_geometry(w, h, width, height)
    if (cw, ch) != (w, h):
        canvas = torch.zeros((ch, cw, x.shape[2]), dtype=x.dtype, device=x.device)
        canvas[pad_top:pad_top + h, pad_left:pad_left + w] = x
        x = canvas
    return x[top:top + height, left:left + width]


def apply(x: torch.Tensor, op: Op) -> torch.Tensor:
    p = op.params
    if op.op == "resize":
        return resize(x, p["width"], p["height"], p["resample"])
    if op.op == "resize_shortest_edge":
        return resize(x, *shortest_edge_size(x.shape[1], x.shape[0], p["size"], p.get("max_size")), p["resample"])
    if op.op == "center_crop":
        return center_crop(x, p["width"], p["height"])
    raise Unsupported(f"op {op.op!r} is not reproduced on the device")


def apply_ops(x: torch.Tensor, ops: tuple[Op, ...]) -> torch.Tensor:
    """imageops.apply_ops on a uint8 (H, W, 3) tensor, on its device: the same uint8 result."""
    for op in ops:
        x = apply(x, op)
    return x.contiguous()


def supports(ops: tuple[Op, ...]) -> bool:
    return all(op.op in ("resize", "resize_shortest_edge", "center_crop") and
               op.params.get("resample", "bilinear") in FILTERS for op in ops)


def self_check(ops_by_task: dict[str, tuple[Op, ...]], device: str | torch.device, seed: int = 0) -> list[str]:
    """Run every recipe here and with the installed Pillow on images of awkward sizes; the tasks whose results
    differ (empty: the device path is exact for this Pillow)."""
    from PIL import Image

    from recipes.imageops import apply_ops as pil_apply_ops

    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (7, 300), (333, 500), (500, 333), (640, 480), (1024, 77), (801, 799)]
    bad = []
    for task, ops in ops_by_task.items():
        for w, h in sizes:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            want = pil_apply_ops(Image.fromarray(arr, "RGB"), ops)
            got = apply_ops(torch.from_numpy(arr).to(device), ops).cpu().numpy()
            if got.shape != want.shape or not np.array_equal(got, want):
                bad.append(task)
                break
    return bad
