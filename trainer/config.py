"""The PT trainer's configuration: typed sections, loaded from YAML (defaults: configs/ola_vlm_pt.yaml), then other
YAML files, then `--set section.key=value` and the named CLI flags, in that order.

    model   the frozen LLM and tower, the connector, the conversation, precision and memory
    data    the store, its global order, the loader
    tasks   the distilled tasks (their names, layers, tokens, predictors) and their losses
    optim   AdamW, the schedule, the batch, the seed
    run     where the run writes, how often it logs and saves, resuming
    vlora   VLoRA's generator settings, under their names (trainer/vlora.py: VLoRASettings)
    probe   trainer.probe's protocol (docs/probing.md)

Each section checks its own values where it loads; PTConfig checks what ties sections together. Every flat key of
the YAMLs and checkpoints of olaf before the sections (`learning_rate`, `probe_answer`, `tasks: [gen]`, ...) loads
as it did: `FLAT` maps each to its section, in one table. An unknown key is one line naming the closest known one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recipes.manifest import TASKS
from store.layout import task_name_problem
from trainer.reporting import REPORTERS

DEFAULTS = Path(__file__).parent / "configs" / "ola_vlm_pt.yaml"
REMOVED = {  # keys of earlier olaf configs: what took their place
    "shuffle_buffer": "the global order shuffles the whole store (data.order_chunk, data.order_mix)",
    "skip_bad_images": "samples whose image failed at extraction are never in the order; one that fails in the "
                       "trainer is masked out",
}


@dataclass
class ModelSection:
    llm: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    vision_select_layer: int = -2
    image_aspect: str = "square"
    chat_template: str = "llama_3"  # llama_3 | phi_3 | vicuna_v1 | plain (VLoRA's PT: [BOS, <image>] caption "\n")
    connector: str = "mlp2x_gelu"  # mlp2x_gelu: image tokens (LLaVA, OLA-VLM) | vlora: per-sample deltas (VLoRA)
    ntp_labels: str = "corrected"
    max_length: int = 4096
    gradient_checkpointing: bool = True
    attn_implementation: str = "auto"
    precision: str = "auto"
    sharding: str = "none"  # none: DDP (every rank holds the trained state) | fsdp: FSDP2 shards it (trainer/sharding.py)

    def problems(self) -> list[str]:
        out = _at_least(self, "model", {"max_length": 1})
        out += _choice(self, "model", "sharding", ("none", "fsdp"))
        out += _choice(self, "model", "ntp_labels", ("corrected", "original"))
        out += _choice(self, "model", "image_aspect", ("square", "pad", "model"),
                       " (trainer.probe: model, the probed model's)")
        out += _choice(self, "model", "connector", ("mlp2x_gelu", "vlora"))
        out += _choice(self, "model", "precision", ("auto", "bf16", "fp32"))
        return out


@dataclass
class DataSection:
    store: str = ""  # one store (--store)
    stores: list = field(default_factory=list)  # several, in one global order: paths, or {path, weight} mappings
    mix: list | None = None  # each store's weight (--mix 3,1); null: proportional to size (their concatenation)
    eval_store: str = ""  # held-out samples (--eval-store): their losses every run.eval_every steps
    allow_partial_store: bool = False
    order_chunk: int = 4
    order_mix: int = 32
    num_workers: int = 4

    def sources(self) -> tuple[list[str], list[float] | None]:
        """(the stores' paths, their weights or None), from `store`, or `stores` and `mix` (checked)."""
        if not self.stores:
            return [self.store], None
        paths = [e["path"] if isinstance(e, dict) else str(e) for e in self.stores]
        given = [e.get("weight") for e in self.stores if isinstance(e, dict) and e.get("weight") is not None]
        weights = self.mix if self.mix is not None else given or None
        return paths, None if weights is None else [float(w) for w in weights]

    def _mix_problems(self) -> list[str]:
        if self.store and self.stores:
            return ["data.store and data.stores are both given: list every store in data.stores (or --store, "
                    "repeated)"]
        bad = [e for e in self.stores if not (isinstance(e, str) and e) and not (isinstance(e, dict) and
                                                                               e.get("path") and set(e) <= {"path", "weight"})]
        if bad:
            return [f"data.stores: each entry is a path or {{path: ..., weight: ...}}, got {bad[0]!r}"]
        given = [e for e in self.stores if isinstance(e, dict) and e.get("weight") is not None]
        if given and (len(given) != len(self.stores) or self.mix is not None):
            return ["data.stores: give every store a weight, or none (and --mix for all of them)"]
        weights = self.mix if self.mix is not None else [e["weight"] for e in given]
        if self.mix is not None and len(self.mix) != max(1, len(self.stores)):
            return [f"data.mix has {len(self.mix)} weights for {max(1, len(self.stores))} stores: give one per --store"]
        try:
            if any(not float(w) > 0 for w in weights):
                raise ValueError
        except (TypeError, ValueError):
            return [f"data.mix: weights are positive numbers (e.g. --mix 3,1), got {weights!r}"]
        return []

    def problems(self) -> list[str]:
        out = [] if self.store or self.stores else ["data.store is required (--store)"]
        out += self._mix_problems()
        out += _at_least(self, "data", {"num_workers": 0, "order_chunk": 1})
        if self.order_mix < self.order_chunk or self.order_mix % self.order_chunk:
            out.append(f"data.order_mix ({self.order_mix}) must be a multiple of data.order_chunk "
                       f"({self.order_chunk})")
        return out


@dataclass
class TasksSection:
    names: list = field(default_factory=lambda: list(TASKS))
    teachers_manifest: str | None = None  # None: recipes/manifests/ola_vlm.yaml
    fidelity: str | None = None
    layers: dict = field(default_factory=lambda: {"gen": [12, 20], "depth": [8, 20], "seg": [10, 18]})
    task_tokens: dict = field(default_factory=lambda: {"gen": 8, "depth": 8, "seg": 8})
    special_tokens: dict = field(default_factory=lambda: {"gen": 8, "depth": 576, "seg": 576})
    predictor: dict = field(default_factory=lambda: {"heads": 4, "dim_head": 32, "ff_mult": 1, "depth": 1})
    predictor_width: dict = field(default_factory=lambda: {"gen": "out", "depth": "llm", "seg": "out"})
    use_intermediate_depth: bool = False
    task_loss_weight: float = 0.5
    contrastive_weight: float = 0.3
    smooth_l1_beta: float = 1.0
    logit_scale_init: float = 2.0
    logit_scale_max: float = 100.0

    def problems(self) -> list[str]:
        if not isinstance(self.names, list):  # [] is LLaVA-1.5's PT: next-token prediction only, the baseline
            return [f"tasks.names must be a list of the store's tasks (e.g. tasks=gen,seg, {','.join(TASKS)},dino; "
                    f"[] for NTP only), got {self.names!r}"]
        bad = [problem for t in self.names if (problem := task_name_problem(t))]
        if bad:
            return [f"tasks.names: {bad[0]}"]
        if len(set(self.names)) < len(self.names):
            return [f"tasks.names lists a task twice: {self.names}"]
        mappings = ("layers", "task_tokens", "special_tokens", "predictor", "predictor_width")
        out = [f"tasks.{n} must be a mapping (e.g. {{gen: ..., depth: ..., seg: ...}}), got {getattr(self, n)!r}"
               for n in mappings if not isinstance(getattr(self, n), dict)]
        if out:
            return out
        out += [f"tasks.{n} must be >= 0, got {getattr(self, n)}" for n in ("task_loss_weight", "contrastive_weight")
                if getattr(self, n) < 0]
        for t in self.names:
            out += self._task_problems(t)
        return out

    def with_defaults(self, shapes: dict[str, tuple]) -> dict[str, dict]:
        """The per-task mappings with an entry for every task of `names`: a task without one (a teacher beyond
        OLA-VLM's three) gets the defaults its target's shape implies: a 1-token target is trained as gen (8
        task tokens, the predictor's one query their hidden states' mean, layers 12 and 20), a grid of T tokens
        as seg (T special tokens pooled to 8 task tokens, one query per token, layers 10 and 18)."""
        out = {n: dict(getattr(self, n)) for n in ("layers", "task_tokens", "special_tokens", "predictor_width")}
        for t in self.names:
            tokens = int(shapes[t][0])
            pooled = max(k for k in range(1, 9) if tokens % k == 0) if tokens > 1 else 8
            like = {"layers": [12, 20], "task_tokens": 8, "special_tokens": 8, "predictor_width": "out"} \
                if tokens == 1 else {"layers": [10, 18], "task_tokens": pooled, "special_tokens": tokens,
                                     "predictor_width": "out"}
            for name, value in like.items():
                out[name].setdefault(t, value)
        return out

    def _task_problems(self, t: str) -> list[str]:
        """A task's settings, checked; a task beyond OLA-VLM's three may leave any of them out (with_defaults)."""
        out, given = [], {n: getattr(self, n).get(t) for n in ("layers", "task_tokens", "special_tokens",
                                                                  "predictor_width")}
        if t not in TASKS:
            given = {n: v for n, v in given.items() if v is not None}
        if "layers" in given:
            layers = given["layers"]
            if not layers:
                out.append(f"tasks.layers.{t} is empty")
            elif not isinstance(layers, list) or not all(isinstance(x, int) and x >= 1 for x in layers):
                out.append(f"tasks.layers.{t} must be a list of 1-based layer numbers, got {layers!r}")
        for name in ("task_tokens", "special_tokens"):
            if name in given and (not isinstance(given[name], int) or given[name] < 1):
                out.append(f"tasks.{name}.{t} must be a positive integer, got {given[name]!r}")
        w = given.get("predictor_width", "out")
        if not (w in ("out", "llm") or (isinstance(w, int) and w > 0)):
            out.append(f"tasks.predictor_width.{t} must be out, llm or a positive integer, got {w!r}")
        if not out and {"task_tokens", "special_tokens"} <= set(given) and given["special_tokens"] % given["task_tokens"]:
            out.append(f"tasks.special_tokens.{t} ({given['special_tokens']}) must be a multiple of "
                       f"tasks.task_tokens.{t} ({given['task_tokens']})")
        return out


@dataclass
class OptimSection:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1
    max_steps: int | None = None
    global_batch_size: int = 256
    micro_batch_size: int = 32
    max_grad_norm: float | None = None
    seed: int = 42

    def problems(self) -> list[str]:
        out = _at_least(self, "optim", {"micro_batch_size": 1, "global_batch_size": 1})
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"optim.max_steps must be >= 1 (or null: one run of `epochs`), got {self.max_steps}")
        out += [f"optim.{n} must be > 0, got {getattr(self, n)}" for n in ("learning_rate", "epochs")
                if not getattr(self, n) > 0]
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            out.append(f"optim.max_grad_norm must be > 0 or null (no clipping), got {self.max_grad_norm}")
        if not out and self.global_batch_size % self.micro_batch_size:
            out.append(f"optim.global_batch_size {self.global_batch_size} is not a multiple of optim.micro_batch_size "
                       f"{self.micro_batch_size}")
        return out


@dataclass
class RunSection:
    output_dir: str = ""
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True  # false drops tensorboard from report_to (configs before report_to)
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb (trainer.reporting)
    wandb_project: str = "olaf"
    resume: bool = False
    note: str = ""
    eval_every: int = 0  # steps between held-out evaluations of data.eval_store (0: none)
    eval_samples: int = 256  # the held-out samples each evaluation reads: the first of the eval store's order

    def problems(self) -> list[str]:
        out = [] if self.output_dir else ["run.output_dir is required (--output-dir)"]
        unknown = [n for n in self.report_to if n not in REPORTERS] \
            if isinstance(self.report_to, list) else [self.report_to]
        if unknown:
            out.append(f"run.report_to: {unknown} unknown; a list of tensorboard and wandb (e.g. "
                       f"--set run.report_to=tensorboard,wandb)")
        return out + _at_least(self, "run", {"log_every": 1, "save_every": 1, "keep_checkpoints": 0,
                                             "eval_every": 0, "eval_samples": 1})


@dataclass
class ProbeSection:
    """trainer.probe only: the authors' probing protocol (docs/probing.md); every deviation is a switch."""

    answer: str = "n"  # every training prompt's answer, their fixed one token ("record": each record's own)
    eval_resize: int | None = 640  # evaluation images are resized to N x N first, as theirs (null: as they are)
    task_tokens: str = "drop"  # evaluate without the model's task tokens, as their probe_mode (or keep)

    def problems(self) -> list[str]:
        out = _choice(self, "probe", "task_tokens", ("keep", "drop"))
        if self.eval_resize is not None and self.eval_resize < 1:
            out.append(f"probe.eval_resize must be >= 1 or null (no resize), got {self.eval_resize}")
        return out


SECTIONS = {"model": ModelSection, "data": DataSection, "tasks": TasksSection, "optim": OptimSection,
            "run": RunSection, "probe": ProbeSection}
# every flat key of olaf before the sections -> (its section, its name there): a field's own name, but for the
# four that were named otherwise; `vlora` is a section of its own
RENAMED = {"tasks": ("tasks", "names"), "probe_answer": ("probe", "answer"),
           "probe_eval_resize": ("probe", "eval_resize"), "probe_task_tokens": ("probe", "task_tokens")}
# fields added after the sections have no flat key: they are named by their section only (`model.sharding`)
SECTION_ONLY = {("model", "sharding"), ("data", "stores"), ("data", "mix"), ("data", "eval_store"),
                ("run", "report_to"), ("run", "wandb_project"), ("run", "eval_every"), ("run", "eval_samples")}
FLAT = {f.name: (s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
        if (s, f.name) not in RENAMED.values() and (s, f.name) not in SECTION_ONLY} | RENAMED


@dataclass
class PTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    vlora: dict = field(default_factory=dict)  # the generator's settings under their names (trainer/vlora.py)
    probe: ProbeSection = field(default_factory=ProbeSection)

    def validate(self) -> None:
        """Every problem of the config in one ValueError: each section's, then what ties sections together."""
        problems = [p for name in SECTIONS for p in getattr(self, name).problems()]
        if not isinstance(self.vlora, dict):
            problems.append(f"vlora must be a mapping of VLoRA's settings, got {self.vlora!r}")
        if not problems:
            problems = self._between_sections()
        if problems:
            raise ValueError("bad trainer config:\n  " + "\n  ".join(problems))
        if self.data.mix is not None:  # `--mix 3,1` arrives as text
            self.data.mix = [float(w) for w in self.data.mix]

    def _between_sections(self) -> list[str]:
        m, out = self.model, []
        if m.ntp_labels == "original" and m.chat_template != "llama_3":
            out.append("model.ntp_labels: original reproduces an off-by-one of the original's preprocess_llama_3; "
                       f"with chat_template {m.chat_template} use corrected")
        if m.connector == "vlora":  # its typed section, checked before any model loads
            from trainer.vlora import VLoRAError, VLoRASettings

            try:
                VLoRASettings.of(self.vlora)
            except VLoRAError as e:
                out.append(str(e))
        if bool(self.data.eval_store) != bool(self.run.eval_every):
            out.append("data.eval_store (--eval-store) and run.eval_every (--eval-every) go together: give both")
        if (m.chat_template == "plain") != (m.connector == "vlora"):
            out.append(f"chat_template plain is VLoRA's PT conversation and goes with connector vlora (got "
                       f"chat_template {m.chat_template}, connector {m.connector})")
        return out


def _at_least(section, name: str, lows: dict) -> list[str]:
    return [f"{name}.{k} must be >= {low}, got {getattr(section, k)}" for k, low in lows.items()
            if getattr(section, k) < low]


def _choice(section, name: str, key: str, allowed: tuple, hint: str = "") -> list[str]:
    v = getattr(section, key)
    return [] if v in allowed else [f"{name}.{key} must be {' or '.join(allowed)}{hint}, got {v!r}"]


def _field_type(section: str, key: str) -> str:
    return next(str(f.type) for f in dataclasses.fields(SECTIONS[section]) if f.name == key)


def _coerce(where: str, kind: str, value):
    """A value for a field of declared type `kind`: YAML 1.1 reads `3e-3` as a string, and a `--set` value arrives as
    text."""
    if value is None:
        if "None" not in kind:
            raise ValueError(f"{where} cannot be null")
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
        raise ValueError(f"{where}: expected {kind}, got {value!r}") from None
    if kind.startswith("list") and isinstance(value, str):
        parsed = yaml.safe_load(value)  # "[gen, seg]", or a comma list: tasks=gen,seg / tasks=gen
        return parsed if isinstance(parsed, list) else [x.strip() for x in value.split(",") if x.strip()]
    return yaml.safe_load(value) if isinstance(value, str) else value  # dicts


def _known() -> list[str]:
    return sorted({*FLAT, "vlora", *(f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c))})


def _unknown(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, _known(), n=1, cutoff=0.6)
    return ValueError(f"{where}: unknown config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                                "; see trainer/config.py for the keys"))


def _place(key: str, value, where: str) -> list[tuple[str, str, object]]:
    """(section, name, value) for one key of a YAML, `--set` or saved config: `section.name`, a section's mapping
    (`optim: {learning_rate: ...}`), or a flat key of olaf before the sections (FLAT)."""
    if key == "vlora" or key == "tasks" and isinstance(value, list):
        return [("vlora", "", value)] if key == "vlora" else [("tasks", "names", value)]
    if key in SECTIONS and isinstance(value, dict):
        return [p for k, v in value.items() for p in _place(f"{key}.{k}", v, where)]
    section, dot, name = key.partition(".")
    if section == "vlora" and dot:  # one of VLoRA's settings (their names: trainer/vlora.py checks them)
        return [("vlora", name, value)]
    if dot and section in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        return [(section, name, value)]
    if key in REMOVED:
        raise ValueError(f"{where}: {key} is no longer used, remove it: {REMOVED[key]}")
    if key in FLAT:
        return [(*FLAT[key], value)]
    raise _unknown(key, where)


def _apply(cfg: PTConfig, placed: list[tuple[str, str, object]], text: bool = False) -> None:
    for section, name, value in placed:
        if section == "vlora":
            value = yaml.safe_load(value) if text and isinstance(value, str) else value
            cfg.vlora = {**cfg.vlora, name: value} if name else value
            continue
        kind = _field_type(section, name)
        if text and isinstance(value, str) and value.lower() in ("null", "none", "~") and "None" in kind:
            value = None  # `--set max_steps=null`; a text field keeps the word (`sharding=none`)
        setattr(getattr(cfg, section), name, _coerce(f"{section}.{name}", kind, value))


def load_config(paths: list[str | Path] = (), overrides: dict | None = None, sets: list[str] = (),
                recorded: dict | None = None) -> PTConfig:
    """The defaults (or `recorded`, a saved config: its sections, or the flat keys of olaf before them, nulls
    included), then each YAML of `paths`, then `--set` items, then `overrides` (the CLI's flags: None is a flag not
    given), checked."""
    cfg = PTConfig()
    for key, value in (recorded or {}).items():
        _apply(cfg, _place(key, value, "the recorded config"))
    for p in ([] if recorded is not None else [DEFAULTS]) + list(paths):
        loaded = yaml.safe_load(Path(p).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: a config is a mapping of keys, got {type(loaded).__name__}")
        placed = [x for key, value in loaded.items() for x in _place(key, value, str(p))]
        twice = sorted({f"{s}.{n}" for s, n, _ in placed if n and sum((s, n) == x[:2] for x in placed) > 1})
        if twice:
            raise ValueError(f"{p}: {', '.join(twice)} given twice (a flat key and its section's): keep one")
        _apply(cfg, placed)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected section.key=value (or a key of olaf's flat configs)")
        _apply(cfg, _place(key, value, f"--set {item!r}"), text=True)
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply(cfg, _place(key, value, "the config"))
    cfg.validate()
    return cfg


def with_values(cfg: PTConfig, **values) -> PTConfig:
    """A copy of `cfg` with `values` (keys as in a YAML: flat, or a section's mapping) applied, checked."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        _apply(out, _place(key, value, "the values"))
    out.validate()
    return out


def saved(cfg: PTConfig) -> dict:
    """The config as checkpoints and config.json record it: its sections."""
    return dataclasses.asdict(cfg)


def without_resume(recorded: dict) -> dict:
    """A saved config (sections, or the flat keys of olaf before them) to build a run from again, not to resume."""
    out = {k: v for k, v in recorded.items() if k != "resume"}
    if isinstance(out.get("run"), dict):
        out["run"] = {k: v for k, v in out["run"].items() if k != "resume"}
    return out
