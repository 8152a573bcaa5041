"""Exports of a PT run, for the next stage: the one module that writes them.

    RUN/export/  (written by trainer.pt at its end)
        mm_projector.bin          LLaVA's key names: usable as --pretrain_mm_mlp_adapter
        task_tokens.safetensors   special_{gen,depth,seg}_tokens
        predictors.safetensors    predictors.<task>_<layer>.* and logit_scales.<task>
        config.json               layers, token counts, widths, base model ids, teachers, store
    python -m trainer.export RUN_DIR --format ola-vlm --out DIR     # a PT model folder OLA-VLM's IFT loads
    python -m trainer.export RUN_DIR --format llava --out DIR       # RUN/export/ (mm_projector.bin, tokens, heads)
    python -m trainer.export RUN_DIR --format vlora --out DIR       # a VLoRA run: their PT output folder

`ola-vlm` writes what OLA-VLM's own PT run leaves in `outputs/pretrain_dsg_...` and its `finetune.sh` continues
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
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recipes.manifest import TASKS
from store import TOKEN_ORDER, StoreError, atomic_path, refuse_inside_store
from trainer import checkpoint
from trainer.build import add_pad_token
from trainer.config import PTConfig, load_config
from trainer.errors import TrainerError

HEADS = {"gen": "image_gen_heads", "depth": "image_depth_heads", "seg": "image_seg_heads"}
# their model classes (ola_vlm/model/language_model/*), by the LLM's model_type: OLA-VLM's, and LLaVA-1.5's for a
# run without tasks (the baseline)
ARCH = {"llama": {"ola": ("ola_llama", "OlaLlavaLlamaForCausalLM"), "llava": ("llava_llama", "LlavaLlamaForCausalLM")},
        "phi3": {"ola": ("ola_phi3", "OlaLlavaPhi3ForCausalLM"), "llava": ("llava_phi3", "LlavaPhi3ForCausalLM")}}
LAYER_KEY = {"gen": "img_layer_indices", "depth": "depth_layer_indices", "seg": "seg_layer_indices"}
WEIGHT_KEY = {"gen": "img_loss_weight", "depth": "depth_loss_weight", "seg": "seg_loss_weight"}


class ExportError(TrainerError):
    """The run cannot be exported as asked; the message says why."""


def write_export(write, run_dir: Path, out: Path, ckpt: Path | None = None) -> Path:
    """`write(run_dir, out, ckpt)` (an exporter of this module), a failed write (a full disk, a quota) one line:
    the exporters write through atomic_path, so nothing partial is left at `out`."""
    from safetensors import SafetensorError

    try:
        return write(run_dir, out, ckpt)
    except (OSError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"writing the export to {out} failed ({first}); nothing of it was left there: free "
                          f"space (or choose another --out) and export again") from None


# ---- RUN/export/: what trainer.pt leaves -------------------------------------------------------------------------

def model_info(run) -> dict:
    """What a PT run's exports say about its model (`run`: trainer.build.PTRun); every checkpoint carries it, so
    that any checkpoint can be exported on its own."""
    cfg, model = run.cfg, run.model
    return {"llm": cfg.llm, "vision_tower": cfg.vision_tower, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": cfg.vision_select_layer, "mm_hidden_size": model.vision.hidden_size,
            "hidden_size": model.config.hidden_size, "chat_template": cfg.chat_template, "image_aspect": cfg.image_aspect,
            "image_offset": model.layout.prefix, "num_image_tokens": model.layout.image, "tasks": cfg.tasks,
            "token_order": list(TASKS), "layers": cfg.layers, "task_tokens": cfg.task_tokens,
            "special_tokens": cfg.special_tokens, "predictor": cfg.predictor,
            "target_shapes": {t: list(run.store.manifest.tasks[t].shape) for t in cfg.tasks},
            "target_token_order": TOKEN_ORDER, "teachers": run.store.teachers(), "store": run.store.url,
            "global_batch_size": cfg.global_batch_size, "connector": cfg.connector,
            "vlora": getattr(model.projector, "s", None)}


def from_checkpoint(run_dir: Path, ckpt: Path | None = None) -> tuple[Path, dict, PTConfig]:
    """(the checkpoint, its export config.json -- the model's info, its step, its name --, the run's config):
    the run's latest checkpoint unless one is named. Every export format is made from one of them, so all agree
    on the step they hold."""
    run_dir = Path(run_dir)
    ckpt = Path(ckpt) if ckpt else checkpoint.latest(run_dir)
    if ckpt is None or not (ckpt / "state.json").is_file():
        raise ExportError(f"{run_dir} has no checkpoint to export ({ckpt or 'checkpoints/ is empty'})")
    state = json.loads((ckpt / "state.json").read_text())
    info = state.get("model")
    if info is None and (run_dir / "export" / "config.json").is_file():  # checkpoints of an olaf before 0.2
        info = json.loads((run_dir / "export" / "config.json").read_text())
    if info is None:
        raise ExportError(f"{ckpt} does not describe its model (written by an older olaf): export it with that olaf")
    info = {**info, "steps": state["step"], "checkpoint": ckpt.name}
    cfg = load_config([], {k: v for k, v in state["config"].items() if k != "resume"})
    return ckpt, info, cfg


def check_out(out: Path, run_dir: Path) -> None:
    """An export never merges into a folder or lands inside its run (whose files it would overwrite)."""
    refuse_inside_store(out, "--out")
    out, run_dir = Path(out).resolve(), Path(run_dir).resolve()
    if out == run_dir or run_dir in out.parents:
        raise ExportError(f"--out {out} is inside the run {run_dir}: choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty: choose a new folder (an export is never merged)")


def mm_projector_tensors(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mm_projector.bin's content: the connector's tensors (the projector, or VLoRA's generator) under LLaVA's
    `model.mm_projector.` prefix, as --pretrain_mm_mlp_adapter reads them."""
    return {f"model.mm_{k}": v for k, v in trained.items() if k.startswith("projector.")}


def export_llava(run_dir: Path, out: Path, ckpt: Path | None = None) -> Path:
    """The LLaVA-side export of a checkpoint: mm_projector.bin (LLaVA's names), the task tokens, the predictors
    and logit scales, config.json; written whole or not at all."""
    ckpt, info, _ = from_checkpoint(run_dir, ckpt)
    trained = load_file(ckpt / "trainable.safetensors")
    with atomic_path(out) as tmp:
        exp = Path(tmp)
        exp.mkdir()
        torch.save(mm_projector_tensors(trained), exp / "mm_projector.bin")
        save_file({f"special_{k.split('.', 1)[1]}_tokens": v for k, v in trained.items()
                   if k.startswith("special_tokens.")}, exp / "task_tokens.safetensors")
        save_file({k: v.reshape(1) if k.startswith("logit_scales.") else v for k, v in trained.items()
                   if k.startswith(("predictors.", "logit_scales."))}, exp / "predictors.safetensors")
        (exp / "config.json").write_text(json.dumps(info, indent=1))
    return Path(out)


# ---- --format ola-vlm: the folder their IFT continues from ---------------------------------------------------------


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
    kind = "ola" if cfg.tasks else "llava"
    model_type, arch = ARCH.get(llm_config.get("model_type"), {}).get(kind, (None, None))
    if arch is None:
        raise ExportError(f"OLA-VLM releases Llama-3 and Phi-3 models; this run's LLM is {llm_config.get('model_type')!r}")
    out = {**llm_config, "model_type": model_type, "architectures": [arch], "vocab_size": vocab,
           "pad_token_id": pad_id,
           "mm_vision_tower": cfg.vision_tower, "mm_vision_select_layer": cfg.vision_select_layer,
           "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
           "mm_hidden_size": info["mm_hidden_size"], "mm_patch_merge_type": "flat", "use_mm_proj": True,
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": True,
           "image_aspect_ratio": cfg.image_aspect, "tokenizer_padding_side": "right",
           "tokenizer_model_max_length": cfg.max_length,
           "olaf": {"run": info.get("store"), "steps": info.get("steps"), "checkpoint": info.get("checkpoint"),
                    "teachers": info.get("teachers")}}
    return {**out, **ola_fields(cfg, info)} if cfg.tasks else out


def ola_fields(cfg: PTConfig, info: dict) -> dict:
    """OLA-VLM's own config fields: task tokens, heads, teachers."""
    if len({cfg.task_tokens[t] for t in cfg.tasks}) != 1:
        raise ExportError(f"OLA-VLM has one num_task_tokens for every task; this run has {cfg.task_tokens}")
    p, shapes = cfg.predictor, info["target_shapes"]
    out = {"aux_mode": "-".join(t for t in TASKS if t in cfg.tasks), "num_task_tokens": cfg.task_tokens[cfg.tasks[0]],
           "task_token_format": "expand_emb", "contrastive_loss_weight": cfg.contrastive_weight,
           "pass_text_to_aux": True, "use_contrastive": True, "use_ce": False, "sample_tokens": False,
           "image_generator": "stabilityai/stable-diffusion-2-1-unclip",
           "image_segmentor": "shi-labs/oneformer_coco_swin_large", "depth_estimator": "depth_anything_v2_vitl.pth"}
    for t in cfg.tasks:
        d = {"depth": p["depth"], "dim_head": p["dim_head"], "num_heads": p["heads"],
             "num_tokens": shapes[t][0], "output_dim": shapes[t][1], "ff_mult": p["ff_mult"],
             LAYER_KEY[t]: "-".join(str(x) for x in cfg.layers[t]), WEIGHT_KEY[t]: cfg.task_loss_weight}
        if t == "depth":
            d["use_intermediate_depth"] = cfg.use_intermediate_depth
        if t == "seg":
            d["seg_teacher"] = "oneformer"
        out[{"gen": "image_gen", "depth": "image_depth", "seg": "image_seg"}[t]] = d
    return out


# ---- what the authors' pinned transformers (4.41.1) reads ---------------------------------------------------------

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
    convnext = is_convnext(cfg.vision_tower)
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
            out[f"{HEADS[task]}.{cfg.layers[task].index(int(layer))}.{head_key(rest)}"] = v
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
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype="auto")
    vision = load_tower(cfg.vision_tower, cfg.vision_select_layer, dtype=torch.float32)
    pad_id = add_pad_token(tokenizer, llm)
    llm_state = llm.state_dict()
    if llm.config.tie_word_embeddings:
        llm_state.pop("lm_head.weight", None)
    dtype = next(iter(llm_state.values())).dtype
    tensors = ola_vlm_tensors(cfg, {k: v.to(dtype) for k, v in trained.items()}, llm_state,
                              {k: v.to(dtype) for k, v in vision.export_state().items()})
    config = ola_vlm_config(cfg, authors_llm_config(llm.config.to_dict()), info, len(tokenizer), pad_id)
    for problem in (authors_rope_warning(config), authors_tower_warning(cfg.vision_tower)):
        if problem:
            warnings.warn(problem, AuthorsWarning, stacklevel=2)
    with atomic_path(out) as tmp:
        Path(tmp).mkdir()
        write_authors_folder(Path(tmp), tensors, config, tokenizer, max_shard_size)
    return Path(out)


# ---- --format vlora: what VLoRA's PT leaves --------------------------------------------------------------------

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
    llm = authors_llm_config(AutoConfig.from_pretrained(cfg.llm).to_dict())
    config = {**llm, "model_type": "llava_vlora", "architectures": ["LlavaLlamaVLoRAForCausalLM"],
              "mm_projector_type": "vlora", "mm_vision_tower": cfg.vision_tower, "mm_hidden_size": info["mm_hidden_size"],
              "mm_vision_select_layer": cfg.vision_select_layer, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": True,
              "image_aspect_ratio": cfg.image_aspect, "tokenizer_model_max_length": cfg.max_length,
              **{k: settings[k] for k in VLORA_FIELDS},
              "olaf": {"kv_deltas": settings["kv_deltas"], "queries_init": settings["queries_init"],
                       "placeholder": settings["placeholder"], "tasks": cfg.tasks, "steps": info.get("steps"),
                       "checkpoint": info.get("checkpoint"), "store": info.get("store")}}
    with atomic_path(out) as tmp:
        Path(tmp).mkdir()
        torch.save(mm_projector_tensors(trained), Path(tmp) / "mm_projector.bin")
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(out)


# ---- the command ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a trainer.pt --output-dir (finished or not)")
    p.add_argument("--format", choices=["ola-vlm", "llava", "vlora"], required=True,
                   help="ola-vlm: the folder OLA-VLM's IFT continues from; llava: RUN/export (mm_projector.bin, task "
                        "tokens, heads); vlora: VLoRA's PT output (mm_projector.bin + config.json) for a VLoRA run")
    p.add_argument("--out", required=True, help="a new (or empty) folder outside the run")
    p.add_argument("--checkpoint", help="a checkpoints/step-N folder (default: the run's latest)")
    a = p.parse_args(argv)
    run, out = Path(a.run_dir), Path(a.out)
    try:
        check_out(out, run)
        write = {"ola-vlm": export_ola_vlm, "llava": export_llava, "vlora": export_vlora}[a.format]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AuthorsWarning)
            path = write_export(write, run, out, Path(a.checkpoint) if a.checkpoint else None)
        for w in caught:
            if issubclass(w.category, AuthorsWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except (TrainerError, StoreError, checkpoint.CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
