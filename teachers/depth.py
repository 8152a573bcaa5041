"""depth: Depth-Anything-V2-Large's DINOv2-L backbone; target = mean of blocks 4/11/17/23, (576, 1024).

The original (`_get_dav2_feats`) takes `get_intermediate_layers(x, [4, 11, 17, 23], norm=True)` of its own
DINOv2 on a 336x336 input, drops CLS and averages the four. transformers' Dinov2Backbone gives the same
hidden states (out_indices are 1-based there, the embeddings being index 0) with one difference that matters:
the original resamples the 37x37 position embeddings with `scale_factor=(24 + 0.1) / 37` (DINOv2's
interpolate_offset), transformers with `size=24`. `after_load` therefore replaces the position embeddings with
the original's 24x24 resampling, computed once in fp32; transformers then uses them as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import DepthAnythingConfig, Dinov2Backbone, Dinov2Config

from recipes.manifest import TeacherSpec
from teachers.base import Teacher


def original_pos_embed(pos: torch.Tensor, grid_h: int, grid_w: int, offset: float, antialias: bool) -> torch.Tensor:
    """DINOv2's own `interpolate_pos_encoding` for a (grid_h, grid_w) patch grid: (1, 1 + N, D) -> (1, 1 + h*w, D)."""
    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if grid_h == side and grid_w == side:
        return pos
    dim = pos.shape[-1]
    patch = pos[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        patch, scale_factor=((grid_h + offset) / side, (grid_w + offset) / side), mode="bicubic", antialias=antialias
    )
    if tuple(out.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"position-embedding resampling gave {tuple(out.shape[-2:])}, expected {(grid_h, grid_w)}")
    out = out.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([pos[:, :1].float(), out], dim=1).to(pos.dtype)


class DepthTeacher(Teacher):
    architecture = "depth_anything_dinov2"
    checkpoint_prefix = "backbone."
    config_class = DepthAnythingConfig

    @classmethod
    def module_config(cls, config: DepthAnythingConfig, spec: TeacherSpec):
        f = spec.feature
        blocks = f.get("blocks")
        if not blocks or f.get("reduce") != "mean" or not f.get("drop_cls", False):
            raise ValueError(f"teacher 'depth': feature needs blocks, reduce: mean, drop_cls: true; got {f}")
        bb = config.backbone_config.to_dict()
        n_layers = bb["num_hidden_layers"]
        if max(blocks) >= n_layers or min(blocks) < 0:
            raise ValueError(f"teacher 'depth': blocks {blocks} outside the backbone's {n_layers} blocks")
        bb.update(out_indices=[b + 1 for b in blocks], out_features=None, apply_layernorm=bool(f.get("layernorm")),
                  reshape_hidden_states=False)
        return Dinov2Backbone, Dinov2Config.from_dict(bb)

    def after_load(self) -> None:
        interp = self.spec.feature.get("pos_embed_interpolation")
        if not interp:
            return  # transformers' own resampling
        if interp.get("mode") != "bicubic":
            raise ValueError(f"teacher 'depth': only bicubic pos_embed_interpolation is known, got {interp}")
        h, w = self.spec.preprocess.input_size
        patch = self.model.config.patch_size
        emb = self.model.embeddings
        new = original_pos_embed(emb.position_embeddings.data, h // patch, w // patch,
                                 float(interp.get("offset", 0.0)), bool(interp.get("antialias", False)))
        emb.position_embeddings = torch.nn.Parameter(new, requires_grad=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model(pixel_values=x).feature_maps  # each (B, 1 + N, D), final LayerNorm applied
        total = maps[0]
        for m in maps[1:]:  # the original's left-to-right sum, then / 4
            total = total + m
        return (total / len(maps))[:, 1:]


def full_config() -> DepthAnythingConfig:
    """depth-anything/Depth-Anything-V2-Large-hf: DINOv2-L/14 backbone (~0.3B), 518 px position grid."""
    return DepthAnythingConfig(
        backbone_config=Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
            image_size=518, layerscale_value=1.0, out_indices=[5, 12, 18, 24], apply_layernorm=True,
            reshape_hidden_states=False,
        ),
        reassemble_hidden_size=1024, neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256,
    )


def tiny_model():
    """Same depth (24 blocks, so the real block indices apply) and grid (patch 14, 37x37 positions), width 32."""
    from transformers import DepthAnythingForDepthEstimation

    cfg = DepthAnythingConfig(
        backbone_config=Dinov2Config(
            hidden_size=32, num_hidden_layers=24, num_attention_heads=2, mlp_ratio=2, patch_size=14,
            image_size=518, layerscale_value=1.0, out_indices=[5, 12, 18, 24], apply_layernorm=True,
            reshape_hidden_states=False,
        ),
        reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=8, head_hidden_size=8,
    )
    return DepthAnythingForDepthEstimation(cfg)
