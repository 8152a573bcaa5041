"""--format vlora: VLoRA's PT output folder, what their finetune.sh reads (../shared/VLORA_SPEC.md section 4).
olaf writes it and does not read it back: a VLoRA run is probed from its RUN/export (run_export)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from store import atomic_path
from trainer.formats.common import ExportError, from_checkpoint, mm_projector_tensors, save_bin
from trainer.formats.ola_vlm import authors_llm_config

VLORA_FIELDS = ("vlora_dim", "vlora_depth", "vlora_visual_dim", "vlora_pos_num", "vlora_llm_dim", "vlora_llm_depth",
                "vlora_rank", "vlora_alpha", "vlora_type", "weights_sep", "skip_layers")


def export_vlora(run_dir: Path, out: Path, ckpt: Path | None = None) -> Path:
    """VLoRA's PT output folder (their train.py's final save, VLORA_SPEC.md section 4): mm_projector.bin, the
    generator under `model.mm_projector.` and their names (finetune.sh's --pretrain_mm_mlp_adapter), and
    config.json: the LLM's config as 4.x reads it, model_type llava_vlora, mm_projector_type vlora, the 11
    vlora_* fields their builder rebuilds the generator from, LLaVA's mm_* flags. olaf's own switches (kv_deltas,
    queries_init, placeholder) go under `olaf`: their code knows only their behaviour."""
    from transformers import AutoConfig

    ckpt, info, cfg = from_checkpoint(run_dir, ckpt)
    if info.get("connector") != "vlora":
        raise ExportError(f"--format vlora exports a VLoRA run (connector: vlora); {run_dir} trained "
                          f"{info.get('connector', 'mlp2x_gelu')}: use --format ola-vlm or llava")
    settings = info["vlora"]
    trained = load_file(ckpt / "trainable.safetensors")
    llm = authors_llm_config(AutoConfig.from_pretrained(cfg.model.llm).to_dict())
    config = {**llm, "model_type": "llava_vlora", "architectures": ["LlavaLlamaVLoRAForCausalLM"],
              "mm_projector_type": "vlora", "mm_vision_tower": cfg.model.vision_tower,
              "mm_hidden_size": info["mm_hidden_size"],
              "mm_vision_select_layer": cfg.model.vision_select_layer, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": True,
              "image_aspect_ratio": cfg.model.image_aspect, "tokenizer_model_max_length": cfg.model.max_length,
              **{k: settings[k] for k in VLORA_FIELDS},
              "olaf": {"kv_deltas": settings["kv_deltas"], "queries_init": settings["queries_init"],
                       "placeholder": settings["placeholder"], "tasks": cfg.tasks.names, "steps": info.get("steps"),
                       "checkpoint": info.get("checkpoint"), "store": info.get("store")}}
    with atomic_path(out) as tmp:
        Path(tmp).mkdir()
        save_bin(mm_projector_tensors(trained), Path(tmp) / "mm_projector.bin")
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(out)
