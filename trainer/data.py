"""Training data: the store's WebDataset stream -> model inputs, in DataLoader workers.

    TargetStream (store: the global order, this rank's micro-batches, each built by one worker)
      -> PTSample (here, in each worker): decode the image and resize it for the base encoder (uint8),
         tokenise the conversation with the chat template
      -> collate: pad the text on the right, stack images and targets, keep ids and valid flags
The trainer never reads teachers or teacher weights: targets come from the store, decoded to 16-bit tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recipes.imageops import BadImage, center_crop, decode_rgb, pad_to_square, resize, resize_shortest_edge
from store import encodings
from trainer.templates import IGNORE_INDEX, PromptBuilder

ASPECTS = ("square", "pad")  # LLaVA's image_aspect_ratio values olaf reproduces


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

    crop_rounding: str = "floor"  # where an odd crop margin goes: transformers floors, torchvision rounds
    pre_resize: int | None = None  # first resize to pre_resize^2 (PIL bicubic): the probes' evaluation (640)

    @classmethod
    def from_pretrained(cls, vision_tower: str, aspect: str) -> ImageRecipe:
        from trainer import towers

        if towers.is_convnext(vision_tower):  # open_clip's Resize(res, bicubic) + CenterCrop(res), OpenAI stats
            _, res = towers.split_convnext_name(vision_tower)
            return cls(size=res, crop=res, resample="bicubic", mean=towers.OPENAI_MEAN, std=towers.OPENAI_STD,
                       aspect=aspect, crop_rounding="half_even")
        from transformers import CLIPImageProcessorPil

        p = CLIPImageProcessorPil.from_pretrained(vision_tower)
        names = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos", 4: "box", 5: "hamming"}
        size = p.size.get("shortest_edge") or p.size.get("height")
        return cls(size=size, crop=p.crop_size["height"], resample=names[int(p.resample)], mean=tuple(p.image_mean),
                   std=tuple(p.image_std), aspect=aspect)

    def __call__(self, data: bytes) -> np.ndarray:
        img = decode_rgb(data)
        if self.pre_resize:  # their eval_probe_dsg.py: image.resize((640, 640)), PIL's default filter (bicubic)
            img = resize(img, self.pre_resize, self.pre_resize, "bicubic")
        if self.aspect == "pad":
            img = pad_to_square(img, tuple(int(x * 255) for x in self.mean))
        img = center_crop(resize_shortest_edge(img, self.size, self.resample), self.crop, self.crop, self.crop_rounding)
        return np.array(img, dtype=np.uint8)


class PTSample:
    """One stream sample -> what one row of a batch needs. A sample whose image cannot be used here (it decoded
    at extraction, or it would not be in the order) keeps its row, so micro-batches stay what the global order
    says: its pixels are zeros, its targets invalid and its text unlabelled, so it adds nothing to any loss."""

    def __init__(self, builder: PromptBuilder, image: ImageRecipe, tasks: list[str], layouts: dict):
        """`layouts`: the store's TaskLayout per task; a row without a valid target gets zeros of the shape and
        dtype the store's valid targets decode to (fp16, or bf16 for bf16 stores), so a batch keeps one dtype."""
        self.builder, self.image, self.tasks = builder, image, tasks
        self.zeros = {t: (tuple(layouts[t].shape), encodings.compact_dtype(layouts[t].encoding)) for t in tasks}

    def __call__(self, s: dict) -> dict:
        tok = self.builder(s["record"])
        labels, valid, problem = tok.text_labels, dict(s["valid"]), None
        try:
            if s["image"] is None:
                raise BadImage("no image")
            pixels = self.image(s["image"])
        except BadImage as e:
            problem = f"image unusable in the trainer: {e}"
            pixels = np.zeros((self.image.crop, self.image.crop, 3), np.uint8)
            valid = dict.fromkeys(self.tasks, False)
            labels = [IGNORE_INDEX] * len(labels)
        targets = {t: s["targets"][t] if valid[t] else torch.zeros(self.zeros[t][0], dtype=self.zeros[t][1])
                   for t in self.tasks}
        return {"id": s["id"], "position": s["position"], "pixels": torch.from_numpy(pixels),
                "prefix_ids": tok.prefix_ids, "text_ids": tok.text_ids, "text_labels": labels,
                "targets": targets, "valid": {t: bool(valid[t]) for t in self.tasks}, "problem": problem}


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
    return {
        "ids": [r["id"] for r in rows],
        "problems": {r["id"]: r["problem"] for r in rows if r["problem"]},
        "pixels": torch.stack([r["pixels"] for r in rows]),
        "has_image": torch.tensor([r["problem"] is None for r in rows]),
        "prefix_ids": torch.tensor([r["prefix_ids"] for r in rows], dtype=torch.long),
        "text_ids": text_ids, "text_mask": mask, "text_labels": labels,
        "targets": {t: torch.stack([r["targets"][t] for r in rows]) for t in tasks},
        "valid": {t: torch.tensor([r["valid"][t] for r in rows]) for t in tasks},
    }


def die_with_parent(parent: int | None = None) -> None:
    """This process gets SIGKILL when its parent dies (Linux): nothing the parent started outlives it. `parent`:
    the pid the parent had before it started this process; a parent that died before this call (a trainer
    stopped while its workers were still starting) is then seen too, where getppid() would already name init."""
    import ctypes
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        parent = os.getppid() if parent is None else parent
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the call
            os.kill(os.getpid(), signal.SIGKILL)


def worker_init(parent: int, worker_id: int) -> None:
    """DataLoader workers die with their trainer (`parent`, its pid, bound before the workers start: the loop
    passes functools.partial(worker_init, os.getpid())): a trainer killed by SIGTERM or SIGKILL never leaves a
    worker behind, even one still starting."""
    die_with_parent(parent)


def to_device(batch: dict, device: torch.device) -> dict:
    """The tensors the model reads, on the device (non-blocking from pinned memory), plus where the micro-batch
    sits in its global batch."""
    out = {k: batch[k].to(device, non_blocking=True)
           for k in ("pixels", "has_image", "prefix_ids", "text_ids", "text_mask", "text_labels") if k in batch}
    out["targets"] = {t: x.to(device, non_blocking=True) for t, x in batch["targets"].items()}
    out["valid"] = {t: v.to(device, non_blocking=True) for t, v in batch["valid"].items()}
    out["row_offset"] = batch["row_offset"]
    return out
