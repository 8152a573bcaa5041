"""What every teacher adapter shares: device-side normalisation, batched forward, loading and identity.

The recipe's resizes (recipes.preprocess) give uint8 arrays, in CPU workers or on the device; the teacher gets
uint8 (4x fewer bytes than float32), normalises the whole batch in one go, and runs one forward for it.
"""

from __future__ import annotations

import hashlib

import torch

from recipes.manifest import TeacherSpec
from teachers.weights import load_config, load_model, tensors_sha256


class Teacher(torch.nn.Module):
    """A frozen teacher: uint8 (B, H, W, 3) batch in, (B, tokens, width) float32 targets out.

    Subclasses define `architecture`, `checkpoint_prefix`, `build(config_folder)` (the module, from the
    checkpoint's config) and `features(x)` (normalised (B, 3, H, W) input -> (B, tokens, width)).
    """

    architecture: str = ""
    checkpoint_prefix: str = ""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, weights_sha256: str):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256

    # ---- construction -------------------------------------------------------------------------------------
    config_class: type = object  # the checkpoint's (top-level) HF config class

    @classmethod
    def module_config(cls, config, spec: TeacherSpec) -> tuple[type, object]:  # pragma: no cover - abstract
        """(model class, its config) of the part of the checkpoint the target needs; validates spec.feature."""
        raise NotImplementedError

    @classmethod
    def load(cls, spec: TeacherSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Resolve the weights (HF id or local path), build only the needed module, fill it from the checkpoint."""
        config = load_config(cls.config_class, spec.weights, spec.task)
        model_cls, sub_config = cls.module_config(config, spec)
        model = load_model(model_cls, sub_config, spec.weights, spec.task, cls.checkpoint_prefix)
        teacher = cls(spec, model, tensors_sha256(model.state_dict()))
        teacher.after_load()
        return teacher.to(device=device, dtype=dtype)

    @classmethod
    def random(cls, spec: TeacherSpec, config, device="cpu", dtype=torch.float32, seed: int = 0):
        """A random-weight teacher from a config object (tests and benchmarks at full size; no download).

        transformers' own initialisation takes ~40 s for the three full-size models on 2 cores, and even a plain
        normal_ fill ~20 s; tiling one seeded N(0, 0.02) block over the weights (norm weights 1, biases 0) gives
        the same shapes and well-scaled activations in about a second."""
        from transformers.initialization import no_init_weights

        model_cls, sub_config = cls.module_config(config, spec)
        with no_init_weights():
            model = model_cls(sub_config)
        block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) * 0.02
        with torch.no_grad():
            for i, (name, p) in enumerate(model.named_parameters()):
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name and p.ndim == 1:
                    p.fill_(1.0)
                else:
                    n, start = p.numel(), (i * 7919) % block.numel()  # a different phase per tensor
                    reps = -(-(n + start) // block.numel())
                    p.view(-1).copy_(block.repeat(reps)[start:start + n])
        identity = hashlib.sha256(f"random:{cls.architecture}:{seed}:{sub_config.to_json_string()}".encode())
        teacher = cls(spec, model, "random-" + identity.hexdigest())
        teacher.after_load()
        return teacher.to(device=device, dtype=dtype)

    def after_load(self) -> None:
        """Hook for fixes that must happen on the loaded weights before any cast (see the depth teacher)."""

    def identity(self) -> dict:
        """Recipe + weights: what the store records for this teacher and readers compare."""
        return {
            "task": self.spec.task,
            "architecture": self.architecture,
            "weights": self.spec.weights.to_dict(),
            "weights_sha256": self.weights_sha256,
            "recipe_sha256": self.spec.recipe_hash(),
        }

    # ---- compute ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device -> normalised (B, 3, H, W) in the model's dtype."""
        pre = self.spec.preprocess
        x = pixels.permute(0, 3, 1, 2).float()
        if pre.channel_order == "BGR":
            x = x.flip(1)
        # mean/std apply to the channel positions the network sees (after any R/B swap), as in the original
        mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
        return ((x * pre.rescale - mean) / std).to(self.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:3]) != self.spec.preprocess.input_size:
            raise ValueError(
                f"teacher '{self.spec.task}' expects uint8 (B, {self.spec.preprocess.input_size[0]}, "
                f"{self.spec.preprocess.input_size[1]}, 3), got {pixels.dtype} {tuple(pixels.shape)}"
            )
        out = self.features(self.normalize(pixels)).float()
        if tuple(out.shape[1:]) != self.spec.output_shape:
            raise ValueError(
                f"teacher '{self.spec.task}' produced {tuple(out.shape[1:])}, the manifest says {self.spec.output_shape}"
            )
        return out
