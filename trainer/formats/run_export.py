"""RUN/export/, what trainer.pt leaves at its end (and `trainer.export RUN --format llava`): written from a
checkpoint, read back to probe the model it holds.

    mm_projector.bin          LLaVA's key names: usable as --pretrain_mm_mlp_adapter (VLoRA: the generator)
    task_tokens.safetensors   special_{gen,depth,seg}_tokens
    predictors.safetensors    predictors.<task>_<layer>.* and logit_scales.<task>
    config.json               layers, token counts, widths, base model ids, teachers, store (common.model_info)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from recipes.manifest import ordered_tasks
from store import atomic_path
from trainer.config import PTConfig
from trainer.data import ASPECTS, ImageRecipe
from trainer.errors import TrainerError
from trainer.fields import JsonFile
from trainer.formats.common import (
    GENERATOR,
    Probed,
    choice,
    first_line,
    from_checkpoint,
    frozen_parts,
    llm_tower_projector,
    load_module,
    mm_projector_tensors,
    read_bin,
    save_bin,
)
from trainer.sequence import TaskTokens
from trainer.templates import PLAIN, TEMPLATES

FILES = ("config.json", "mm_projector.bin", "task_tokens.safetensors")  # what makes a folder one (predictors aside)


def export_llava(run_dir: Path, out: Path, ckpt: Path | None = None) -> Path:
    """The LLaVA-side export of a checkpoint: mm_projector.bin (LLaVA's names), the task tokens, the predictors
    and logit scales, config.json; written whole or not at all."""
    ckpt, info, _ = from_checkpoint(run_dir, ckpt)
    trained = load_file(ckpt / "trainable.safetensors")
    with atomic_path(out) as tmp:
        exp = Path(tmp)
        exp.mkdir()
        save_bin(mm_projector_tensors(trained), exp / "mm_projector.bin")
        save_file({f"special_{k.split('.', 1)[1]}_tokens": v for k, v in trained.items()
                   if k.startswith("special_tokens.")}, exp / "task_tokens.safetensors")
        save_file({k: v.reshape(1) if k.startswith("logit_scales.") else v for k, v in trained.items()
                   if k.startswith(("predictors.", "logit_scales."))}, exp / "predictors.safetensors")
        (exp / "config.json").write_text(json.dumps(info, indent=1))
    return Path(out)


def export_task_tokens(folder: Path, info: JsonFile) -> TaskTokens:
    """An export's task tokens (none for a run without tasks), pooled as PT put them in the sequence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        vectors = load_file(folder / "task_tokens.safetensors")
    except (SafetensorError, OSError) as e:
        raise TrainerError(f"{folder / 'task_tokens.safetensors'} is not a safetensors file: {first_line(e)}") from None
    held = ordered_tasks(k[len("special_"):-len("_tokens")] for k in vectors
                         if k.startswith("special_") and k.endswith("_tokens"))
    pooled = info.get("task_tokens", dict, {})
    for t in held:
        if not isinstance(pooled.get(t), int) or isinstance(pooled.get(t), bool) or pooled[t] < 1 or \
                vectors[f"special_{t}_tokens"].shape[0] % pooled[t]:
            raise info.error("task_tokens", f"gives {t}: {pooled.get(t)!r}", f"the tokens each task puts in the "
                             f"sequence, a divisor of its {vectors[f'special_{t}_tokens'].shape[0]} vectors, are needed")
    return TaskTokens({t: vectors[f"special_{t}_tokens"] for t in held}, {t: pooled[t] for t in held}, trainable=False)


def read_export(cfg: PTConfig, folder: Path, dtype) -> Probed:
    """(a) an olaf PT run's export/: its LLM, tower, projector and task tokens."""
    info = JsonFile(folder / "config.json")
    if info.get("connector", str, "mlp2x_gelu", choices=("mlp2x_gelu", "vlora")) == "vlora":
        return read_vlora_export(cfg, folder, info, dtype)
    llm_name, tower_name = info.get("llm", str), info.get("vision_tower", str)
    tokenizer, llm, tower, proj, image = llm_tower_projector(
        cfg, llm_name, tower_name, info.get("mm_vision_select_layer", int), folder / "mm_projector.bin", dtype,
        info.get("image_aspect", str, "square", choices=ASPECTS))
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, export_task_tokens(folder, info), tokenizer,
                  choice(cfg.model.chat_template, info.get("chat_template", str, choices=list(TEMPLATES))), image,
                  f"olaf PT export: {llm_name}, {tower_name}")


def read_vlora_export(cfg: PTConfig, folder: Path, info: JsonFile, dtype) -> Probed:
    """(a) a VLoRA run's export/: its LLM with the generator's deltas hooked in, the plain template, no image
    tokens; the task tokens when the run had OLA-VLM's losses too."""
    from trainer.vlora import VLoRAConnector, VLoRAError, settings

    llm_name, tower_name = info.get("llm", str), info.get("vision_tower", str)
    given = info.get("vlora", dict)
    tokenizer, llm, tower = frozen_parts(llm_name, tower_name, info.get("mm_vision_select_layer", int), dtype)
    try:  # typed, held against this LLM and tower, and its size bounded before anything is allocated
        s = settings(given, llm.config, tower)
    except VLoRAError as e:
        raise TrainerError(f"{info.path}: {e}") from None
    connector = load_module(VLoRAConnector(s, llm.get_decoder()), read_bin(folder / "mm_projector.bin", GENERATOR),
                             str(folder / "mm_projector.bin"), GENERATOR)
    image = ImageRecipe.from_pretrained(tower_name, choice(cfg.model.image_aspect,
                                                            info.get("image_aspect", str, "square", choices=ASPECTS)))
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, connector.to(dtype),
                  export_task_tokens(folder, info), tokenizer, PLAIN,
                  image, f"olaf VLoRA export: {llm_name}, {tower_name}", placeholder=s["placeholder"] == "keep")
