"""What every folder format shares. Writing: the checkpoint an export is made from and what the model was
(`model_info`, carried by every checkpoint), where an export may go, the one-line failure of a write. Reading: what
a reader returns (`Probed`: a frozen MLLM's parts, tokenizer, template, image recipe), and the LLM, tower and
mm_projector.bin every reader loads, each failure one line naming the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from recipes.manifest import ordered_tasks
from store import TOKEN_ORDER, refuse_inside_store
from trainer import checkpoint
from trainer.build import load_or_explain
from trainer.config import PTConfig, load_config, without_resume
from trainer.data import ImageRecipe
from trainer.errors import TrainerError
from trainer.sequence import MLLM, Layout, Projector, TaskTokens
from trainer.templates import prefix_shape, prompt_builder
from trainer.towers import load_tower


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


def save_bin(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A LLaVA-style .bin (torch.save) through a file of ours: a refused write (a full disk, a quota) is the
    OSError it is, which `write_export` says in one line; torch's own writer would raise a RuntimeError."""
    with open(path, "wb") as f:
        try:
            torch.save(tensors, f)
        except RuntimeError as e:  # torch's zip writer, closing after our file refused a write, hides the OSError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def model_info(run) -> dict:
    """What a PT run's exports say about its model (`run`: trainer.build.PTRun); every checkpoint carries it, so
    that any checkpoint can be exported on its own."""
    cfg, model = run.cfg, run.model
    return {"llm": cfg.model.llm, "vision_tower": cfg.model.vision_tower, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": cfg.model.vision_select_layer, "mm_hidden_size": model.vision.hidden_size,
            "hidden_size": model.config.hidden_size, "chat_template": cfg.model.chat_template,
            "image_aspect": cfg.model.image_aspect,
            "image_offset": model.layout.prefix, "num_image_tokens": model.layout.image, "tasks": cfg.tasks.names,
            "token_order": ordered_tasks(cfg.tasks.names), "layers": cfg.tasks.layers, "task_tokens": cfg.tasks.task_tokens,
            "special_tokens": cfg.tasks.special_tokens, "predictor": cfg.tasks.predictor,
            "target_shapes": {t: list(run.store.manifest.tasks[t].shape) for t in cfg.tasks.names},
            "target_token_order": TOKEN_ORDER, "teachers": run.store.teachers(), "store": run.store.url,
            **({"stores": run.stream.mix_info} if run.stream.mixed else {}),
            "global_batch_size": cfg.optim.global_batch_size, "connector": cfg.model.connector,
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
    cfg = load_config(recorded=without_resume(state["config"]))
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


# ---- reading ------------------------------------------------------------------------------------------------------


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
    token_order: tuple | None = None  # None: the canonical order (recipes.ordered_tasks); a released model's aux_mode
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


def choice(value: str, model_value: str) -> str:
    """A setting that may say `model`: the probed model's own value."""
    return model_value if value == "model" else value


def template_of(model_type: str | None) -> str:
    """The chat template their eval picks for a model (llava_llama_3 / llava_phi_3), by its LLM."""
    return "phi_3" if "phi" in str(model_type) else "llama_3"


def first_line(e: Exception) -> str:
    """What an error says, in a line: its first line that is not a heading ("Error(s) in loading ...:")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return next((ln for ln in lines if not ln.endswith(":")), lines[0])[:200]


PROJECTOR = ("an mlp2x_gelu projector from the tower's width {tower} to the LLM's {llm} (tensors "
             "model.mm_projector.{{0,2}}.{{weight,bias}})")


GENERATOR = "the generator its config.json describes"


def mm_projector_state(weights: dict) -> dict:
    """LLaVA's get_w: the tensors under `mm_projector.`, under the projector's own names."""
    return {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector." in k}


def read_bin(path: Path, what: str) -> dict:
    """The tensors of a .bin that should be `what` (torch.load, tensors only: no pickled code runs); one line for
    anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load of arbitrary bytes raises arbitrary errors: all mean "not tensors"
        raise TrainerError(f"{path} is not {what}: not a file of tensors ({type(e).__name__}: {first_line(e)})") \
            from None


def load_module(module: nn.Module, tensors: dict, where: str, what: str) -> nn.Module:
    """`module` with `tensors` (under `mm_projector.`) loaded strictly; one line when they do not fit."""
    try:
        module.load_state_dict(mm_projector_state(tensors))
    except Exception as e:  # missing keys, other shapes
        raise TrainerError(f"{where} is not {what}: {first_line(e)}") from None
    return module


def load_projector(tensors: dict | Path, tower_width: int, llm_width: int, where: str, dtype) -> Projector:
    """The mlp2x_gelu projector from `tensors` (a model folder's) or a mm_projector.bin."""
    what = PROJECTOR.format(tower=tower_width, llm=llm_width)
    if isinstance(tensors, Path):
        tensors = read_bin(tensors, what)
    return load_module(Projector(tower_width, llm_width), tensors, where, what).to(dtype)


def frozen_parts(llm_name: str, tower_name: str, select: int, dtype):
    """(tokenizer, LLM, tower) by name, each failure one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_or_explain("tokenizer", AutoTokenizer.from_pretrained, llm_name)
    llm = load_or_explain("LLM", AutoModelForCausalLM.from_pretrained, llm_name, dtype=dtype)
    tower = load_or_explain("vision tower", load_tower, tower_name, select_layer=select, dtype=dtype)
    return tokenizer, llm, tower


def llm_tower_projector(cfg: PTConfig, llm_name: str, tower_name: str, select: int, projector: Path, dtype,
                         aspect: str):
    tokenizer, llm, tower = frozen_parts(llm_name, tower_name, select, dtype)
    proj = load_projector(Path(projector), tower.hidden_size, llm.config.hidden_size, str(projector), dtype)
    image = ImageRecipe.from_pretrained(tower_name, choice(cfg.model.image_aspect, aspect))
    return tokenizer, llm, tower, proj, image
