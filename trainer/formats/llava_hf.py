"""A transformers LlavaForConditionalGeneration folder or id (e.g. llava-hf/llava-1.5-7b-hf), read to probe it.
olaf writes no such folder."""

from __future__ import annotations

from trainer.build import load_or_explain
from trainer.config import PTConfig
from trainer.data import ImageRecipe
from trainer.formats.common import Probed, choice
from trainer.sequence import TaskTokens
from trainer.towers import CLIPTower


def read_llava_hf(cfg: PTConfig, model: str, config, dtype) -> Probed:
    """(c) a transformers LlavaForConditionalGeneration (e.g. llava-hf/llava-1.5-7b-hf): vicuna_v1, and the
    aspect its image processor applies (it does not pad unless it says do_pad)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration

    m = load_or_explain("LLaVA model", LlavaForConditionalGeneration.from_pretrained, model, dtype=dtype)
    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, model)
    tower = CLIPTower(m.model.vision_tower, config.vision_feature_layer)
    pads = bool(getattr(CLIPImageProcessorPil.from_pretrained(model), "do_pad", False))
    image = ImageRecipe.from_pretrained(model, choice(cfg.model.image_aspect, "pad" if pads else "square"))
    return Probed(m.get_input_embeddings(), m.model.language_model, tower, m.model.multi_modal_projector,
                  TaskTokens({}, {}), tokenizer, choice(cfg.model.chat_template, "vicuna_v1"), image,
                  f"LlavaForConditionalGeneration {model}")
