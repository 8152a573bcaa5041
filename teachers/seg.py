"""seg: OneFormer COCO Swin-L's backbone; target = stage-4 map (25x25) bilinearly resized to 24x24, (576, 1536).

The original (`_get_seg_targets`) squashes the image to 768x768, lets OneFormerProcessor resize it to 800x800,
and takes `F.interpolate(features[-1], size=(24, 24), mode='bilinear', align_corners=False)` of the Swin
backbone. Only the backbone is loaded here (`model.pixel_level_module.encoder.*` of the checkpoint). Tokens are
the 24x24 grid in row-major order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import OneFormerConfig, SwinBackbone, SwinConfig

from recipes.manifest import TeacherSpec
from teachers.base import Teacher


class SegTeacher(Teacher):
    architecture = "oneformer_swin"
    checkpoint_prefix = "model.pixel_level_module.encoder."
    config_class = OneFormerConfig

    @classmethod
    def module_config(cls, config: OneFormerConfig, spec: TeacherSpec):
        f = spec.feature
        stage = f"stage{f.get('stage')}"
        bb = config.backbone_config
        if stage not in bb.out_features:
            raise ValueError(f"teacher 'seg': feature.stage {f.get('stage')} is not among {bb.out_features}")
        r = f.get("resize") or {}
        if r.get("mode") not in ("bilinear", "bicubic", "nearest") or "height" not in r or "width" not in r:
            raise ValueError(f"teacher 'seg': feature.resize needs height, width and mode; got {r}")
        return SwinBackbone, bb

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.spec.feature
        maps = self.model(pixel_values=x).feature_maps
        fmap = maps[self.model.config.out_features.index(f"stage{f['stage']}")]  # (B, C, 25, 25)
        r = f["resize"]
        kw = {"align_corners": bool(r.get("align_corners", False))} if r["mode"] != "nearest" else {}
        # resampled in fp32 (the original does it in the teacher's dtype): one rounding, at storage time
        out = F.interpolate(fmap.float(), size=(r["height"], r["width"]), mode=r["mode"], **kw)
        return out.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major grid


def full_config() -> OneFormerConfig:
    """shi-labs/oneformer_coco_swin_large's backbone: Swin-L, window 12, 384 px pre-training (~0.2B)."""
    return OneFormerConfig(
        backbone_config=SwinConfig(
            image_size=384, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
            window_size=12, drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
    )


def tiny_model():
    """Same patch (4), window (12) and strides (stage 4 = 25x25 on 800 px), tiny widths and one block per stage
    (two, so one shifted window, in stage 3): CPU tests run it often. The full OneFormer
    model is built and saved so that loading exercises the real checkpoint layout."""
    from transformers import OneFormerForUniversalSegmentation

    cfg = OneFormerConfig(
        backbone_config=SwinConfig(
            image_size=384, patch_size=4, embed_dim=12, depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4], window_size=12,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        hidden_dim=32, mask_dim=32, conv_dim=32, num_queries=4, text_encoder_width=32, text_encoder_num_layers=1,
        text_encoder_context_length=8, text_encoder_proj_layers=1, decoder_layers=2, encoder_layers=1,
        dim_feedforward=32, num_attention_heads=2, encoder_feedforward_dim=32, task_seq_len=8, max_seq_len=8,
        num_classes=3,
    )
    return OneFormerForUniversalSegmentation(cfg)
