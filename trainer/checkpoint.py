"""Checkpoints (trainable parameters, optimizer, scheduler, RNG, exact data position) and the final export.

    OUT/checkpoints/step-000500/trainable.safetensors   projector, task tokens, predictors, logit scales
                               /optimizer.pt             AdamW + LR scheduler state, torch RNG (tensors and
                                                         plain values only: loaded with weights_only=True)
                               /state.json               step, data position per rank and worker, Python and
                                                         NumPy RNG, config
    OUT/export/mm_projector.bin         LLaVA's key names: usable as --pretrain_mm_mlp_adapter
              /task_tokens.safetensors  special_{gen,depth,seg}_tokens
              /predictors.safetensors   predictors.<task>_<layer>.* and logit_scales.<task>
              /config.json              layers, token counts, widths, base model ids, teachers, store
A checkpoint is written to a temporary folder and renamed, so a crash never leaves a half one; the frozen LLM
and vision tower are never saved (they are the base ids in config.json). Nothing in a checkpoint is unpickled:
a crafted file in a checkpoint folder cannot run code on --resume.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which file and why."""


def rng_state() -> tuple[dict, dict]:
    """(JSON-able Python and NumPy generator states, torch generator tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Rank 0 only. `state` (JSON): step, micro_batches, positions {rank: {worker: next stream position}}, config."""
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}, tmp / "trainable.safetensors")
    plain_rng, tensor_rng = rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": tensor_rng},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state, "rng": plain_rng}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob(f"{PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob(f"{PREFIX}[0-9]*")) if (out_dir / "checkpoints").is_dir() else []
    return found[-1] if found else None


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restores everything in place; returns state.json's content. Tensors load through safetensors and
    `torch.load(weights_only=True)` (no unpickling of arbitrary objects), state from JSON."""
    try:
        state = json.loads((path / "state.json").read_text())
        params = load_file(path / "trainable.safetensors")
        extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete: {Path(e.filename).name} is missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path}: optimizer.pt holds more than tensors and plain values, refused "
                              f"(was it written by olaf? {str(e).splitlines()[0][:200]})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {type(e).__name__}: {str(e)[:200]}") from None
    own = dict(model.named_parameters())
    missing = [k for k in model.trainable_state_dict() if k not in params]
    unexpected = [k for k in params if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}")
    with torch.no_grad():
        for k, v in params.items():
            own[k].copy_(v)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(state.pop("rng"), extra["rng"])
    return state


def export(out_dir: Path, model, info: dict) -> Path:
    """The artefacts later stages use (rank 0)."""
    exp = out_dir / "export"
    exp.mkdir(parents=True, exist_ok=True)
    proj = {f"model.mm_projector.{k}": v.detach().cpu().clone() for k, v in model.projector.state_dict().items()}
    torch.save(proj, exp / "mm_projector.bin")
    save_file({f"special_{t}_tokens": p.detach().cpu().contiguous() for t, p in model.special_tokens.items()},
              exp / "task_tokens.safetensors")
    heads = {f"predictors.{k}": v.detach().cpu().contiguous() for k, v in model.predictors.state_dict().items()}
    heads.update({f"logit_scales.{t}": p.detach().cpu().reshape(1) for t, p in model.logit_scales.items()})
    save_file(heads, exp / "predictors.safetensors")
    (exp / "config.json").write_text(json.dumps(info, indent=1))
    return exp


def load_mm_projector(path: str | Path, module: torch.nn.Module) -> None:
    """What LLaVA's --pretrain_mm_mlp_adapter does with mm_projector.bin."""
    weights = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict({k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k})
