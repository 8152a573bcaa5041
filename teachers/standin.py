"""Shape-true stand-ins: cheap random teachers that emit the real target shapes (gen 1x1024, depth 576x1024,
seg 576x1536), so the whole data path -- decode and the real recipes' resizes, Ray transport, encoding, both
writes, hashing -- can be measured at real target sizes on any machine (`benchmarks/extract.py --shape-true`).

    python -m teachers.tiny OUT --shape-true       # writes OUT/teachers.yaml with these, recipes unchanged

A stand-in average-pools the normalised input, then one strided convolution maps each patch to the target
width (a Perceiver-free, attention-free ~0.1-0.2 GMAC per image); grids are resized to the target grid as the
real seg teacher does (bilinear, align_corners=False). Built and saved with the transformers machinery
(PretrainedConfig / PreTrainedModel), so loading, hashing and identity run the real code. Targets are meaningless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

from recipes.manifest import TeacherSpec
from teachers.base import Teacher


class StandInConfig(PretrainedConfig):
    model_type = "olaf_shape_true_stand_in"

    def __init__(self, pool: int = 1, kernel: int = 14, width: int = 1024, **kw):
        super().__init__(**kw)
        self.pool, self.kernel, self.width = pool, kernel, width


class StandInModel(PreTrainedModel):
    config_class = StandInConfig
    base_model_prefix = "stand_in"

    def __init__(self, config: StandInConfig):
        super().__init__(config)
        self.proj = torch.nn.Conv2d(3, config.width, config.kernel, stride=config.kernel)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data.normal_(0.0, 0.02)
            module.bias.data.zero_()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(pixel_values, self.config.pool) if self.config.pool > 1 else pixel_values
        return self.proj(x)  # (B, width, rows, cols)


class StandInTeacher(Teacher):
    architecture = "shape_true_stand_in"
    checkpoint_prefix = ""
    config_class = StandInConfig

    @classmethod
    def module_config(cls, config: StandInConfig, spec: TeacherSpec):
        if config.width != spec.output_shape[1]:
            raise ValueError(f"teacher '{spec.task}': stand-in width {config.width}, target width {spec.output_shape[1]}")
        return StandInModel, config

    def features(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model(x)
        tokens = self.spec.output_shape[0]
        if tokens == 1:
            return fmap.mean(dim=(2, 3))[:, None, :]
        side = int(round(tokens ** 0.5))
        if fmap.shape[-2:] != (side, side):
            fmap = F.interpolate(fmap.float(), size=(side, side), mode="bilinear", align_corners=False)
        return fmap.flatten(2).transpose(1, 2)  # row-major tokens


# task -> (pool, kernel): input size / (pool * kernel) = the teacher's own grid (gen: one pooled vector)
GEOMETRY = {"gen": (14, 16), "depth": (2, 7), "seg": (4, 8)}


def build(task: str, width: int) -> StandInModel:
    pool, kernel = GEOMETRY[task]
    return StandInModel(StandInConfig(pool=pool, kernel=kernel, width=width))
