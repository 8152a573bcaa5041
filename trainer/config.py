"""The PT trainer's configuration: one dataclass, loaded from YAML (defaults: configs/ola_vlm_pt.yaml), then
other YAML files, then `--set key=value` and the named CLI flags, in that order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recipes.manifest import TASKS

DEFAULTS = Path(__file__).parent / "configs" / "ola_vlm_pt.yaml"
REMOVED = {  # keys of earlier olaf configs: what took their place
    "shuffle_buffer": "the global order shuffles the whole store (order_chunk, order_mix)",
    "skip_bad_images": "samples whose image failed at extraction are never in the order; one that fails in the "
                       "trainer is masked out",
}


@dataclass
class PTConfig:
    store: str = ""
    output_dir: str = ""
    llm: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    vision_select_layer: int = -2
    image_aspect: str = "square"
    chat_template: str = "llama_3"  # llama_3 | phi_3 | vicuna_v1 | plain (VLoRA's PT: [BOS, <image>] caption "\n")
    connector: str = "mlp2x_gelu"  # mlp2x_gelu: image tokens (LLaVA, OLA-VLM) | vlora: per-sample deltas (VLoRA)
    vlora: dict = field(default_factory=dict)  # the generator's settings under their names (trainer/vlora.py)
    teachers_manifest: str | None = None  # None: recipes/manifests/ola_vlm.yaml
    fidelity: str | None = None
    tasks: list = field(default_factory=lambda: list(TASKS))
    layers: dict = field(default_factory=lambda: {"gen": [12, 20], "depth": [8, 20], "seg": [10, 18]})
    task_tokens: dict = field(default_factory=lambda: {"gen": 8, "depth": 8, "seg": 8})
    special_tokens: dict = field(default_factory=lambda: {"gen": 8, "depth": 576, "seg": 576})
    predictor: dict = field(default_factory=lambda: {"heads": 4, "dim_head": 32, "ff_mult": 1, "depth": 1})
    predictor_width: dict = field(default_factory=lambda: {"gen": "out", "depth": "llm", "seg": "out"})
    use_intermediate_depth: bool = False
    ntp_labels: str = "corrected"
    task_loss_weight: float = 0.5
    contrastive_weight: float = 0.3
    smooth_l1_beta: float = 1.0
    logit_scale_init: float = 2.0
    logit_scale_max: float = 100.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1
    max_steps: int | None = None
    global_batch_size: int = 256
    micro_batch_size: int = 32
    max_grad_norm: float | None = None
    max_length: int = 4096
    gradient_checkpointing: bool = True
    attn_implementation: str = "auto"
    precision: str = "auto"
    seed: int = 42
    order_chunk: int = 4
    order_mix: int = 32
    num_workers: int = 4
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    allow_partial_store: bool = False
    resume: bool = False
    note: str = ""
    # trainer.probe only: the authors' probing protocol (docs/probing.md); every deviation is a switch
    probe_answer: str = "n"  # every training prompt's answer, their fixed one token ("record": each record's own)
    probe_eval_resize: int | None = 640  # evaluation images are resized to N x N first, as theirs (null: as they are)
    probe_task_tokens: str = "drop"  # evaluate without the model's task tokens, as their probe_mode (or keep)

    def validate(self) -> None:
        """Every problem of the config in one ValueError, in stages: a later stage reads what an earlier one
        checked."""
        for stage in (self._structure_problems, self._task_problems, self._value_problems, self._choice_problems):
            problems = stage()
            if problems:
                raise ValueError("bad trainer config:\n  " + "\n  ".join(problems))

    def _structure_problems(self) -> list[str]:
        problems = []
        if not self.store:
            problems.append("store is required (--store)")
        if not self.output_dir:
            problems.append("output_dir is required (--output-dir)")
        if not isinstance(self.tasks, list):  # [] is LLaVA-1.5's PT: next-token prediction only, the baseline
            problems.append(f"tasks must be a list of {', '.join(TASKS)} (e.g. tasks=gen,seg; [] for NTP only), "
                            f"got {self.tasks!r}")
        elif [t for t in self.tasks if t not in TASKS]:
            problems.append(f"tasks {[t for t in self.tasks if t not in TASKS]} unknown; choose from {TASKS}")
        for name in ("layers", "task_tokens", "special_tokens", "predictor", "predictor_width", "vlora"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"{name} must be a mapping (e.g. {{gen: ..., depth: ..., seg: ...}}), "
                                f"got {getattr(self, name)!r}")
        return problems

    def _task_problems(self) -> list[str]:
        problems = []
        for t in self.tasks:
            layers = self.layers.get(t)
            if not layers:
                problems.append(f"layers.{t} is empty")
            elif not isinstance(layers, list) or not all(isinstance(x, int) and x >= 1 for x in layers):
                problems.append(f"layers.{t} must be a list of 1-based layer numbers, got {layers!r}")
            for name in ("task_tokens", "special_tokens"):
                v = getattr(self, name).get(t)
                if not isinstance(v, int) or v < 1:
                    problems.append(f"{name}.{t} must be a positive integer, got {v!r}")
            w = self.predictor_width.get(t)
            if not (w in ("out", "llm") or (isinstance(w, int) and w > 0)):
                problems.append(f"predictor_width.{t} must be out, llm or a positive integer, got {w!r}")
            if not problems and t in ("depth", "seg") and self.special_tokens[t] % self.task_tokens[t]:
                problems.append(f"special_tokens.{t} ({self.special_tokens[t]}) must be a multiple of "
                                f"task_tokens.{t} ({self.task_tokens[t]})")
        return problems

    def _value_problems(self) -> list[str]:
        at_least = {"micro_batch_size": 1, "global_batch_size": 1, "max_length": 1, "log_every": 1,
                    "save_every": 1, "num_workers": 0, "keep_checkpoints": 0, "order_chunk": 1}
        problems = [f"{name} must be >= {low}, got {getattr(self, name)}" for name, low in at_least.items()
                    if getattr(self, name) < low]
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 (or null: one run of `epochs`), got {self.max_steps}")
        problems += [f"{name} must be > 0, got {getattr(self, name)}" for name in ("learning_rate", "epochs")
                     if not getattr(self, name) > 0]
        problems += [f"{name} must be >= 0, got {getattr(self, name)}"
                     for name in ("weight_decay", "task_loss_weight", "contrastive_weight") if getattr(self, name) < 0]
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0 or null (no clipping), got {self.max_grad_norm}")
        return problems

    def _choice_problems(self) -> list[str]:
        problems = []
        if self.global_batch_size % self.micro_batch_size:
            problems.append(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                            f"{self.micro_batch_size}")
        if self.order_mix < self.order_chunk or self.order_mix % self.order_chunk:
            problems.append(f"order_mix ({self.order_mix}) must be a multiple of order_chunk ({self.order_chunk})")
        if self.ntp_labels not in ("corrected", "original"):
            problems.append(f"ntp_labels must be corrected or original, got {self.ntp_labels!r}")
        elif self.ntp_labels == "original" and self.chat_template != "llama_3":
            problems.append("ntp_labels: original reproduces an off-by-one of the original's preprocess_llama_3; "
                            f"with chat_template {self.chat_template} use corrected")
        if self.image_aspect not in ("square", "pad", "model"):
            problems.append(f"image_aspect must be square, pad or model (trainer.probe: the probed model's), got "
                            f"{self.image_aspect!r}")
        if self.probe_task_tokens not in ("keep", "drop"):
            problems.append(f"probe_task_tokens must be keep or drop, got {self.probe_task_tokens!r}")
        if self.probe_eval_resize is not None and self.probe_eval_resize < 1:
            problems.append(f"probe_eval_resize must be >= 1 or null (no resize), got {self.probe_eval_resize}")
        if self.connector not in ("mlp2x_gelu", "vlora"):
            problems.append(f"connector must be mlp2x_gelu or vlora, got {self.connector!r}")
        elif self.connector == "vlora":  # its typed section, checked before any model loads
            from trainer.vlora import VLoRAError, VLoRASettings

            try:
                VLoRASettings.of(self.vlora)
            except VLoRAError as e:
                problems.append(str(e))
        if (self.chat_template == "plain") != (self.connector == "vlora"):
            problems.append(f"chat_template plain is VLoRA's PT conversation and goes with connector vlora (got "
                            f"chat_template {self.chat_template}, connector {self.connector})")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        return problems


_TYPES = {f.name: str(f.type) for f in dataclasses.fields(PTConfig)}


def _coerce(name: str, value):
    """A value for field `name`, by the field's declared type: YAML 1.1 reads `3e-3` as a string, and a
    `--set` value arrives as text."""
    kind = _TYPES[name]
    if value is None:
        if "None" not in kind:
            raise ValueError(f"{name} cannot be null")
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind}, got {value!r}") from None
    if kind.startswith("list") and isinstance(value, str):
        parsed = yaml.safe_load(value)  # "[gen, seg]", or a comma list: tasks=gen,seg / tasks=gen
        return parsed if isinstance(parsed, list) else [x.strip() for x in value.split(",") if x.strip()]
    return yaml.safe_load(value) if isinstance(value, str) else value  # dicts


def load_config(paths: list[str | Path] = (), overrides: dict | None = None, sets: list[str] = ()) -> PTConfig:
    names = {f.name for f in dataclasses.fields(PTConfig)}
    data: dict = {}
    for p in [DEFAULTS, *paths]:
        loaded = yaml.safe_load(Path(p).read_text()) or {}
        removed = [f"{k}: {REMOVED[k]}" for k in loaded if k in REMOVED]
        if removed:
            raise ValueError(f"{p}: keys no longer used, remove them:\n  " + "\n  ".join(removed))
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"{p}: unknown config keys {sorted(unknown)}")
        data.update({k: _coerce(k, v) for k, v in loaded.items()})
    cfg = PTConfig(**data)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {item!r}: expected key=value with a key of PTConfig ({', '.join(sorted(names))})")
        setattr(cfg, key, _coerce(key, value if value.lower() not in ("null", "none", "~") else None))
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, _coerce(k, v))
    cfg.validate()
    return cfg
