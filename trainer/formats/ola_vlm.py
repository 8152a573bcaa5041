"""OLA-VLM's model folders. `ola-vlm` writes what OLA-VLM's own PT run leaves in `outputs/pretrain_dsg_...` and its `finetune.sh` continues
from (`--model_name_or_path DIR`), derived from reading their code (ola_vlm/train/ola_vlm_train.py,
model/llava_arch.py, model/language_model/base_ola_vlm.py, model/aux_heads/*):
  * the whole LLM, with the `<pad>` token their PT adds (vocabulary + 1; its input and output embeddings the
    mean of the others, as their smart_tokenizer_and_embedding_resize), and the tokenizer with it;
  * the base encoder under model.vision_tower.vision_tower.* (CLIP's transformers names, ConvNeXt's timm names,
    as their towers hold them; their loader initialises a missing key randomly, with only a warning), the
    projector under model.mm_projector.{0,2};
  * the task tokens model.special_{gen,depth,seg}_tokens (gen 8 x H; depth and seg 576 x H, pooled to 8 at load
    because config.task_token_format = "expand_emb": without it IFT would insert all 576);
  * the predictors as image_{gen,depth,seg}_heads.{i}.projector.* (TaskTokenResampler), the depth head's
    linear_1..3 when use_intermediate_depth, and {task}_logit_scale, which their PT checkpoints carry;
  * config.json: the LLM's config plus their fields (mm_*, aux_mode, num_task_tokens, task_token_format, the
    image_gen / image_depth / image_seg dicts with token counts, widths, 1-based layer indices "a-b").
The teachers (~9 GB in their checkpoints) are left out: IFT does not use them.

The folder is written for the authors' pinned environment (transformers 4.41.1, tokenizers 0.19.1), which reads
other names than the transformers olaf runs on (`authors_llm_config`, `authors_tokenizer_files`): top-level
`rope_theta`, `rope_scaling` and `torch_dtype`, a tokenizer class 4.41 knows, the chat template inside
tokenizer_config.json, and CLIPVisionModel's `vision_model.` key prefix. tests/test_authors_env.py loads it
there. An LLM with Llama-3.1's `llama3` RoPE scaling needs transformers >= 4.43 (4.41.1 refuses its config).

Read: their released folders (model_type ola_llama, ola_phi3, llava_llama, llava_phi3, their probe checkpoints)
and olaf's --format ola-vlm, every config field olaf relies on checked (trainer.fields).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from recipes.manifest import TASKS
from store import atomic_path
from trainer.build import add_pad_token, load_or_explain
from trainer.config import PTConfig
from trainer.data import ASPECTS, ImageRecipe
from trainer.errors import TrainerError
from trainer.fields import JsonFile
from trainer.formats.common import ExportError, Probed, choice, first_line, from_checkpoint, load_projector, template_of
from trainer.sequence import TaskTokens
from trainer.towers import load_tower

HEADS = {"gen": "image_gen_heads", "depth": "image_depth_heads", "seg": "image_seg_heads"}


# their model classes (ola_vlm/model/language_model/*), by the LLM's model_type: OLA-VLM's, and LLaVA-1.5's for a
# run without tasks (the baseline)
ARCH = {"llama": {"ola": ("ola_llama", "OlaLlavaLlamaForCausalLM"), "llava": ("llava_llama", "LlavaLlamaForCausalLM")},
        "phi3": {"ola": ("ola_phi3", "OlaLlavaPhi3ForCausalLM"), "llava": ("llava_phi3", "LlavaPhi3ForCausalLM")}}


LAYER_KEY = {"gen": "img_layer_indices", "depth": "depth_layer_indices", "seg": "seg_layer_indices"}


WEIGHT_KEY = {"gen": "img_loss_weight", "depth": "depth_loss_weight", "seg": "seg_loss_weight"}


def head_key(name: str) -> str:
    """An olaf predictor parameter (after `predictors.<task>_<layer>.`) -> its name in OLA-VLM's head."""
    name = re.sub(r"^blocks\.(\d+)\.0\.norm_keys\.", r"projector.layers.\1.0.norm1.", name)
    name = re.sub(r"^blocks\.(\d+)\.0\.norm_latents\.", r"projector.layers.\1.0.norm2.", name)
    name = re.sub(r"^blocks\.", "projector.layers.", name)
    if name.startswith(("proj_in.", "proj_out.", "norm_out.")):
        name = "projector." + name
    return name  # linear_1..3 sit on the head itself


def ola_vlm_config(cfg: PTConfig, llm_config: dict, info: dict, vocab: int, pad_id: int) -> dict:
    """config.json: the LLM's config, LLaVA's fields, and OLA-VLM's when the run has tasks (a run without is
    LLaVA-1.5's PT: their LlavaLlamaForCausalLM / LlavaPhi3ForCausalLM)."""
    kind = "ola" if cfg.tasks.names else "llava"
    model_type, arch = ARCH.get(llm_config.get("model_type"), {}).get(kind, (None, None))
    if arch is None:
        raise ExportError(f"OLA-VLM releases Llama-3 and Phi-3 models; this run's LLM is {llm_config.get('model_type')!r}")
    out = {**llm_config, "model_type": model_type, "architectures": [arch], "vocab_size": vocab,
           "pad_token_id": pad_id,
           "mm_vision_tower": cfg.model.vision_tower, "mm_vision_select_layer": cfg.model.vision_select_layer,
           "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
           "mm_hidden_size": info["mm_hidden_size"], "mm_patch_merge_type": "flat", "use_mm_proj": True,
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": True,
           "image_aspect_ratio": cfg.model.image_aspect, "tokenizer_padding_side": "right",
           "tokenizer_model_max_length": cfg.model.max_length,
           "olaf": {"run": info.get("store"), "steps": info.get("steps"), "checkpoint": info.get("checkpoint"),
                    "teachers": info.get("teachers")}}
    return {**out, **ola_fields(cfg, info)} if cfg.tasks.names else out


def ola_fields(cfg: PTConfig, info: dict) -> dict:
    """OLA-VLM's own config fields: task tokens, heads, teachers."""
    beyond = [t for t in cfg.tasks.names if t not in TASKS]
    if beyond:
        raise ExportError(f"OLA-VLM's code knows the tasks {', '.join(TASKS)}; this run also trained {beyond}: "
                          f"the run's own export (RUN/export, written at its end) keeps every task")
    if len({cfg.tasks.task_tokens[t] for t in cfg.tasks.names}) != 1:
        raise ExportError(f"OLA-VLM has one num_task_tokens for every task; this run has {cfg.tasks.task_tokens}")
    p, shapes = cfg.tasks.predictor, info["target_shapes"]
    names = cfg.tasks.names
    out = {"aux_mode": "-".join(t for t in TASKS if t in names), "num_task_tokens": cfg.tasks.task_tokens[names[0]],
           "task_token_format": "expand_emb", "contrastive_loss_weight": cfg.tasks.contrastive_weight,
           "pass_text_to_aux": True, "use_contrastive": True, "use_ce": False, "sample_tokens": False,
           "image_generator": "stabilityai/stable-diffusion-2-1-unclip",
           "image_segmentor": "shi-labs/oneformer_coco_swin_large", "depth_estimator": "depth_anything_v2_vitl.pth"}
    for t in cfg.tasks.names:
        d = {"depth": p["depth"], "dim_head": p["dim_head"], "num_heads": p["heads"],
             "num_tokens": shapes[t][0], "output_dim": shapes[t][1], "ff_mult": p["ff_mult"],
             LAYER_KEY[t]: "-".join(str(x) for x in cfg.tasks.layers[t]), WEIGHT_KEY[t]: cfg.tasks.task_loss_weight}
        if t == "depth":
            d["use_intermediate_depth"] = cfg.tasks.use_intermediate_depth
        if t == "seg":
            d["seg_teacher"] = "oneformer"
        out[{"gen": "image_gen", "depth": "image_depth", "seg": "image_seg"}[t]] = d
    return out


AUTHORS_TRANSFORMERS = "4.41.1"


class AuthorsWarning(UserWarning):
    """The export works, but the authors' environment will not read it as meant (the message says why)."""


# rope types 4.41 computes from {"type", "factor"} alone; "llama3" arrived in 4.43 with more fields
ROPE_TYPES_4_41 = ("linear", "dynamic")


def authors_llm_config(llm_config: dict) -> dict:
    """The LLM's config.json fields under the names 4.41.1 reads. transformers 5 writes RoPE as
    `rope_parameters` and the dtype as `dtype`; 4.41 reads neither and would silently fall back to rope_theta
    10000 (Llama-3 uses 500000) and no scaling."""
    out = dict(llm_config)
    rope = dict(out.get("rope_parameters") or {})
    if "rope_theta" in rope:
        out["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    if kind in ROPE_TYPES_4_41:
        out["rope_scaling"] = {"type": kind, "factor": rope["factor"]}  # 4.41 wants exactly these two fields
    elif kind != "default":
        out["rope_scaling"] = {"rope_type": kind, **rope}  # as Llama-3.1's own config.json (4.43+ reads it)
    elif out.get("rope_scaling") is not None and not out["rope_scaling"]:
        out["rope_scaling"] = None
    if out.get("dtype") is not None:
        out["torch_dtype"] = str(out["dtype"]).replace("torch.", "")
    return out


def authors_rope_warning(config: dict) -> str | None:
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind and kind not in ROPE_TYPES_4_41:
        return (f"this LLM uses {kind!r} RoPE scaling, which transformers {AUTHORS_TRANSFORMERS} (the authors' pin) "
                f"cannot compute: it refuses the config; run their IFT with transformers >= 4.43")
    return None


def authors_tokenizer_files(folder: Path) -> None:
    """tokenizer_config.json as 4.41.1 reads it: a class it knows (transformers 5 writes `TokenizersBackend`,
    which 4.41 cannot import) and the chat template inside (5 keeps it in chat_template.jinja, which 4.41 never
    opens). Every tokenizer olaf saves has a tokenizer.json, so the fast classes apply."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class") or "PreTrainedTokenizerFast"
    if name in ("TokenizersBackend", "PreTrainedTokenizer"):
        name = "PreTrainedTokenizerFast"
    elif not name.endswith("Fast"):
        name += "Fast"
    config["tokenizer_class"] = name
    template = folder / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text()
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    legacy_bpe_merges(folder / "tokenizer.json")


def legacy_bpe_merges(path: Path) -> None:
    """tokenizers >= 0.20 writes a BPE model's merges as pairs (["a", "b"]); 0.19.1 (their pin) parses only the
    "a b" strings and refuses the file. Byte-level BPE tokens hold no space, so the old form says the same."""
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    merges = model.get("merges") or []
    if model.get("type") != "BPE" or not merges or isinstance(merges[0], str):
        return
    if any(" " in part for pair in merges for part in pair):
        warnings.warn(f"{path.name}: a BPE merge holds a space, which tokenizers 0.19 (the authors' pin) cannot "
                      f"represent: their environment cannot read this tokenizer", AuthorsWarning, stacklevel=3)
        return
    model["merges"] = [" ".join(pair) for pair in merges]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def authors_tower_warning(name: str) -> str | None:
    """Their build_vision_tower builds CLIPVisionTower for a name containing `clip` (case-sensitive) and not
    `convnext`, CLIPConvNextVisionTower for one containing `convnext` (any case), and raises otherwise."""
    if ("clip" in name and "convnext" not in name) or "convnext" in name.lower():
        return None
    return (f"mm_vision_tower {name!r}: the authors' build_vision_tower builds only names containing 'clip' "
            f"(lower case) or 'convnext'; their IFT will raise 'Unknown vision tower' (rename the folder, e.g. "
            f"to one containing 'clip')")


def authors_tower_key(key: str, convnext: bool) -> str:
    """A tower tensor under the names their tower module holds: CLIPVisionModel's `vision_model.` prefix
    (transformers 5 drops it from the state dict), timm's names for the ConvNeXt trunk (export_state)."""
    if convnext or key.startswith("vision_model."):
        return key
    return "vision_model." + key


def ola_vlm_tensors(cfg: PTConfig, trained: dict[str, torch.Tensor], llm_state: dict[str, torch.Tensor],
                    vision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the folder under OLA-VLM's names."""
    from trainer.towers import is_convnext

    out = dict(llm_state)
    convnext = is_convnext(cfg.model.vision_tower)
    out.update({f"model.vision_tower.vision_tower.{authors_tower_key(k, convnext)}": v for k, v in vision_state.items()})
    for name, v in trained.items():
        if name.startswith("projector."):
            out[f"model.mm_{name}"] = v
        elif name.startswith("special_tokens."):
            out[f"model.special_{name.split('.', 1)[1]}_tokens"] = v
        elif name.startswith("logit_scales."):
            out[f"{name.split('.', 1)[1]}_logit_scale"] = v.reshape(())
        elif name.startswith("predictors."):
            which, rest = name[len("predictors."):].split(".", 1)
            task, layer = which.split("_")
            out[f"{HEADS[task]}.{cfg.tasks.layers[task].index(int(layer))}.{head_key(rest)}"] = v
        else:
            raise ExportError(f"no OLA-VLM name for the trained tensor {name!r}")
    return out


def write_authors_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer,
                         max_shard_size: str = "5GB") -> None:
    """A model folder as transformers 4.41.1 reads it: safetensors (with the metadata 4.41 requires), config.json
    as given (`authors_llm_config` names), the tokenizer with `authors_tokenizer_files`."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict({k: v.contiguous() for k, v in tensors.items()}, folder, max_shard_size=max_shard_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(folder)
    authors_tokenizer_files(folder)


def export_ola_vlm(run_dir: Path, out: Path, ckpt: Path | None = None, max_shard_size: str = "5GB") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.towers import load_tower

    ckpt, info, cfg = from_checkpoint(run_dir, ckpt)
    if info.get("connector", "mlp2x_gelu") != "mlp2x_gelu":
        raise ExportError(f"OLA-VLM's IFT has no {info['connector']} connector: export this run with --format vlora")
    trained = load_file(ckpt / "trainable.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.llm)
    llm = AutoModelForCausalLM.from_pretrained(cfg.model.llm, dtype="auto")
    vision = load_tower(cfg.model.vision_tower, cfg.model.vision_select_layer, dtype=torch.float32)
    pad_id = add_pad_token(tokenizer, llm)
    llm_state = llm.state_dict()
    if llm.config.tie_word_embeddings:
        llm_state.pop("lm_head.weight", None)
    dtype = next(iter(llm_state.values())).dtype
    tensors = ola_vlm_tensors(cfg, {k: v.to(dtype) for k, v in trained.items()}, llm_state,
                              {k: v.to(dtype) for k, v in vision.export_state().items()})
    config = ola_vlm_config(cfg, authors_llm_config(llm.config.to_dict()), info, len(tokenizer), pad_id)
    for problem in (authors_rope_warning(config), authors_tower_warning(cfg.model.vision_tower)):
        if problem:
            warnings.warn(problem, AuthorsWarning, stacklevel=2)
    with atomic_path(out) as tmp:
        Path(tmp).mkdir()
        write_authors_folder(Path(tmp), tensors, config, tokenizer, max_shard_size)
    return Path(out)


# ---- reading their folders ----------------------------------------------------------------------------------------


# their model types -> the LLM's (transformers'); olaf's --format ola-vlm writes the first. A released probe
# checkpoint (shi-labs/probe_depth_llava-1.5-pt-ift: probe_dsg_llava_llama, probe_mode set) holds its whole MLLM,
# the paper's LLaVA-1.5 baseline among them
AUTHORS_MODEL_TYPES = {"ola_llama": "llama", "ola_phi3": "phi3", "llava_llama": "llama", "llava_phi3": "phi3",
                       "probe_dsg_llava_llama": "llama"}


PREFIX = {"tower": "model.vision_tower.vision_tower.", "projector": "model.mm_projector.", "tokens": "model.special_"}


def folder_tensors(folder: Path, prefixes) -> dict[str, torch.Tensor]:
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


def authors_task_tokens(config: JsonFile, tensors: dict, folder: Path) -> tuple[TaskTokens, tuple[str, ...]]:
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


def authors_tower(cfg: PTConfig, config: JsonFile, tensors: dict, dtype):
    """The tower their builder makes from mm_vision_tower (or --vision-tower, e.g. a local copy); a ConvNeXt's
    weights then reloaded from the folder, as their load_pretrained_model's reload_from_ckpt does."""
    from trainer.towers import TRUNK, account_convnext, is_convnext

    name = cfg.model.vision_tower if cfg.model.vision_tower != "model" else config.get("mm_vision_tower", str)
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


def read_authors_folder(cfg: PTConfig, folder: Path, config: JsonFile, dtype) -> Probed:
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
        raise TrainerError(f"{config.path}: transformers refuses it as a {base} config: {first_line(e)}") from None
    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, str(folder))
    llm = load_or_explain("LLM", AutoModelForCausalLM.from_pretrained, str(folder), config=llm_config, dtype=dtype)
    tensors = folder_tensors(folder, PREFIX.values())
    tower, tower_name = authors_tower(cfg, config, tensors, dtype)
    proj = load_projector(tensors, tower.hidden_size, llm.config.hidden_size, str(folder), dtype)
    tokens, order = authors_task_tokens(config, tensors, folder)
    image = ImageRecipe.from_pretrained(tower_name, choice(cfg.model.image_aspect, aspect))
    return Probed(llm.get_input_embeddings(), llm.get_decoder(), tower, proj, tokens, tokenizer,
                  choice(cfg.model.chat_template, template_of(base)), image,
                  f"{config.get('model_type', str)} folder {folder} ({tower_name})", token_order=order)
