"""The frozen base encoders OLA-VLM was published with, behind one interface: `features(pixels) -> (B, T, C)`.

  * CLIP-ViT-L/14-336 (`openai/clip-vit-large-patch14-336`, transformers' CLIPVisionModel): the patch tokens
    (CLS dropped) of hidden layer `vision_select_layer` (-2), 24 x 24 = 576 tokens of width 1024.
  * CLIP-ConvNeXT-XXL (`laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768`), as the original's
    clip_convnext_encoder.py feeds it: the open_clip checkpoint's image trunk (timm ConvNeXt) at the resolution
    the name's `-resNNN` says (768), its last stage's output (stride 32: 24 x 24 = 576 tokens of width 3072),
    flattened row-major, no interpolation; `vision_select_layer` does not apply. olaf runs the trunk as
    transformers' ConvNextModel (the same layers: stem conv 4/4 + LayerNorm, stages of downsample LayerNorm +
    conv 2/2 and blocks dwconv 7 -> LayerNorm -> Linear -> GELU -> Linear -> layer scale), its weights converted
    from the checkpoint's timm names on load (`timm_to_hf`), so neither open_clip nor timm (both need
    torchvision) is a dependency. Preprocessing: open_clip's Resize(768, bicubic) + CenterCrop(768), whose crop
    offset rounds half to even (torchvision) where transformers' floors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# timm's ConvNeXt geometries of the open_clip towers (timm.models.convnext: convnext_xxlarge uses norm_eps 1e-5)
CONVNEXT = {
    "convnext_xxlarge": {"depths": [3, 4, 30, 3], "hidden_sizes": [384, 768, 1536, 3072], "layer_norm_eps": 1e-5},
    "convnext_large": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536], "layer_norm_eps": 1e-6},
}
CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TRUNK = "visual.trunk."


def is_convnext(name: str) -> bool:
    return "convnext" in name.lower()


def split_convnext_name(name: str) -> tuple[str, int]:
    """'laion/CLIP-convnext_xxlarge-...-soup-res768' -> ('laion/CLIP-convnext_xxlarge-...-soup', 768), as the
    original parses it (default 768)."""
    m = re.search(r"-res(\d+)", name)
    return (name[: m.start()] + name[m.end():], int(m.group(1))) if m else (name, 768)


# timm ConvNeXt trunk names <-> transformers ConvNextModel names ({i}: stage, {j}: block)
_NAMES = [("stem.0.", "embeddings.patch_embeddings."), ("stem.1.", "embeddings.layernorm."),
          ("stages.{i}.downsample.", "encoder.stages.{i}.downsampling_layer."),
          ("stages.{i}.blocks.{j}.conv_dw.", "encoder.stages.{i}.layers.{j}.dwconv."),
          ("stages.{i}.blocks.{j}.norm.", "encoder.stages.{i}.layers.{j}.layernorm."),
          ("stages.{i}.blocks.{j}.mlp.fc1.", "encoder.stages.{i}.layers.{j}.pwconv1."),
          ("stages.{i}.blocks.{j}.mlp.fc2.", "encoder.stages.{i}.layers.{j}.pwconv2."),
          ("stages.{i}.blocks.{j}.gamma", "encoder.stages.{i}.layers.{j}.layer_scale_parameter")]


def _rename(key: str, to_hf: bool) -> str:
    for timm, hf in _NAMES:
        src, dst = (timm, hf) if to_hf else (hf, timm)
        pattern = "^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        m = re.match(pattern, key)
        if m and (src.endswith(".") or key == m.group(0)):
            return dst.format(**m.groupdict()) + key[m.end():]
    raise KeyError(f"{key}: not a ConvNeXt trunk tensor name")


def timm_to_hf(key: str) -> str:
    """A timm ConvNeXt trunk key -> transformers' ConvNextModel key."""
    return _rename(key, to_hf=True)


def hf_to_timm(key: str) -> str:
    return _rename(key, to_hf=False)


class CLIPTower(nn.Module):
    def __init__(self, model, select_layer: int):
        super().__init__()
        self.model, self.select_layer = model, select_layer
        c = model.config
        self.hidden_size, self.num_tokens = c.hidden_size, (c.image_size // c.patch_size) ** 2

    @property
    def dtype(self):
        return self.model.dtype

    def features(self, x: torch.Tensor) -> torch.Tensor:
        hs = self.model(pixel_values=x.to(self.dtype), output_hidden_states=True).hidden_states
        return hs[self.select_layer][:, 1:]  # patch tokens, CLS dropped

    def export_state(self) -> dict[str, torch.Tensor]:
        """Its tensors as the original's CLIPVisionTower names them under `vision_tower.`."""
        return dict(self.model.state_dict())


class ConvNextTower(nn.Module):
    def __init__(self, model, image_size: int, head_norm: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_sizes[-1]
        self.num_tokens = (image_size // 32) ** 2
        # the trunk's head.norm: not on the feature path, but part of the tower the authors' checkpoints hold
        self.head_norm = dict(head_norm or {})

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x.to(self.dtype)).last_hidden_state  # (B, C, H/32, W/32)
        return out.flatten(2).transpose(1, 2)  # row-major tokens

    def export_state(self) -> dict[str, torch.Tensor]:
        """timm's names, as the original's CLIPConvNextVisionTower holds the trunk (head.norm included)."""
        out = {hf_to_timm(k): v for k, v in self.model.state_dict().items()}
        out.update({TRUNK_HEAD_NORM + k: v.to(self.dtype) for k, v in self.head_norm.items()})
        return out


def _convnext_files(repo_or_dir: str) -> tuple[dict, Path]:
    """(open_clip_config.json, checkpoint path) from a local folder or an HF repo (cache / HF_HUB_OFFLINE)."""
    folder = Path(repo_or_dir)
    if folder.is_dir():
        found = [folder / n for n in CHECKPOINTS if (folder / n).is_file()]
        if not (folder / "open_clip_config.json").is_file() or not found:
            raise OSError(f"{folder} has no open_clip_config.json and {' or '.join(CHECKPOINTS)}")
        return json.loads((folder / "open_clip_config.json").read_text()), found[0]
    from huggingface_hub import hf_hub_download

    config = json.loads(Path(hf_hub_download(repo_or_dir, "open_clip_config.json")).read_text())
    for name in CHECKPOINTS:
        try:
            return config, Path(hf_hub_download(repo_or_dir, name))
        except Exception:  # the next file name
            continue
    raise OSError(f"{repo_or_dir} has none of {CHECKPOINTS}")


def convnext_config(open_clip_config: dict):
    from transformers import ConvNextConfig

    vision = open_clip_config.get("model_cfg", {}).get("vision_cfg", {})
    geometry = vision.get("olaf_convnext") or CONVNEXT.get(vision.get("timm_model_name"))
    if geometry is None:
        raise ValueError(f"unknown ConvNeXt trunk {vision.get('timm_model_name')!r}; known: {', '.join(CONVNEXT)}")
    return ConvNextConfig(num_channels=3, patch_size=4, hidden_act="gelu", **geometry)


# What an open_clip ConvNeXt checkpoint holds besides the trunk's layers, and why olaf does not run it. Its
# keys: visual.trunk.* (timm's ConvNeXt after reset_classifier(0, global_pool=''): stem, stages, head.norm),
# visual.head.* (the CLIP projection: drop + proj Linear, or an mlp), and the text tower and logit_scale.
TRUNK_HEAD_NORM = "head.norm."  # the pooled output's LayerNorm: the features are taken before it; kept for export
UNUSED = {"visual.head.": "CLIP's image projection (olaf takes the trunk's features before pooling)",
          "": "the text tower and logit scale (olaf uses the image trunk only)"}


def account_convnext(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, str]]:
    """An open_clip checkpoint's tensors -> (ConvNextModel tensors under transformers' names, the trunk's
    head.norm tensors, {unused key: why}). A `visual.` key that is neither raises, naming it: every tensor is
    accounted for."""
    trunk, head_norm, unused = {}, {}, {}
    for key, value in state.items():
        if key.startswith(TRUNK + TRUNK_HEAD_NORM):
            head_norm[key[len(TRUNK + TRUNK_HEAD_NORM):]] = value
        elif key.startswith(TRUNK):
            try:
                trunk[timm_to_hf(key[len(TRUNK):])] = value
            except KeyError:
                raise KeyError(f"{key}: a trunk tensor that is not ConvNeXt's") from None
        elif key.startswith("visual.") and not key.startswith("visual.head."):
            raise KeyError(f"{key}: an image-tower tensor olaf does not know (not the trunk, not its projection)")
        else:
            unused[key] = next(why for prefix, why in UNUSED.items() if key.startswith(prefix))
    return trunk, head_norm, unused


def convnext_from_state(state: dict[str, torch.Tensor], open_clip_config: dict, image_size: int,
                        dtype: torch.dtype) -> ConvNextTower:
    """The tower from an open_clip checkpoint's tensors (on the meta device too: `assign` keeps them as given).
    Anything missing, unexpected or of another shape raises."""
    from transformers import ConvNextModel

    trunk, head_norm, _ = account_convnext(state)
    config = convnext_config(open_clip_config)
    device = next(iter(trunk.values())).device if trunk else torch.device("cpu")
    with torch.device(device):
        model = ConvNextModel(config)
    model.layernorm = nn.Identity()  # the pooled output's norm; the trunk's features are taken before it
    for m in model.modules():  # transformers builds every norm with eps 1e-6; timm's xxlarge uses 1e-5
        if type(m).__name__ == "ConvNextLayerNorm" or isinstance(m, nn.LayerNorm):
            m.eps = config.layer_norm_eps
    try:
        model.load_state_dict(trunk, strict=True, assign=device.type == "meta")
    except RuntimeError as e:
        raise ValueError(f"the image trunk does not fit {config.hidden_sizes} ConvNeXt: {str(e)[:400]}") from None
    return ConvNextTower(model.to(dtype).eval(), image_size, head_norm)


def load_convnext(name: str, dtype: torch.dtype) -> tuple[ConvNextTower, int]:
    from safetensors.torch import load_file

    repo, res = split_convnext_name(name)
    open_clip_config, ckpt = _convnext_files(repo)
    state = load_file(ckpt) if ckpt.suffix == ".safetensors" else torch.load(ckpt, map_location="cpu", weights_only=True)
    try:
        return convnext_from_state(state, open_clip_config, res, dtype), res
    except (KeyError, ValueError) as e:
        raise ValueError(f"{ckpt}: {e}") from None


def load_tower(name: str, select_layer: int, dtype: torch.dtype):
    """The frozen base encoder named `name` (an HF id or a folder)."""
    if is_convnext(name):
        return load_convnext(name, dtype)[0]
    from transformers import CLIPVisionModel

    return CLIPTower(CLIPVisionModel.from_pretrained(name, dtype=dtype), select_layer)
