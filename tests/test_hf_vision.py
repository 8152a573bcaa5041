"""`architecture: hf_vision` (teachers/hf_vision.py): a vision model transformers has, loaded with AutoModel from a
manifest entry; its target equals, to 1e-5 in fp32, what transformers' own model returns for the same pixels at
the chosen layer and tokens (computed here from transformers directly), for tiny random models of each config
class, and for the vision part of a full vision-language checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    SamVisionConfig,
    SiglipConfig,
    SiglipVisionConfig,
    ViTConfig,
)

from recipes.manifest import load_manifest
from teachers.registry import load_teachers

SIZE, MEAN, STD = 56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
CONFIGS = {  # name: (config, patch, class and register tokens before the patches)
    "dinov2": (Dinov2Config(**SMALL, patch_size=14, image_size=SIZE), 14, 1),
    "dinov2_registers": (Dinov2WithRegistersConfig(**SMALL, patch_size=14, image_size=SIZE, num_register_tokens=4), 14, 5),
    "siglip_vision": (SiglipVisionConfig(**SMALL, patch_size=14, image_size=SIZE), 14, 0),
    "clip_vision": (CLIPVisionConfig(**SMALL, patch_size=14, image_size=SIZE), 14, 1),
    "vit": (ViTConfig(**SMALL, patch_size=14, image_size=SIZE), 14, 1),
}


def manifest_for(tmp_path, folder, feature, output_shape, size=SIZE) -> object:
    entry = {"architecture": "hf_vision", "compute_dtype": "float32", "weights": {"path": str(folder)},
             "preprocess": {"ops": [{"op": "resize", "height": size, "width": size, "resample": "bicubic"}],
                            "input_size": [size, size], "channel_order": "RGB", "rescale": 1 / 255,
                            "mean": list(MEAN), "std": list(STD)},
             "feature": feature, "output_shape": list(output_shape)}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"format": "olaf.teachers/1", "name": "hf", "fidelity": "original",
                                    "stored_dtype": "float16", "teachers": {"gen": entry}}))
    return load_manifest(path)


def own_outputs(folder, pixels: torch.Tensor):
    """transformers' model of the folder on the normalised pixels, computed here."""
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True)


def pixels(size=SIZE) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_config_class_gives_transformers_own_features(tmp_path, name):
    config, patch, prefix = CONFIGS[name]
    torch.manual_seed(0)
    folder = tmp_path / name
    AutoModel.from_config(config).save_pretrained(folder)
    x, grid = pixels(), SIZE // patch
    own = own_outputs(folder, x)
    cases = [({"layer": -2, "tokens": "patch"}, own.hidden_states[-2][:, prefix:]),
             ({"layer": "last", "tokens": "all"}, own.last_hidden_state),
             ({"layer": [-3, -2, -1], "reduce": "mean", "tokens": "patch"},
              torch.stack(own.hidden_states[-3:]).mean(0)[:, prefix:]),
             ({"layer": 1, "tokens": "patch", "pool": [2, 2]},
              F.interpolate(own.hidden_states[1][:, prefix:].transpose(1, 2).reshape(2, 32, grid, grid), size=(2, 2),
                            mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))]
    if prefix:
        cases.append(({"layer": "last", "tokens": "cls"}, own.last_hidden_state[:, :1]))
    for feature, want in cases:
        teacher = load_teachers(manifest_for(tmp_path, folder, feature, want.shape[1:]), ["gen"])["gen"]
        got = teacher(x)
        assert got.shape == want.shape, (feature, got.shape, want.shape)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, msg=str(feature))


def test_siglip2_naflex_gets_its_processor_s_patches(tmp_path):
    """SigLIP2's vision tower takes patches, cut here by transformers' own processor function, at a 4 x 4 grid."""
    from transformers import Siglip2VisionConfig
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    config = Siglip2VisionConfig(**SMALL, patch_size=16, num_patches=16)
    folder = tmp_path / "siglip2"
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    x = pixels(64)
    xn = (x.permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    patches = torch.stack([torch.from_numpy(convert_image_to_patches(img.numpy(), 16)) for img in xn])
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        own = model(pixel_values=patches, pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                    spatial_shapes=torch.tensor([[4, 4], [4, 4]]), output_hidden_states=True)
    for feature, want in [({"layer": -2, "tokens": "patch"}, own.hidden_states[-2]),
                          ({"layer": "last", "tokens": "patch", "pool": [2, 2]},
                           F.interpolate(own.last_hidden_state.transpose(1, 2).reshape(2, 32, 4, 4), size=(2, 2),
                                         mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))]:
        teacher = load_teachers(manifest_for(tmp_path, folder, feature, want.shape[1:], size=64), ["gen"])["gen"]
        torch.testing.assert_close(teacher(x), want, rtol=1e-5, atol=1e-5)


def test_sam_s_vision_encoder_maps_become_row_major_tokens(tmp_path):
    config = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, patch_size=16,
                             image_size=64, output_channels=16, global_attn_indexes=[1], window_size=2)
    folder = tmp_path / "sam"
    AutoModel.from_config(config).save_pretrained(folder)
    x = pixels(64)
    own = own_outputs(folder, x)
    for feature, want in [({"layer": -1, "tokens": "patch"}, own.hidden_states[-1].flatten(1, 2)),
                          ({"layer": "last", "tokens": "all"}, own.last_hidden_state.flatten(2).transpose(1, 2))]:
        teacher = load_teachers(manifest_for(tmp_path, folder, feature, want.shape[1:], size=64), ["gen"])["gen"]
        torch.testing.assert_close(teacher(x), want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("full", [SiglipConfig, CLIPConfig])
def test_the_vision_part_of_a_full_vision_language_checkpoint(tmp_path, full):
    vision = {**SMALL, "patch_size": 14, "image_size": SIZE}
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 100}
    torch.manual_seed(0)
    folder = tmp_path / full.__name__
    AutoModel.from_config(full(vision_config=vision, text_config=text)).save_pretrained(folder)
    x = pixels()
    model = AutoModel.from_pretrained(folder).eval()
    xn = (x.permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.vision_model(pixel_values=xn, output_hidden_states=True).hidden_states[-2]
    prefix = 1 if full is CLIPConfig else 0
    teacher = load_teachers(manifest_for(tmp_path, folder, {"layer": -2}, (16, 32)), ["gen"])["gen"]
    torch.testing.assert_close(teacher(x), want[:, prefix:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature, message", [
    ({"layer": [-1, -2]}, "reduce: mean"), ({"tokens": "grid"}, "tokens must be"), ({"layer": "first"}, "layer must"),
    ({"pool": [4]}, "pool must"), ({"tokens": "cls", "pool": [2, 2]}, "needs tokens: patch"), ({"laye": 1}, "unknown"),
])
def test_a_bad_feature_is_one_line(tmp_path, feature, message):
    config, _, _ = CONFIGS["vit"]
    folder = tmp_path / "vit"
    AutoModel.from_config(config).save_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        load_teachers(manifest_for(tmp_path, folder, feature, (16, 32)), ["gen"])


def test_a_model_that_needs_its_own_code_is_refused(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "my_remote_vit", "auto_map": {"AutoConfig": "x.Config"}}')
    with pytest.raises(Exception, match="trust_remote_code.*never runs"):
        load_teachers(manifest_for(tmp_path, folder, {"layer": -1}, (16, 32)), ["gen"])
