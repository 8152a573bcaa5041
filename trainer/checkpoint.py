"""Checkpoints of a run's stateful parts, after torchtitan's checkpointer: a dict of parts, each with
`state_dict()` / `load_state_dict()`, saved together and restored together.

    OUT/checkpoints/step-000500/trainable.safetensors   the model's trained tensors (projector, task tokens,
                                                         predictors, logit scales; or the probes)
                               /optimizer.pt             the torch parts: AdamW, the LR schedule, torch RNG
                                                         (tensors and plain values only: loaded with weights_only)
                               /state.json               the JSON parts: the stream's data position, Python and
                                                         NumPy RNG; the step and the config
A checkpoint is built in a temporary folder and renamed (store.atomic_path), so a crash never leaves a half one;
the frozen LLM and vision tower are never saved. Nothing in a checkpoint is unpickled: a crafted file in a
checkpoint folder cannot run code on --resume.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from store import atomic_path
from trainer.errors import TrainerError
from trainer.sharding import full, shard_as

PREFIX = "step-"


class CheckpointError(TrainerError):
    """A checkpoint that cannot be used; the message says which file and why."""


class PlainRNG:
    """Python's and NumPy's generators, as JSON."""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": [version, list(internal), gauss],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class TorchRNG:
    """torch's CPU (and CUDA) generators, as tensors."""

    def state_dict(self) -> dict:
        out = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def latest(out_dir: Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    found = sorted(root.glob(f"{PREFIX}[0-9]*")) if root.is_dir() else []
    return found[-1] if found else None


class Checkpointer:
    """`model` (its `trainable_state_dict()`), `torch_parts` ({name: stateful} -> optimizer.pt) and `json_parts`
    ({name: stateful} -> state.json); `meta`: JSON saved beside them and not restored (the config)."""

    def __init__(self, out_dir: Path, model, torch_parts: dict, json_parts: dict, keep: int, meta: dict | None = None,
                 writer: bool = True):
        self.root = Path(out_dir) / "checkpoints"
        self.model, self.torch_parts, self.json_parts, self.keep = model, torch_parts, json_parts, keep
        self.meta, self.writer = meta or {}, writer

    def save(self, step: int) -> Path:
        """Rank 0, or every rank of a sharded run (trainer.sharding): each gathers the whole tensors, the `writer`
        (rank 0) writes them, so a checkpoint is the same files whatever the sharding."""
        final = self.root / f"{PREFIX}{step:06d}"
        tensors = {k: full(v).contiguous().cpu() for k, v in self.model.trainable_state_dict().items()}
        torch_state = {k: p.state_dict() for k, p in self.torch_parts.items()}
        if not self.writer:
            return final
        with atomic_path(final) as tmp:
            tmp = Path(tmp)
            tmp.mkdir()
            save_file(tensors, tmp / "trainable.safetensors")
            torch.save(torch_state, tmp / "optimizer.pt")
            state = {"step": step, **{k: p.state_dict() for k, p in self.json_parts.items()}, **self.meta}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for old in sorted(self.root.glob(f"{PREFIX}*"))[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> tuple[int, list[str]]:
        """Restores every part in place; returns (step, notes the parts gave). Tensors load through safetensors
        and `torch.load(weights_only=True)` (no unpickling of arbitrary objects), the rest from JSON."""
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
        missing = [k for k in (*self.torch_parts, *self.json_parts) if k not in (extra if k in self.torch_parts
                                                                                   else state)]
        if missing:
            raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} state (written by an older olaf): "
                                  f"start a new --output-dir")
        self._load_model(path, params)
        for k, part in self.torch_parts.items():
            part.load_state_dict(extra[k])
        notes = []
        for k, part in self.json_parts.items():
            notes += part.load_state_dict(state[k]) or []
        return int(state["step"]), notes

    def _load_model(self, path: Path, params: dict) -> None:
        own = dict(self.model.named_parameters())
        missing = [k for k in self.model.trainable_state_dict() if k not in params]
        unexpected = [k for k in params if k not in own]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing[:4]}, unexpected "
                                  f"{unexpected[:4]}")
        with torch.no_grad():
            for k, v in params.items():
                own[k].copy_(shard_as(v, own[k]))  # a sharded run's part of it
