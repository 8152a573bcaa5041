"""Probing an MLLM from stored targets (OLA-VLM, Sec. 3 and docs/Probing.md): a single-block Perceiver resampler
probe at every LLM layer, for every task of the store, trained together from one forward of the frozen MLLM per
batch; no teacher is ever loaded.

    python -m trainer.probe --store TRAIN_STORE --eval-store VAL_STORE --model MODEL --output-dir OUT \\
        [--vision-tower T --mm-projector mm_projector.bin] [--layers 1-32] [--tasks gen,depth,seg] [--resume]
    torchrun --nproc_per_node 8 -m trainer.probe ...     # DDP, as trainer.pt
    python -m trainer.probe plot OUT [OUT2 ...] [--out probes.png]   # cosine vs layer, runs overlaid

MODEL is one of:
  (a) an olaf PT run's export/ folder (trainer.pt): its LLM, base encoder, projector and task tokens;
  (b) an LLM (HF id or folder) with --vision-tower and --mm-projector (LLaVA's mm_projector.bin);
  (c) a transformers LlavaForConditionalGeneration folder or id (e.g. llava-hf/llava-1.5-7b-hf).
The probe is the original's probe head (a Resampler with learnable latents: 576 for depth and seg, 1 for gen,
inner width = the target's width, 4 heads x 32, ff mult 1), its keys every token of its layer's hidden states
(padding masked). Loss: smooth-L1 (beta 1). Defaults are the paper's (trainer/configs/probe.yaml: lr 1e-3,
batch 256, 2 epochs, cosine with 3% warm-up). The prompt is each record's question (from-images writes the
paper's "Describe the image in two lines."), and no answer.

Outputs in OUT: probe_scores.json and .csv (mean cosine similarity between each probe's flattened output and the
target, per (task, layer), over the eval store's valid samples), probe_plot.png, probes/<task>_<layer>
.safetensors, and trainer.pt's logs/ and checkpoints/ (--resume continues, on any number of processes).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from recipes.manifest import PROBE_EVAL_MANIFEST, PROBE_MANIFEST, TASKS
from store import Location, Store, read_manifest, refuse_inside_store, weights_mismatches
from trainer.build import assemble, load_or_explain, open_store
from trainer.config import PTConfig, load_config
from trainer.data import ASPECTS, ImageRecipe, PTSample, collate
from trainer.errors import TrainerError
from trainer.fields import JsonFile
from trainer.heads import Predictor
from trainer.loop import run_cli, start, teardown, to_device, train
from trainer.loss import masked_smooth_l1
from trainer.sequence import MLLM, Layout, Projector, TaskTokens, mm_projector_state
from trainer.templates import PLAIN, TEMPLATES, PromptBuilder, prefix_shape, prompt_builder
from trainer.towers import CLIPTower, load_tower

PROBE_DEFAULTS = Path(__file__).parent / "configs" / "probe.yaml"


class ProbeSet(nn.Module):
    """Every (task, layer) probe over one frozen MLLM (trainer.sequence.MLLM). `forward(batch)` -> (sum of the
    probes' smooth-L1, terms): one MLLM forward, under no_grad, then each probe on its layer (float32), each its
    own loss term. A probe is the predictor with learned latents (trainer.heads.Predictor)."""

    def __init__(self, mllm: MLLM, target_shapes: dict[str, tuple[int, int]], layers: list[int], head: dict):
        super().__init__()
        self.mllm = mllm.requires_grad_(False)
        self.layers, self.tasks = list(layers), [t for t in TASKS if t in target_shapes]
        width = mllm.config.hidden_size
        self.probes = nn.ModuleDict({
            f"{t}_{layer}": Predictor(width, target_shapes[t][1], head["heads"], head["dim_head"], head["ff_mult"],
                                      head["depth"], learned_latents=target_shapes[t][0])
            for t in self.tasks for layer in self.layers})
        self.forwards = 0  # MLLM forwards, whatever the number of probes

    @property
    def layout(self) -> Layout:
        return self.mllm.layout

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def step_context(self, micro_batches):
        return None

    def predict(self, batch: dict, mllm: MLLM | None = None) -> dict[str, dict[int, torch.Tensor]]:
        """Every probe's prediction from one forward of `mllm` (default: the one the probes train on)."""
        mllm = mllm or self.mllm
        self.forwards += 1
        with torch.no_grad():
            hidden, _ = mllm.run(batch)
        out = {}
        for t in self.tasks:
            out[t] = {}
            for layer in self.layers:
                keys, mask = mllm.layout.keys(hidden[layer].float(), batch["text_mask"])
                out[t][layer] = self.probes[f"{t}_{layer}"](keys, mask)
        return out

    def forward(self, batch: dict, context=None):
        preds = self.predict(batch)
        terms, total = {}, 0.0
        for t, by_layer in preds.items():
            for layer, p in by_layer.items():
                sl1 = masked_smooth_l1(p, batch["targets"][t], batch["valid"][t])
                terms[f"{t}/{layer}/sl1"] = sl1.detach()
                total = total + sl1
        terms["loss"] = total.detach()
        return total, terms


# ---- the probed model, in the forms users hold it ---------------------------------------------------------------

@dataclass
class Probed:
    """A model to probe, loaded: its MLLM's parts, tokenizer, chat template, image recipe (at the aspect the run
    asked for, or the model's own), the order of its task tokens, and what it is."""

    embed: nn.Module
    decoder: nn.Module
    tower: nn.Module
    projector: nn.Module
    task_tokens: TaskTokens
    tokenizer: object
    template: str
    image: ImageRecipe
    what: str
    token_order: tuple = TASKS
    placeholder: bool = True  # VLoRA's plain template: its masked <image> placeholder

    def layout(self, with_task_tokens: bool = True) -> Layout:
        tokens = self.task_tokens.pooled if with_task_tokens else {}
        image = getattr(self.projector, "num_tokens", self.tower.num_tokens)  # VLoRA's connector: none
        prefix, masked = prefix_shape(self.tokenizer, self.template, self.placeholder)
        return Layout.of(prefix, image, tokens, self.token_order, masked)

    def builder(self, max_length: int, layout: Layout, **protocol):
        """The prompt builder for this model's template; `protocol`: answer / with_answer (the probes')."""
        return prompt_builder(self.tokenizer, self.template, max_length - layout.text_start, self.placeholder,
                              **protocol)

    def mllm(self, with_task_tokens: bool = True) -> MLLM:
        """The frozen MLLM; without task tokens: the same parts, none inserted (the authors' probe_mode)."""
        tokens = self.task_tokens if with_task_tokens else TaskTokens({}, {}, trainable=False)
        return MLLM(self.embed, self.decoder, None, self.tower, self.projector, tokens,
                    self.layout(with_task_tokens), self.image.mean, self.image.std)


def _choice(value: str, model_value: str) -> str:
    """A setting that may say `model`: the probed model's own value."""
    return model_value if value == "model" else value


def _template_of(model_type: str | None) -> str:
    """The chat template their eval picks for a model (llava_llama_3 / llava_phi_3), by its LLM."""
    return "phi_3" if "phi" in str(model_type) else "llama_3"


def _first_line(e: Exception) -> str:
    """What an error says, in a line: its first line that is not a heading ("Error(s) in loading ...:")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return next((ln for ln in lines if not ln.endswith(":")), lines[0])[:200]


PROJECTOR = ("an mlp2x_gelu projector from the tower's width {tower} to the LLM's {llm} (tensors "
             "model.mm_projector.{{0,2}}.{{weight,bias}})")
GENERATOR = "the generator its config.json describes"


def _read_bin(path: Path, what: str) -> dict:
    """The tensors of a .bin that should be `what` (torch.load, tensors only: no pickled code runs); one line for
    anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load of arbitrary bytes raises arbitrary errors: all mean "not tensors"
        raise TrainerError(f"{path} is not {what}: not a file of tensors ({type(e).__name__}: {_first_line(e)})") \
            from None


def _load_module(module: nn.Module, tensors: dict, where: str, what: str) -> nn.Module:
    """`module` with `tensors` (under `mm_projector.`) loaded strictly; one line when they do not fit."""
    try:
        module.load_state_dict(mm_projector_state(tensors))
    except Exception as e:  # missing keys, other shapes
        raise TrainerError(f"{where} is not {what}: {_first_line(e)}") from None
    return module


def _load_projector(tensors: dict | Path, tower_width: int, llm_width: int, where: str, dtype) -> Projector:
    """The mlp2x_gelu projector from `tensors` (a model folder's) or a mm_projector.bin."""
    what = PROJECTOR.format(tower=tower_width, llm=llm_width)
    if isinstance(tensors, Path):
        tensors = _read_bin(tensors, what)
    return _load_module(Projector(tower_width, llm_width), tensors, where, what).to(dtype)


def _frozen_parts(llm_name: str, tower_name: str, select: int, dtype):
    """(tokenizer, LLM, tower) by name, each failure one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, llm_name)
    llm = load_or_explain("LLM", AutoModelForCausalLM.from_pretrained, llm_name, dtype=dtype)
    tower = load_or_explain("vision tower", load_tower, tower_name, select_layer=select, dtype=dtype)
    return tokenizer, llm, tower


def _llm_tower_projector(cfg: PTConfig, llm_name: str, tower_name: str, select: int, projector: Path, dtype,
                         aspect: str):
    tokenizer, llm, tower = _frozen_parts(llm_name, tower_name, select, dtype)
    proj = _load_projector(Path(projector), tower.hidden_size, llm.config.hidden_size, str(projector), dtype)
    image = ImageRecipe.from_pretrained(tower_name, _choice(cfg.image_aspect, aspect))
    return tokenizer, llm, tower, proj, image


def _export_task_tokens(folder: Path, info: JsonFile) -> TaskTokens:
    """An export's task tokens (none for a run without tasks), pooled as PT put them in the sequence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        vectors = load_file(folder / "task_tokens.safetensors")
    except (SafetensorError, OSError) as e:
        raise TrainerError(f"{folder / 'task_tokens.safetensors'} is not a safetensors file: {_first_line(e)}") from None
    held = [t for t in TASKS if f"special_{t}_tokens" in vectors]
    pooled = info.get("task_tokens", dict, {})
    for t in held:
        if not isinstance(pooled.get(t), int) or isinstance(pooled.get(t), bool) or pooled[t] < 1 or \
                vectors[f"special_{t}_tokens"].shape[0] % pooled[t]:
            raise info.error("task_tokens", f"gives {t}: {pooled.get(t)!r}", f"the tokens each task puts in the "
                             f"sequence, a divisor of its {vectors[f'special_{t}_tokens'].shape[0]} vectors, are needed")
    return TaskTokens({t: vectors[f"special_{t}_tokens"] for t in held}, {t: pooled[t] for t in held}, trainable=False)


def _from_export(cfg: PTConfig, folder: Path, dtype) -> Probed:
    """(a) an olaf PT run's export/: its LLM, tower, projector and task tokens."""
    info = JsonFile(folder / "config.json")
    if info.get("connector", str, "mlp2x_gelu", choices=("mlp2x_gelu", "vlora")) == "vlora":
        return _from_vlora_export(cfg, folder, info, dtype)
    llm_name, tower_name = info.get("llm", str), info.get("vision_tower", str)
    tokenizer, llm, tower, proj, image = _llm_tower_projector(
        cfg, llm_name, tower_name, info.get("mm_vision_select_layer", int), folder / "mm_projector.bin", dtype,
        info.get("image_aspect", str, "square", choices=ASPECTS))
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, _export_task_tokens(folder, info), tokenizer,
                  _choice(cfg.chat_template, info.get("chat_template", str, choices=list(TEMPLATES))), image,
                  f"olaf PT export: {llm_name}, {tower_name}")


def _from_vlora_export(cfg: PTConfig, folder: Path, info: JsonFile, dtype) -> Probed:
    """(a) a VLoRA run's export/: its LLM with the generator's deltas hooked in, the plain template, no image
    tokens; the task tokens when the run had OLA-VLM's losses too."""
    from trainer.vlora import VLoRAConnector, VLoRAError, settings

    llm_name, tower_name = info.get("llm", str), info.get("vision_tower", str)
    given = info.get("vlora", dict)
    tokenizer, llm, tower = _frozen_parts(llm_name, tower_name, info.get("mm_vision_select_layer", int), dtype)
    try:  # typed, held against this LLM and tower, and its size bounded before anything is allocated
        s = settings(given, llm.config, tower)
    except VLoRAError as e:
        raise TrainerError(f"{info.path}: {e}") from None
    connector = _load_module(VLoRAConnector(s, llm.get_decoder()), _read_bin(folder / "mm_projector.bin", GENERATOR),
                             str(folder / "mm_projector.bin"), GENERATOR)
    image = ImageRecipe.from_pretrained(tower_name, _choice(cfg.image_aspect,
                                                            info.get("image_aspect", str, "square", choices=ASPECTS)))
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, connector.to(dtype),
                  _export_task_tokens(folder, info), tokenizer, PLAIN,
                  image, f"olaf VLoRA export: {llm_name}, {tower_name}", placeholder=s["placeholder"] == "keep")


def _from_llava_hf(cfg: PTConfig, model: str, config, dtype) -> Probed:
    """(c) a transformers LlavaForConditionalGeneration (e.g. llava-hf/llava-1.5-7b-hf): vicuna_v1, and the
    aspect its image processor applies (it does not pad unless it says do_pad)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration

    m = load_or_explain("LLaVA model", LlavaForConditionalGeneration.from_pretrained, model, dtype=dtype)
    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, model)
    tower = CLIPTower(m.model.vision_tower, config.vision_feature_layer)
    pads = bool(getattr(CLIPImageProcessorPil.from_pretrained(model), "do_pad", False))
    image = ImageRecipe.from_pretrained(model, _choice(cfg.image_aspect, "pad" if pads else "square"))
    return Probed(m.get_input_embeddings(), m.model.language_model, tower, m.model.multi_modal_projector,
                  TaskTokens({}, {}), tokenizer, _choice(cfg.chat_template, "vicuna_v1"), image,
                  f"LlavaForConditionalGeneration {model}")


# their model types -> the LLM's (transformers'); olaf's --format ola-vlm writes the first. A released probe
# checkpoint (shi-labs/probe_depth_llava-1.5-pt-ift: probe_dsg_llava_llama, probe_mode set) holds its whole MLLM,
# the paper's LLaVA-1.5 baseline among them
AUTHORS_MODEL_TYPES = {"ola_llama": "llama", "ola_phi3": "phi3", "llava_llama": "llama", "llava_phi3": "phi3",
                       "probe_dsg_llava_llama": "llama"}
PREFIX = {"tower": "model.vision_tower.vision_tower.", "projector": "model.mm_projector.", "tokens": "model.special_"}


def _folder_tensors(folder: Path, prefixes) -> dict[str, torch.Tensor]:
    """The tensors under `prefixes` of every safetensors file of a model folder."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainerError(f"{folder} holds no *.safetensors: their released folders and olaf's exports do")
    out = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(tuple(prefixes))})  # noqa: SIM118
    return out


TOKEN_FORMATS = ("emb", "expand_emb", "text")  # their task_token_format values (llava_arch.py raises on others)


def _authors_task_tokens(config: JsonFile, tensors: dict, folder: Path) -> tuple[TaskTokens, tuple[str, ...]]:
    """Their OlaLlavaMetaModel's tokens and their order (aux_mode's): special_<task>_tokens for each task, each put
    in the sequence as num_task_tokens vectors (depth and seg pooled in groups; gen as they are); none in
    probe_mode. A value olaf does not know is refused, never read as "no tokens"."""
    k = config.get("num_task_tokens", int, 0, low=0)
    if "probe_mode" in config or not k:
        return TaskTokens({}, {}), ()
    if config.get("task_token_format", str, "emb", choices=TOKEN_FORMATS) == "text":
        raise TrainerError(f"{folder}: task_token_format 'text' (tokens as vocabulary ids) is not supported")
    aux = config.get("aux_mode", str)
    order = aux.split("-")
    if not aux or [t for t in order if t not in TASKS] or len(set(order)) < len(order):
        raise config.error("aux_mode", f"is {aux!r}", f"their task order, tasks of {', '.join(TASKS)} joined by '-' "
                           f"(e.g. depth-seg-gen), is needed")
    missing = [t for t in order if f"model.special_{t}_tokens" not in tensors]
    if missing:
        raise TrainerError(f"{folder}: config aux_mode {aux!r} names task tokens the folder does not hold "
                           f"(model.special_{missing[0]}_tokens)")
    vectors = {t: tensors[f"model.special_{t}_tokens"] for t in order}
    uneven = [t for t, v in vectors.items() if v.ndim != 2 or v.shape[0] % k]
    if uneven:
        raise config.error("num_task_tokens", f"is {k}", f"model.special_{uneven[0]}_tokens has "
                           f"{tuple(vectors[uneven[0]].shape)}: its vectors must pool into {k} tokens")
    return TaskTokens(vectors, dict.fromkeys(order, k), trainable=False), tuple(order)


def _authors_tower(cfg: PTConfig, config: JsonFile, tensors: dict, dtype):
    """The tower their builder makes from mm_vision_tower (or --vision-tower, e.g. a local copy); a ConvNeXt's
    weights then reloaded from the folder, as their load_pretrained_model's reload_from_ckpt does."""
    from trainer.towers import TRUNK, account_convnext, is_convnext

    name = cfg.vision_tower if cfg.vision_tower != "model" else config.get("mm_vision_tower", str)
    tower = load_or_explain("vision tower", load_tower, name,
                            select_layer=config.get("mm_vision_select_layer", int, -2), dtype=dtype)
    held = {TRUNK + k[len(PREFIX["tower"]):]: v for k, v in tensors.items() if k.startswith(PREFIX["tower"])}
    if is_convnext(name) and held:  # the folder holds the trunk under timm's names, as an open_clip checkpoint
        try:
            trunk, head_norm, _ = account_convnext(held)
        except KeyError as e:
            raise TrainerError(f"{name}: the folder's tower tensors are not its ConvNeXt trunk: {e}") from None
        tower.head_norm.update(head_norm)
        tower.model.load_state_dict({k: v.to(dtype) for k, v in trunk.items()}, strict=False)
    return tower, name


def _from_authors_folder(cfg: PTConfig, folder: Path, config: JsonFile, dtype) -> Probed:
    """(d) a model folder in the authors' format: their released OLA-VLM / LLaVA checkpoints (model_type ola_llama,
    ola_phi3, llava_llama, llava_phi3; e.g. shi-labs/OLA-VLM-CLIP-ViT-Llama3-8b) or olaf's --format ola-vlm. The
    LLM part is read as transformers' own class (theirs subclass it), the projector and task tokens from the
    folder's tensors, the image aspect and template from their config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = AUTHORS_MODEL_TYPES[config.get("model_type", str)]
    if config.get("mm_projector_type", str, "mlp2x_gelu") != "mlp2x_gelu":
        raise TrainerError(f"{folder}: mm_projector_type {config.get('mm_projector_type', str)!r}; olaf probes "
                           f"mlp2x_gelu")
    aspect = config.get("image_aspect_ratio", str, "square", choices=ASPECTS)
    fields = {k: v for k, v in config.data.items() if k != "model_type" and not (k == "rope_scaling" and v is None)}
    try:
        llm_config = AutoConfig.for_model(base, **fields)
    except Exception as e:  # transformers' own checks of the LLM's fields
        raise TrainerError(f"{config.path}: transformers refuses it as a {base} config: {_first_line(e)}") from None
    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, str(folder))
    llm = load_or_explain("LLM", AutoModelForCausalLM.from_pretrained, str(folder), config=llm_config, dtype=dtype)
    tensors = _folder_tensors(folder, PREFIX.values())
    tower, tower_name = _authors_tower(cfg, config, tensors, dtype)
    proj = _load_projector(tensors, tower.hidden_size, llm.config.hidden_size, str(folder), dtype)
    tokens, order = _authors_task_tokens(config, tensors, folder)
    image = ImageRecipe.from_pretrained(tower_name, _choice(cfg.image_aspect, aspect))
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, tokens, tokenizer,
                  _choice(cfg.chat_template, _template_of(base)), image,
                  f"{config.get('model_type', str)} folder {folder} ({tower_name})", token_order=order)


def _local_folder(model: str) -> Path:
    """A model folder on this machine: `model` itself, or its Hub snapshot (the cache, or downloaded)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(load_or_explain("model", snapshot_download, model,
                                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))


def load_probed(cfg: PTConfig, model: str, mm_projector: str | None, dtype) -> Probed:
    """The four forms: (a) an olaf PT export/ folder, (c) a LlavaForConditionalGeneration, (d) a folder in the
    authors' format, (b) an LLM with --vision-tower and --mm-projector."""
    from transformers import AutoConfig

    folder = Path(model)
    export_files = ("config.json", "mm_projector.bin", "task_tokens.safetensors")
    present = [f for f in export_files[1:] if (folder / f).is_file()]
    if present:  # an olaf export, whole or not
        missing = [f for f in export_files if not (folder / f).is_file()]
        if missing:
            raise TrainerError(f"{folder} is an incomplete PT export: {', '.join(missing)} missing (trainer.export "
                               f"writes all of {', '.join(export_files)})")
        return _from_export(cfg, folder, dtype)
    folder = _local_folder(model)
    raw = JsonFile(folder / "config.json") if (folder / "config.json").is_file() else None
    if raw is not None and raw.data.get("model_type") in AUTHORS_MODEL_TYPES:
        return _from_authors_folder(cfg, folder, raw, dtype)
    config = load_or_explain("model", AutoConfig.from_pretrained, model)
    if getattr(config, "model_type", None) == "llava":
        return _from_llava_hf(cfg, model, config, dtype)
    if not mm_projector or cfg.vision_tower == "model":
        raise TrainerError(f"{model} is an LLM: give --vision-tower and --mm-projector (LLaVA's mm_projector.bin), "
                           f"or pass a PT export folder, a folder in the authors' format or a "
                           f"LlavaForConditionalGeneration checkpoint")
    tokenizer, llm, tower, proj, image = _llm_tower_projector(cfg, model, cfg.vision_tower, cfg.vision_select_layer,
                                                              Path(mm_projector), dtype, "square")
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, TaskTokens({}, {}), tokenizer,
                  _choice(cfg.chat_template, _template_of(config.model_type)), image,
                  f"LLM + tower + mm_projector.bin: {model}, {cfg.vision_tower}")


@dataclass
class ProbeRun:
    """A probing run's parts: the run (trainer.build.PTRun, its model the ProbeSet) and what evaluation uses: the
    MLLM (without task tokens unless `probe_task_tokens: keep`), the prompt (no answer) and the image recipe
    (first resized to `probe_eval_resize`), as the authors' eval_probe_dsg.py."""

    run: object
    eval_mllm: MLLM
    eval_builder: PromptBuilder
    eval_image: ImageRecipe
    what: str
    expected: dict


def build_probe(cfg: PTConfig, model: str, mm_projector: str | None, layers: list[int] | None, device, dtype,
                rank: int, world: int) -> ProbeRun:
    import dataclasses

    store, expected = open_store(cfg)
    target_shapes = {t: tuple(store.manifest.tasks[t].shape) for t in cfg.tasks}
    torch.manual_seed(cfg.seed)
    probed = load_probed(cfg, model, mm_projector, dtype)
    mllm = probed.mllm()
    n_layers = mllm.config.num_hidden_layers
    layers = layers or list(range(1, n_layers + 1))
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if bad:
        raise TrainerError(f"--layers {bad}: the LLM has layers 1..{n_layers}")
    probes = ProbeSet(mllm, target_shapes, layers, cfg.predictor).to(device)
    answer = None if cfg.probe_answer == "record" else cfg.probe_answer
    builder = probed.builder(cfg.max_length, mllm.layout, answer=answer)
    run = assemble(cfg, device, dtype, store, expected, probed.tokenizer, probes, builder, probed.image, rank, world,
                   "sdpa")
    eval_mllm = probed.mllm(with_task_tokens=cfg.probe_task_tokens == "keep").to(device)
    eval_builder = probed.builder(cfg.max_length, eval_mllm.layout, with_answer=False)
    eval_image = dataclasses.replace(probed.image, pre_resize=cfg.probe_eval_resize)
    return ProbeRun(run, eval_mllm, eval_builder, eval_image, probed.what, expected)


# ---- evaluation -------------------------------------------------------------------------------------------------

def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: the cosine similarity of the flattened prediction and target (the original's
    1 - CosineEmbeddingLoss on reshape(1, -1))."""
    return F.cosine_similarity(pred.float().flatten(1), target.float().flatten(1), dim=1)


@torch.no_grad()
def evaluate(probes: ProbeSet, eval_store: Store, pr: ProbeRun, pad_id: int, batch_size: int, device):
    """{task: {layer: mean cosine}} and {task: samples} over every valid sample of the eval store's done shards,
    with the evaluation's MLLM, prompt and image recipe (ProbeRun)."""
    tasks = probes.tasks
    sample = PTSample(pr.eval_builder, pr.eval_image, tasks, eval_store.manifest.tasks)
    sums = {t: {layer: 0.0 for layer in probes.layers} for t in tasks}
    counts = dict.fromkeys(tasks, 0)
    bad = set().union(*(eval_store.records[i].bad_indices() for i in eval_store.done_shards(tasks)))
    rows: list[dict] = []

    def flush():
        if not rows:
            return
        b = to_device({**collate(rows, pad_id), "positions": (0, len(rows)), "step": 0, "row_offset": 0}, device)
        preds = probes.predict(b, pr.eval_mllm)
        for t in tasks:
            keep = b["valid"][t]
            counts[t] += int(keep.sum())
            for layer, p in preds[t].items():
                sums[t][layer] += float(cosine(p, b["targets"][t])[keep].sum())
        rows.clear()

    for shard in eval_store.done_shards(tasks):
        for s in eval_store.iter_decoded(shard, tasks, compact=True):
            if s["index"] in bad:
                continue
            rows.append(sample({**s, "position": s["index"]}))
            if len(rows) == batch_size:
                flush()
    flush()
    scores = {t: {layer: sums[t][layer] / counts[t] if counts[t] else math.nan for layer in probes.layers} for t in tasks}
    return scores, counts


def protocol(cfg: PTConfig, pr: ProbeRun) -> dict:
    """How the scores were made, beside them: what the probes read at training and at evaluation."""
    return {"train_answer": cfg.probe_answer, "eval_answer": None, "eval_resize": cfg.probe_eval_resize,
            "eval_task_tokens": list(pr.eval_mllm.layout.task_slots), "image_aspect": pr.eval_image.aspect,
            "teachers_manifest": cfg.teachers_manifest}


def write_scores(out: Path, scores: dict, counts: dict, info: dict) -> None:
    (out / "probe_scores.json").write_text(json.dumps({**info, "samples": counts,
                                                       "scores": {t: {str(k): v for k, v in s.items()}
                                                                  for t, s in scores.items()}}, indent=1))
    with open(out / "probe_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "layer", "cosine", "samples"])
        for t, by_layer in scores.items():
            for layer, v in by_layer.items():
                w.writerow([t, layer, f"{v:.6f}", counts[t]])


def plot(runs: list[Path], out: Path) -> Path:
    """Cosine similarity vs layer, one line per (run, task): the paper's Fig. 3."""
    from PIL import Image, ImageDraw

    from trainer.plot import _panel

    series = {}
    for run in runs:
        data = json.loads((run / "probe_scores.json").read_text())
        for t, by_layer in data["scores"].items():
            label = f"{run.name}/{t}" if len(runs) > 1 else t
            series[label] = sorted((int(k), v) for k, v in by_layer.items() if v == v)
    img = Image.new("RGB", (1000, 420), (255, 255, 255))
    _panel(ImageDraw.Draw(img), (0, 0, 1000, 420), series, "probe: cosine similarity to the target, per LLM layer",
           xlabel="layer")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


# ---- the command ------------------------------------------------------------------------------------------------

def parse_layers(text: str | None) -> list[int] | None:
    """'1-32', '8,12,20' or '1-4,20' -> sorted unique layers; None = every layer. ValueError says what is wrong."""
    if not text:
        return None
    out = set()
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise ValueError(f"--layers {text!r}: {part.strip()!r} is not a layer number or a range like 1-32")
        lo, hi = int(a), int(b or a)
        if lo > hi:
            raise ValueError(f"--layers {text!r}: the range {part.strip()} runs backwards (write {hi}-{lo})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.probe", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="the training store (e.g. COCO train2017, extracted by olaf)")
    p.add_argument("--eval-store", required=True, help="the evaluation store (e.g. COCO val2017)")
    p.add_argument("--model", required=True, help="the MLLM to probe: a PT export folder, a folder or Hub id in the "
                                                  "authors' format (ola_llama, llava_llama, ...), a "
                                                  "LlavaForConditionalGeneration, or an LLM (with --vision-tower and "
                                                  "--mm-projector)")
    p.add_argument("--vision-tower", help="the base encoder (required for an LLM MODEL; default: the model's)")
    p.add_argument("--mm-projector", help="LLaVA's mm_projector.bin, for an LLM MODEL")
    p.add_argument("--chat-template", help="llama_3, phi_3 or vicuna_v1 (default: the model's; vicuna_v1 for llava-hf)")
    p.add_argument("--image-aspect", choices=["model", "square", "pad"],
                   help="default model: its config's image_aspect_ratio (their IFT models: pad)")
    p.add_argument("--task-tokens", choices=["keep", "drop"],
                   help="evaluate with the model's task tokens in the sequence or without them (default drop: the "
                        "authors' probe_mode; probes always train with them, as theirs)")
    p.add_argument("--eval-resize", type=int, metavar="N",
                   help="resize evaluation images to N x N first, for the MLLM (default 640, theirs; 0: no resize). "
                        "The eval store's teachers do the same through --eval-teachers-manifest")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--layers", help="layers to probe, e.g. 1-32 or 8,12,20 (default: every layer)")
    p.add_argument("--tasks", help="comma list (default: every task of the store)")
    p.add_argument("--teachers-manifest", help="teacher manifest the training store must match (default: "
                                               "ola_vlm_probe.yaml, the authors' probing targets)")
    p.add_argument("--eval-teachers-manifest", help="the eval store's (default: ola_vlm_probe_eval.yaml, or "
                                                    "--teachers-manifest when that is given)")
    p.add_argument("--config", action="append", default=[], help="YAML overriding the defaults (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    try:
        a.layers = parse_layers(a.layers)
    except ValueError as e:
        p.error(str(e))
    # the store's tasks from its manifest alone (the records are read once, when the run is built)
    tasks = a.tasks or ",".join(t for t in TASKS if t in read_manifest(Location(a.store)).tasks)
    a.eval_teachers_manifest = a.eval_teachers_manifest or a.teachers_manifest or str(PROBE_EVAL_MANIFEST)
    sets = [*a.set, *(["probe_eval_resize=null"] if a.eval_resize == 0 else [])]
    try:
        cfg = load_config([PROBE_DEFAULTS, *a.config], {
            "store": a.store, "output_dir": a.output_dir, "vision_tower": a.vision_tower,
            "chat_template": a.chat_template, "teachers_manifest": a.teachers_manifest or str(PROBE_MANIFEST),
            "max_steps": a.max_steps, "resume": a.resume or None, "tasks": tasks, "llm": a.model,
            "image_aspect": a.image_aspect, "probe_task_tokens": a.task_tokens,
            "probe_eval_resize": a.eval_resize or None}, sets)
    except (ValueError, OSError) as e:
        p.error(str(e))
    return a, cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="python -m trainer.probe plot")
        p.add_argument("runs", nargs="+", type=Path)
        p.add_argument("--out", type=Path)
        a = p.parse_args(argv[1:])
        refuse_inside_store(a.out or a.runs[0], "--out")
        print(f"wrote {plot(a.runs, a.out or a.runs[0] / 'probe_plot.png')}")
        return 0
    a, cfg = parse_args(argv)
    rank, world, device, dtype, log = start(cfg)
    out = Path(cfg.output_dir)
    eval_store, eval_expected = open_store(cfg, a.eval_store, a.eval_teachers_manifest)  # before any model loads
    pr = build_probe(cfg, a.model, a.mm_projector, a.layers, device, dtype, rank, world)
    other = weights_mismatches(pr.expected, eval_expected, cfg.tasks)
    if other:
        raise TrainerError("the training and eval stores' manifests name other teacher weights (probes would be "
                           "scored against other teachers' targets): " + "; ".join(other))
    run, probes = pr.run, pr.run.model
    log(f"probing {pr.what}: {len(probes.layers)} layers x {len(probes.tasks)} tasks = {len(probes.probes)} probes "
        f"({sum(p.numel() for p in run.trainable):,} parameters); {run.stream.num_samples:,} training samples, "
        f"{run.total_steps} steps of {cfg.global_batch_size}")
    step = train(run, out, rank, world, log)
    if rank == 0:
        from safetensors.torch import save_file

        (out / "probes").mkdir(parents=True, exist_ok=True)
        for name, probe in probes.probes.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()},
                      out / "probes" / f"{name}.safetensors")
        probes.eval()
        scores, counts = evaluate(probes, eval_store, pr, run.pad_id, cfg.micro_batch_size, device)
        write_scores(out, scores, counts, {"model": a.model, "store": cfg.store, "eval_store": a.eval_store,
                                           "steps": step, "layers": probes.layers, "tasks": probes.tasks,
                                           "mllm_forwards": probes.forwards, "protocol": protocol(cfg, pr)})
        log(f"wrote {out / 'probe_scores.json'} and {plot([out], out / 'probe_plot.png')}")
    teardown(world)
    return 0


def run(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
