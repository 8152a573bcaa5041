"""How target values are stored: part of the store format (the store package is the only code that knows it).

Each encoding turns a float tensor (B, T, W) into arrays that Zarr and .npy can hold, and back:

  fp16  lossless store of fp16 teacher outputs   values float16                          2 bytes/value
  bf16  lossless store of bf16 teacher outputs   values uint16 (the bf16 bit pattern)     2 bytes/value
  fp8   opt-in, half the bytes                   values uint8 (float8 e4m3fn bit pattern) 1 byte/value
                                                 + scale float32 (B, T): max|x| / 448 per token

Why fp8 and not int8 with per-token scales (both measured, `benchmarks/store.py` prints both): int8 is better
on Gaussian-like features (relative RMS error 0.8% vs 2.6%) but its error grows with the ratio of a token's
largest value to its typical one, and ViT features have exactly such outlier channels (DINOv2's "massive
activations"): with a few channels 50x larger, int8 reaches 5.4% while fp8 stays at 1.7%. fp8's error is
about the same for any distribution, so it is the 8-bit encoding the store offers; int8 stays a candidate.

numpy has no bfloat16 or float8, hence the bit patterns; encoding and decoding go through torch, which has both
(imported when they run: the store's writers and readers of raw bytes need no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Encoding:
    name: str
    values_dtype: str  # numpy dtype of the stored values
    scaled: bool  # has a per-token float32 scale array
    lossless_for: str | None  # the teacher output dtype it stores exactly, if any
    bytes_per_value: int


ENCODINGS = {
    "fp16": Encoding("fp16", "float16", False, "float16", 2),
    "bf16": Encoding("bf16", "uint16", False, "bfloat16", 2),
    "fp8": Encoding("fp8", "uint8", True, None, 1),
}
CANDIDATES = {**ENCODINGS, "int8": Encoding("int8", "int8", True, None, 1)}  # measured, not offered
LOSSLESS_FOR_DTYPE = {"float16": "fp16", "bfloat16": "bf16"}
FP8_MAX = 448.0  # largest finite float8 e4m3fn


def get(name: str, candidates: bool = False) -> Encoding:
    table = CANDIDATES if candidates else ENCODINGS
    if name not in table:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(table)}")
    return table[name]


def encode(x: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float tensor (B, T, W) on any device -> (values, scale or None) as C-contiguous CPU numpy arrays (a
    transposed teacher output would otherwise leave strided arrays, which Ray and np.save copy again)."""
    import torch

    enc = get(name, candidates=True)
    if x.ndim != 3:
        raise ValueError(f"encode expects (batch, tokens, width), got {tuple(x.shape)}")
    if name == "fp16":
        return x.to(torch.float16).contiguous().cpu().numpy(), None
    if name == "bf16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16), None
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    if name == "int8":
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8).contiguous()
        return q.cpu().numpy(), scale.squeeze(-1).contiguous().cpu().numpy()
    if name == "fp8":
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (x / scale).to(torch.float8_e4m3fn).contiguous().view(torch.uint8)
        return q.cpu().numpy(), scale.squeeze(-1).contiguous().cpu().numpy()
    raise AssertionError(enc)  # pragma: no cover


def decode(values: np.ndarray, scale: np.ndarray | None, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stored arrays -> float tensor of `dtype` (float32 by default). Works for one sample (T, W) or a batch."""
    import torch

    dtype = dtype or torch.float32
    enc = get(name, candidates=True)
    if enc.scaled and scale is None:
        raise ValueError(f"encoding {name} needs its scale array")
    v = torch.from_numpy(np.ascontiguousarray(values))
    if name == "fp16":
        return v.to(dtype)
    if name == "bf16":
        return v.view(torch.int16).view(torch.bfloat16).to(dtype)
    if name == "int8":
        out = v.float()
    else:  # fp8
        out = v.view(torch.float8_e4m3fn).float()
    return (out * torch.from_numpy(np.ascontiguousarray(scale)).float().unsqueeze(-1)).to(dtype)


def compact_dtype(name: str) -> torch.dtype:
    """The 16-bit dtype a reader hands to training without losing what the encoding stores."""
    import torch

    return torch.bfloat16 if name == "bf16" else torch.float16


def relative_rms_error(x: torch.Tensor, name: str) -> float:
    """||decode(encode(x)) - x|| / ||x|| over the whole tensor."""
    values, scale = encode(x, name)
    y = decode(values, scale, name)
    return float((y - x.float().cpu()).norm() / x.float().cpu().norm().clamp_min(1e-30))
