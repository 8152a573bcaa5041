"""Training data: the store's WebDataset stream -> model inputs, in DataLoader workers.

    TargetStream (pipeline.store: shards split by rank and worker, seeded shuffle, resumable)
      -> PTSample (here, in each worker): decode the image and resize it for the base encoder (uint8),
         tokenise the conversation with the chat template
      -> collate: pad the text on the right, stack images and targets, keep valid flags and stream positions
The trainer never reads teachers or teacher weights: targets come from the store, decoded to 16-bit tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.imageops import BadImage, center_crop, decode_rgb, pad_to_square, resize_shortest_edge
from trainer.templates import IGNORE_INDEX, PromptBuilder


@dataclass(frozen=True)
class ImageRecipe:
    """The base encoder's preprocessing, from its image processor config (LLaVA: shortest edge 336, bicubic,
    centre crop 336, CLIP mean/std; `pad` first expands to a square filled with the mean colour)."""

    size: int
    crop: int
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "square"

    @classmethod
    def from_pretrained(cls, vision_tower: str, aspect: str) -> ImageRecipe:
        from transformers import CLIPImageProcessorPil

        p = CLIPImageProcessorPil.from_pretrained(vision_tower)
        names = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos", 4: "box", 5: "hamming"}
        size = p.size.get("shortest_edge") or p.size.get("height")
        return cls(size=size, crop=p.crop_size["height"], resample=names[int(p.resample)], mean=tuple(p.image_mean),
                   std=tuple(p.image_std), aspect=aspect)

    def __call__(self, data: bytes) -> np.ndarray:
        img = decode_rgb(data)
        if self.aspect == "pad":
            img = pad_to_square(img, tuple(int(x * 255) for x in self.mean))
        img = center_crop(resize_shortest_edge(img, self.size, self.resample), self.crop, self.crop)
        return np.array(img, dtype=np.uint8)


class PTSample:
    """One stream sample -> what one row of a batch needs, or None when its image is unusable and skipped."""

    def __init__(self, builder: PromptBuilder, image: ImageRecipe, tasks: list[str], target_shapes: dict,
                 skip_bad_images: bool = True):
        self.builder, self.image, self.tasks = builder, image, tasks
        self.target_shapes, self.skip_bad = target_shapes, skip_bad_images

    def __call__(self, s: dict) -> dict | None:
        try:
            if s["image"] is None:
                raise BadImage("no image")
            pixels = self.image(s["image"])
        except BadImage:
            if self.skip_bad:
                return None
            pixels = np.zeros((self.image.crop, self.image.crop, 3), np.uint8)
            s["valid"] = {t: False for t in self.tasks}
        tok = self.builder(s["record"])
        targets = {t: s["targets"][t] if s["valid"][t] else torch.zeros(self.target_shapes[t], dtype=torch.float16)
                   for t in self.tasks}
        return {"id": s["id"], "stream": s["stream"], "pixels": torch.from_numpy(pixels),
                "prefix_ids": tok.prefix_ids, "text_ids": tok.text_ids, "text_labels": tok.text_labels,
                "targets": targets, "valid": {t: bool(s["valid"][t]) for t in self.tasks}}


def collate(rows: list[dict], pad_id: int) -> dict:
    if len({len(r["prefix_ids"]) for r in rows}) != 1:
        raise ValueError("samples of one batch have different prefix lengths: the chat template must give one")
    n = max(len(r["text_ids"]) for r in rows)
    text_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["text_ids"])
        text_ids[i, :k] = torch.tensor(r["text_ids"])
        labels[i, :k] = torch.tensor(r["text_labels"])
        mask[i, :k] = 1
    tasks = list(rows[0]["targets"])
    workers = {r["stream"][0] for r in rows}
    return {
        "ids": [r["id"] for r in rows],
        "pixels": torch.stack([r["pixels"] for r in rows]),
        "prefix_ids": torch.tensor([r["prefix_ids"] for r in rows], dtype=torch.long),
        "text_ids": text_ids, "text_mask": mask, "text_labels": labels,
        "targets": {t: torch.stack([r["targets"][t] for r in rows]) for t in tasks},
        "valid": {t: torch.tensor([r["valid"][t] for r in rows]) for t in tasks},
        # a batch comes from one worker; resuming skips that worker's stream up to the last position used
        "stream": (workers.pop(), max(r["stream"][1] for r in rows)) if len(workers) == 1 else None,
    }


def worker_init(worker_id: int) -> None:
    """DataLoader workers die with their parent (SIGKILL on its death, Linux): a trainer killed by SIGTERM or
    SIGKILL never leaves a worker behind."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
