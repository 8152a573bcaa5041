"""Finding and loading teacher weights: HF repo ids (honouring HF_HUB_OFFLINE and the HF cache) or local folders.

transformers does the loading (`from_pretrained` with the sub-module's config and a `key_mapping` that strips
the checkpoint prefix), so only the part a target needs is built and filled (OneFormer's Swin backbone,
Depth-Anything's DINOv2), checkpoint key conversions of the installed transformers apply, and HF ids,
subfolders, revisions, variants and the offline cache behave as everywhere else. A checkpoint that does not
fill the module completely is an error, never a silently random layer.

The weights hash is the sha256 of the loaded module's tensors (names, dtypes, shapes, bytes) in the dtype the
checkpoint stores: it names exactly what computed the targets, whatever the file format or unused parts.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from recipes.manifest import WeightsRef


class WeightsNotFound(FileNotFoundError):
    """A teacher's checkpoint is not where the manifest says, or does not fit; the message says what to do."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def how_to_get(ref: WeightsRef) -> str:
    if ref.path:
        return "point weights.path in the teacher manifest at a folder holding config.json and the weights"
    sub = f" --include '{ref.subfolder}/*'" if ref.subfolder else ""
    rev = f" --revision {ref.revision}" if ref.revision and ref.revision != "main" else ""
    return (
        f"download it where there is internet (`huggingface-cli download {ref.repo_id}{sub}{rev}`) into the HF "
        f"cache (HF_HOME), or set weights.path in the teacher manifest to a local copy"
    )


def _source(ref: WeightsRef, task: str) -> tuple[str, dict]:
    if ref.path:
        folder = os.path.join(ref.path, ref.subfolder) if ref.subfolder else ref.path
        if not os.path.isdir(folder):
            raise WeightsNotFound(f"teacher '{task}': weights folder {folder} does not exist; {how_to_get(ref)}")
        return ref.path, {"subfolder": ref.subfolder} if ref.subfolder else {}
    kw = {"revision": ref.revision or "main"}
    if ref.subfolder:
        kw["subfolder"] = ref.subfolder
    if offline():
        kw["local_files_only"] = True
    return ref.repo_id, kw


def _wrap(ref: WeightsRef, task: str, e: Exception) -> WeightsNotFound:
    why = " (HF_HUB_OFFLINE is set: only the local cache is used)" if offline() and not ref.path else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return WeightsNotFound(f"teacher '{task}': cannot load {ref.describe()}{why}: {first}\n  {how_to_get(ref)}")


def load_config(config_cls, ref: WeightsRef, task: str):
    src, kw = _source(ref, task)
    try:
        config_dict, _ = config_cls.get_config_dict(src, **kw)
    except (OSError, ValueError) as e:
        raise _wrap(ref, task, e) from None
    found = config_dict.get("model_type")
    if found != config_cls.model_type:
        raise WeightsNotFound(
            f"teacher '{task}': {ref.describe()} holds a {found!r} model, this teacher needs {config_cls.model_type!r}; "
            f"is weights pointing at the right checkpoint?"
        )
    return config_cls.from_dict(config_dict)


def load_auto_config(ref: WeightsRef, task: str):
    """The checkpoint's config, whatever its class (transformers' AutoConfig); a model that needs its own code is
    refused: olaf never runs a checkpoint's code (trust_remote_code)."""
    from transformers import AutoConfig

    src, kw = _source(ref, task)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise WeightsNotFound(f"teacher '{task}': {ref.describe()} needs its own model code (trust_remote_code), "
                                  f"which olaf never runs: choose a model transformers has (hf_vision loads it with "
                                  f"AutoModel)") from None
        raise _wrap(ref, task, e) from None


def load_model(model_cls, config, ref: WeightsRef, task: str, prefix: str = "", part: bool = False):
    """`model_cls` built from `config` and filled from the checkpoint tensors under `prefix`; `part`: the checkpoint
    holds more than this module (a vision-language model's vision part) even without a prefix.

    Returns the model in the checkpoint's own dtype (the hash is taken on that)."""
    src, kw = _source(ref, task)
    if ref.variant:
        kw["variant"] = ref.variant
    if prefix:
        kw["key_mapping"] = {"^" + prefix.replace(".", r"\."): ""}
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the checkpoint's other parts are "unexpected" by design; checked below
    try:
        model, info = model_cls.from_pretrained(src, config=config, dtype="auto", output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise _wrap(ref, task, e) from None
    finally:
        tf_logger.setLevel(level)
    bad = sorted(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    # the checkpoint's other parts (a depth head, a pixel decoder) are unexpected by design; a tensor that lands
    # in the module's own namespace but fits nothing there is not: the checkpoint is another variant
    roots = {k.split(".")[0] for k in model.state_dict()}
    unused = sorted(k for k in info.get("unexpected_keys") or [] if not (prefix or part) or k.split(".")[0] in roots)
    if bad or unused:
        what = ", ".join(x for x in (f"{len(bad)} missing or mismatched" if bad else "",
                                     f"{len(unused)} unexpected" if unused else "") if x)
        raise WeightsNotFound(
            f"teacher '{task}': {ref.describe()} does not fit {model_cls.__name__} under prefix {prefix!r}: "
            f"{what} tensor(s), e.g. {(bad + unused)[:4]}; is this the right checkpoint?"
        )
    return model


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
