"""Teacher manifests: the declarative definition of what each teacher computes (YAML; the default is
recipes/manifests/ola_vlm.yaml).

This is data, not model code: the extraction reads it to run the teachers (teachers/ holds the adapters), the
store records the resolved manifest's identity, and the trainer reads it to check a store (the trainer never
imports teachers/), so it sits at the bottom of olaf's layers, beside the recipes' image ops.

A manifest names, per task (gen, depth, seg): the weights (HF repo id + subfolder + revision, or a local
path), the preprocessing (PIL ops, channel order, rescale, mean/std), the feature definition, the output shape,
plus the stored dtype. `fidelity` picks between the original recipe, quirks included (default), and the
corrected one; each quirk says which field it sets and why.

The resolved spec of a teacher (fidelity applied) is its recipe; recipe + weights hash is its identity, which
the store records and every reader checks.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipes.imageops import Op, parse_ops
from store.layout import task_name_problem

FORMAT = "olaf.teachers/1"
TASKS = ("gen", "depth", "seg")  # OLA-VLM's three task names, the one copy; their order leads every task order
FIDELITIES = ("original", "corrected")
STORED_DTYPES = ("float16", "bfloat16")
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "manifests" / "ola_vlm.yaml"
# the authors' probing protocol (train/probe_dsg_train.py, eval/eval_probe_dsg.py): its training and eval targets
PROBE_MANIFEST = DEFAULT_MANIFEST.with_name("ola_vlm_probe.yaml")
PROBE_EVAL_MANIFEST = DEFAULT_MANIFEST.with_name("ola_vlm_probe_eval.yaml")
# OLA-VLM's three plus DINOv2-L with registers as a fourth target (hf_vision): the worked example of a new teacher
DINO_MANIFEST = DEFAULT_MANIFEST.with_name("ola_vlm_dino.yaml")


class ManifestError(ValueError):
    """A teacher manifest is malformed or asks for something olaf does not know."""


def ordered_tasks(names) -> list[str]:
    """The canonical order of a set of task names: OLA-VLM's three in their order (their token order), then any
    other in name order. Every list of tasks olaf keeps or writes is in it."""
    names = list(dict.fromkeys(names))
    return [t for t in TASKS if t in names] + sorted(t for t in names if t not in TASKS)


@dataclass(frozen=True)
class WeightsRef:
    """Where a teacher's weights come from: a local folder, or an HF repo (+ subfolder, revision)."""

    repo_id: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" for model.fp16.safetensors, as diffusers' variant="fp16"
    path: str | None = None

    def describe(self) -> str:
        if self.path:
            return f"local path {self.path}" + (f", subfolder {self.subfolder}" if self.subfolder else "")
        sub = f", subfolder {self.subfolder}" if self.subfolder else ""
        var = f", variant {self.variant}" if self.variant else ""
        return f"HF repo {self.repo_id}{sub}{var} (revision {self.revision or 'main'})"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Preprocess:
    ops: tuple[Op, ...]
    input_size: tuple[int, int]  # (height, width) every op list must end at
    channel_order: str  # "RGB", or "BGR" for a network that sees R and B swapped
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class TeacherSpec:
    task: str
    architecture: str
    weights: WeightsRef
    preprocess: Preprocess
    feature: dict
    output_shape: tuple[int, int]
    fidelity: str
    quirks_applied: tuple[str, ...]
    raw: dict = field(repr=False, compare=False)  # resolved YAML of this teacher, as recorded in stores
    compute_dtype: str = "float32"  # what the teacher runs in on a GPU (the original's); CPUs use float32

    def recipe(self) -> dict:
        """Everything that defines the computed target except the weights (compared on their own). Fidelity
        enters only through the fields its quirks set, so a teacher without quirks has one recipe under both."""
        r = copy.deepcopy(self.raw)
        r.pop("quirks", None)
        r.pop("weights", None)
        r.pop("compute_dtype", None)  # recorded on its own: what a run used, which may differ from the declared
        r["task"] = self.task
        r["quirks_applied"] = list(self.quirks_applied)
        return r

    def recipe_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtypes(manifest, tasks, device: str, override: str | None = None) -> dict[str, str]:
    """The dtype each teacher runs in: `override` (--dtype) for all, else the manifest's on a GPU (the
    original's: gen float16, depth and seg bfloat16) and float32 on a CPU (no fast half-precision kernels)."""
    if override and override != "auto":
        return {t: override for t in tasks}
    return {t: manifest.teachers[t].compute_dtype if device == "cuda" else "float32" for t in tasks}


@dataclass(frozen=True)
class TeacherManifest:
    name: str
    fidelity: str
    stored_dtype: str
    teachers: dict[str, TeacherSpec]
    source: str  # where it was read from
    description: str = ""

    def select(self, tasks: list[str] | tuple[str, ...]) -> list[TeacherSpec]:
        unknown = [t for t in tasks if t not in self.teachers]
        if unknown:
            raise ManifestError(
                f"unknown teacher(s) {', '.join(map(repr, unknown))}: {self.source} defines "
                f"{', '.join(self.teachers)}"
            )
        return [self.teachers[t] for t in ordered_tasks(tasks)]

    def identity(self, tasks=None, weights_sha256: dict[str, str] | None = None,
                 compute_dtypes: dict[str, str] | None = None, files_sha256: dict[str, str] | None = None) -> dict:
        """What a store records in teachers.yaml and readers compare: per task the recipe and its hash, the
        weights reference and, once loaded, the weights' sha256, the weight files' content sha256 where they were
        found (`files_sha256`, recipes.weights_files), and the compute dtype (the one a run used,
        `compute_dtypes`, else the declared one)."""
        tasks = ordered_tasks(t for t in (self.teachers if tasks is None else tasks) if t in self.teachers)  # []: none
        return {
            "format": FORMAT,
            "name": self.name,
            "fidelity": self.fidelity,
            "stored_dtype": self.stored_dtype,
            "description": self.description,
            "teachers": {
                t: {
                    "recipe_sha256": self.teachers[t].recipe_hash(),
                    "weights": self.teachers[t].weights.to_dict(),
                    "weights_sha256": (weights_sha256 or {}).get(t),
                    **({"weights_files_sha256": files_sha256[t]} if t in (files_sha256 or {}) else {}),
                    "compute_dtype": (compute_dtypes or {}).get(t, self.teachers[t].compute_dtype),
                    "recipe": self.teachers[t].recipe(),
                }
                for t in tasks
            },
        }


def _get(d: dict, key: str, where: str, typ=None):
    if key not in d:
        raise ManifestError(f"{where}: missing '{key}'")
    v = d[key]
    if typ is not None and not isinstance(v, typ):
        raise ManifestError(f"{where}.{key}: expected {typ.__name__ if isinstance(typ, type) else typ}, got {v!r}")
    return v


def _set_dotted(d: dict, dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            raise ManifestError(f"{where}: quirk field '{dotted}' does not exist")
        d = d[p]
    if leaf not in d:
        raise ManifestError(f"{where}: quirk field '{dotted}' does not exist")
    d[leaf] = value


def _apply_fidelity(task: str, raw: dict, fidelity: str, where: str) -> tuple[dict, tuple[str, ...]]:
    """Set every quirk's field to its `original` or `corrected` value; returns the resolved dict."""
    raw = copy.deepcopy(raw)
    applied = []
    for i, q in enumerate(raw.get("quirks") or []):
        qw = f"{where}.quirks[{i}]"
        if not isinstance(q, dict) or not {"field", "original", "corrected"} <= q.keys():
            raise ManifestError(f"{qw}: a quirk needs 'field', 'original' and 'corrected' (and 'why')")
        _set_dotted(raw, q["field"], q[fidelity], qw)
        if fidelity == "original":
            applied.append(q["field"])
    return raw, tuple(applied)


def _parse_teacher(task: str, raw: dict, fidelity: str, where: str) -> TeacherSpec:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a mapping")
    resolved, applied = _apply_fidelity(task, raw, fidelity, where)
    w = _get(resolved, "weights", where, dict)
    weights = WeightsRef(
        repo_id=w.get("repo_id"), subfolder=w.get("subfolder"), revision=w.get("revision"),
        variant=w.get("variant"), path=w.get("path"),
    )
    if bool(weights.repo_id) == bool(weights.path):
        raise ManifestError(f"{where}.weights: give exactly one of 'repo_id' or 'path'")
    pre = _get(resolved, "preprocess", where, dict)
    pw = f"{where}.preprocess"
    try:
        ops = parse_ops(_get(pre, "ops", pw, list), f"{pw}.ops")
    except ValueError as e:
        raise ManifestError(str(e)) from None
    size = tuple(_get(pre, "input_size", pw, list))
    order = _get(pre, "channel_order", pw, str)
    if order not in ("RGB", "BGR"):
        raise ManifestError(f"{pw}.channel_order: expected RGB or BGR, got {order!r}")
    mean, std = tuple(_get(pre, "mean", pw, list)), tuple(_get(pre, "std", pw, list))
    if len(mean) != 3 or len(std) != 3 or len(size) != 2:
        raise ManifestError(f"{pw}: mean and std need 3 values, input_size 2")
    shape = tuple(_get(resolved, "output_shape", where, list))
    if len(shape) != 2 or not all(isinstance(x, int) and x > 0 for x in shape):
        raise ManifestError(f"{where}.output_shape: expected [tokens, width], got {shape}")
    resolved.pop("quirks", None)
    compute = resolved.get("compute_dtype", "float32")
    if compute not in COMPUTE_DTYPES:
        raise ManifestError(f"{where}.compute_dtype: one of {', '.join(COMPUTE_DTYPES)}, got {compute!r}")
    return TeacherSpec(
        task=task,
        architecture=_get(resolved, "architecture", where, str),
        weights=weights,
        preprocess=Preprocess(
            ops=ops,
            input_size=(int(size[0]), int(size[1])),
            channel_order=order,
            rescale=float(pre.get("rescale", 1 / 255)),
            mean=tuple(float(x) for x in mean),
            std=tuple(float(x) for x in std),
        ),
        feature=dict(_get(resolved, "feature", where, dict)),
        output_shape=(int(shape[0]), int(shape[1])),
        fidelity=fidelity,
        quirks_applied=applied,
        raw=resolved,
        compute_dtype=compute,
    )


def parse_manifest(data: dict, source: str = "<manifest>", fidelity: str | None = None) -> TeacherManifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a YAML mapping at the top level")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"{source}: format is {fmt!r}; this olaf reads {FORMAT!r}")
    fidelity = fidelity or data.get("fidelity", "original")
    if fidelity not in FIDELITIES:
        raise ManifestError(f"{source}: fidelity must be one of {', '.join(FIDELITIES)}, got {fidelity!r}")
    stored = data.get("stored_dtype", "float16")
    if stored not in STORED_DTYPES:
        raise ManifestError(f"{source}: stored_dtype must be one of {', '.join(STORED_DTYPES)}, got {stored!r}")
    teachers_raw = _get(data, "teachers", source, dict)
    for t in teachers_raw:  # a task's name names its targets in stores, so it must be one a store can hold
        problem = task_name_problem(t)
        if problem:
            raise ManifestError(f"{source}: teachers.{t}: {problem}")
    teachers = {t: _parse_teacher(t, teachers_raw[t], fidelity, f"{source}: teachers.{t}")
                for t in ordered_tasks(teachers_raw)}
    return TeacherManifest(
        name=str(data.get("name", Path(source).stem)), fidelity=fidelity, stored_dtype=stored, teachers=teachers,
        source=source, description=str(data.get("description", "")),
    )


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (two teachers of one name would otherwise be
    one, the last, silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise ManifestError(f"line {node.start_mark.line + 1}: {', '.join(twice)} given twice in one mapping "
                                f"(two teachers or settings of one name): keep one")
        return super().construct_mapping(node, deep=deep)


def _read_manifest_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ManifestError(f"teacher manifest not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        return data
    for spec in data.get("teachers", {}).values() if isinstance(data.get("teachers"), dict) else []:
        w = spec.get("weights") if isinstance(spec, dict) else None
        if isinstance(w, dict) and w.get("path") and not Path(w["path"]).is_absolute():
            w["path"] = str((path.parent / w["path"]).resolve())
    return data


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else copy.deepcopy(v)
    return out


def _resolve(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A manifest's data with `extends: OTHER.yaml` (relative to its folder) resolved: OTHER's data with this one's
    merged over it; then `prepend_ops`, ops put before every teacher's own (e.g. a resize every recipe starts
    with). What results is written out in full in every recipe, so the identity says what was computed."""
    data = _read_manifest_yaml(path)
    if not isinstance(data, dict) or "extends" not in data:
        return data
    base_path = (path.parent / str(data.pop("extends"))).resolve()
    if base_path in seen:
        raise ManifestError(f"{path}: `extends` runs in a circle ({' -> '.join(map(str, (*seen, base_path)))})")
    data = _merged(_resolve(base_path, (*seen, path.resolve())), data)
    prepend = data.pop("prepend_ops", None)
    if prepend is not None:
        if not isinstance(prepend, list):
            raise ManifestError(f"{path}: prepend_ops must be a list of ops")
        for task, spec in data.get("teachers", {}).items():
            ops = ((spec or {}).get("preprocess") or {}).get("ops")
            if not isinstance(ops, list):
                raise ManifestError(f"{path}: teachers.{task}.preprocess.ops is missing: nothing to prepend to")
            spec["preprocess"]["ops"] = copy.deepcopy(prepend) + ops
    return data


def load_manifest(path: str | Path | None = None, fidelity: str | None = None) -> TeacherManifest:
    """Read a teacher manifest (default: recipes/manifests/ola_vlm.yaml), `extends` resolved. Relative local weight
    paths are resolved against the folder of the manifest that names them, so a manifest and its weights can
    move together."""
    path = Path(path) if path else DEFAULT_MANIFEST
    return parse_manifest(_resolve(path), source=str(path), fidelity=fidelity)
