"""Which format a model folder is, and reading it: `read` is the one entry that turns any folder olaf writes or
probes into a model to probe (`Probed`); nothing else works out a folder's format or parses its keys.

    an olaf PT export (RUN/export, --format llava)      run_export: mm_projector.bin, task tokens, predictors
    a folder in the authors' format (ola_llama, ...)    ola_vlm: config.json's model_type says it
    a LlavaForConditionalGeneration (llava-hf/...)      llava_hf: config.json's model_type llava
    an LLM, with --vision-tower and --mm-projector      common: the three parts a LLaVA PT leaves
"""

from __future__ import annotations

from pathlib import Path

from trainer.build import load_or_explain
from trainer.config import PTConfig
from trainer.errors import TrainerError
from trainer.fields import JsonFile
from trainer.formats.common import Probed, choice, llm_tower_projector, template_of
from trainer.formats.llava_hf import read_llava_hf
from trainer.formats.ola_vlm import AUTHORS_MODEL_TYPES, read_authors_folder
from trainer.formats.run_export import FILES as EXPORT_FILES
from trainer.formats.run_export import read_export
from trainer.sequence import TaskTokens


def local_folder(model: str) -> Path:
    """A model folder on this machine: `model` itself, or its Hub snapshot (the cache, or downloaded)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(load_or_explain("model", snapshot_download, model,
                                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))


def kind(model: str) -> str:
    """What `model` (a folder, or a Hub id) is: run_export, ola_vlm, llava_hf or llm (TrainerError for an olaf
    export with files missing)."""
    folder = Path(model)
    if any((folder / f).is_file() for f in EXPORT_FILES[1:]):  # an olaf export, whole or not
        missing = [f for f in EXPORT_FILES if not (folder / f).is_file()]
        if missing:
            raise TrainerError(f"{folder} is an incomplete PT export: {', '.join(missing)} missing (trainer.export "
                               f"writes all of {', '.join(EXPORT_FILES)})")
        return "run_export"
    folder = local_folder(model)
    raw = JsonFile(folder / "config.json") if (folder / "config.json").is_file() else None
    if raw is not None and raw.data.get("model_type") in AUTHORS_MODEL_TYPES:
        return "ola_vlm"
    from transformers import AutoConfig

    config = load_or_explain("model", AutoConfig.from_pretrained, model)
    return "llava_hf" if getattr(config, "model_type", None) == "llava" else "llm"


def read(cfg: PTConfig, model: str, mm_projector: str | None, dtype) -> Probed:
    """Any folder olaf writes or probes, as a model to probe: (a) an olaf PT export, (b) an LLM with
    --vision-tower and --mm-projector, (c) a LlavaForConditionalGeneration, (d) a folder in the authors' format."""
    what = kind(model)
    if what == "run_export":
        return read_export(cfg, Path(model), dtype)
    if what == "ola_vlm":
        folder = local_folder(model)
        return read_authors_folder(cfg, folder, JsonFile(folder / "config.json"), dtype)
    from transformers import AutoConfig

    config = load_or_explain("model", AutoConfig.from_pretrained, model)
    if what == "llava_hf":
        return read_llava_hf(cfg, model, config, dtype)
    if not mm_projector or cfg.model.vision_tower == "model":
        raise TrainerError(f"{model} is an LLM: give --vision-tower and --mm-projector (LLaVA's mm_projector.bin), "
                           f"or pass a PT export folder, a folder in the authors' format or a "
                           f"LlavaForConditionalGeneration checkpoint")
    tokenizer, llm, tower, proj, image = llm_tower_projector(cfg, model, cfg.model.vision_tower, cfg.model.vision_select_layer,
                                                              Path(mm_projector), dtype, "square")
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, TaskTokens({}, {}), tokenizer,
                  choice(cfg.model.chat_template, template_of(config.model_type)), image,
                  f"LLM + tower + mm_projector.bin: {model}, {cfg.model.vision_tower}")
