"""gen: the unCLIP SD-2.1 image encoder (CLIP ViT-H/14 with projection); target = `image_embeds`, (1, 1024).

The original runs `pipe.feature_extractor(images=img)` then `pipe.image_encoder(...).image_embeds` per image.
Here the feature extractor's resize/crop are PIL ops in CPU workers (manifest), and the encoder runs batched.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from recipes.manifest import TeacherSpec
from teachers.base import Teacher


class GenTeacher(Teacher):
    architecture = "clip_vision_with_projection"
    checkpoint_prefix = ""  # the image_encoder subfolder is exactly this model
    config_class = CLIPVisionConfig

    @classmethod
    def module_config(cls, config: CLIPVisionConfig, spec: TeacherSpec):
        if spec.feature.get("output") != "image_embeds":
            raise ValueError(f"teacher 'gen': feature.output must be image_embeds, got {spec.feature}")
        return CLIPVisionModelWithProjection, config

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds[:, None, :]  # (B, 1, projection_dim)


def full_config() -> CLIPVisionConfig:
    """stabilityai/stable-diffusion-2-1-unclip/image_encoder: ViT-H/14, 224 px, projection 1024 (~0.63B)."""
    return CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
    )


def tiny_model() -> CLIPVisionModelWithProjection:
    """Same grid (224 px, patch 14), tiny widths, random weights."""
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, patch_size=14,
        image_size=224, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    return CLIPVisionModelWithProjection(cfg)
