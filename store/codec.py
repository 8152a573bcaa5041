"""One sample's targets to and from their stored bytes: the tar members of a sample (used by the writer, the
stream and the inspector) and a Zarr row. The one place that knows what a member holds."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

import numpy as np

from store import encodings, layout
from store.manifest import RunManifest


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_meta(sample_id: str, index: int, shard: int, record: dict, image: str | None, valid: dict[str, bool],
                errors: dict | None) -> dict:
    """A sample's json member: its id, global index, shard, dataset record, image member suffix (None: no image
    stored), per-task validity and errors."""
    return {"id": sample_id, "index": index, "shard": shard, "record": record,
            "image_member": layout.image_member(image) if image is not None else None, "valid": valid,
            "errors": errors or None}


def sample_members(meta: dict, image_bytes: bytes | None, targets: dict[str, tuple[np.ndarray, np.ndarray | None]],
                   kept: dict[str, bytes] | None = None) -> dict:
    """A sample as WebDataset writes it: {"__key__", "json", <image ext>, "<task>.npy", "<task>.scale.npy"}.
    `meta` is the json member ({"id", "index", "shard", "record", "image_member", "valid", "errors"});
    `targets` the encoded (values, scales) of the tasks computed now; `kept` members of earlier passes."""
    sample = {"__key__": layout.tar_key(meta["id"]), layout.META_MEMBER: json.dumps(meta, sort_keys=True).encode()}
    if image_bytes is not None:
        sample[meta["image_member"]] = image_bytes
    sample.update(kept or {})
    for t, (values, scales) in targets.items():
        sample[layout.target_member(t)] = npy_bytes(values)
        if scales is not None:
            sample[layout.scale_member(t)] = npy_bytes(scales)
    return sample


def target_members_of(raw: dict, task: str) -> dict[str, bytes]:
    """The members that hold one task's target in a raw sample (to carry them into a rebuilt tar)."""
    return {k: raw[k] for k in (layout.target_member(task), layout.scale_member(task)) if k in raw}


def meta_of(raw: dict) -> dict:
    return json.loads(raw[layout.META_MEMBER])


def raw_targets(raw: dict, manifest: RunManifest, task: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The encoded (values, scales) of a task in a raw sample, or None when it has none."""
    if layout.target_member(task) not in raw:
        return None
    scale = npy_load(raw[layout.scale_member(task)]) if manifest.tasks[task].scaled else None
    return npy_load(raw[layout.target_member(task)]), scale


def decode_sample(raw: dict, manifest: RunManifest, tasks: Iterable[str], compact: bool = False) -> dict:
    """A raw WebDataset sample ({"__key__", "json", "jpg", "gen.npy", ...} of bytes) -> {"id", "index",
    "record", "image": bytes or None, "valid": {task: bool}, "targets": {task: tensor or None}}."""
    import torch

    meta = meta_of(raw)
    out = {"id": meta["id"], "index": meta["index"], "record": meta["record"], "valid": {}, "targets": {},
           "image": raw.get(meta["image_member"]) if meta.get("image_member") else None}
    for t in tasks:
        enc = raw_targets(raw, manifest, t) if meta["valid"].get(t) else None
        out["valid"][t] = enc is not None
        if enc is None:
            out["targets"][t] = None
            continue
        encoding = manifest.tasks[t].encoding
        dtype = encodings.compact_dtype(encoding) if compact else torch.float32
        out["targets"][t] = encodings.decode(enc[0], enc[1], encoding, dtype)
    return out
