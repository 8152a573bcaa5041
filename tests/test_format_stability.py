"""Stores are byte-identical across olaf's redesign: tests/data/store_bytes_before_the_redesign.json holds, for a
synthetic input, every data file's size and sha256 (and each record's tasks, counts, errors, ids) as the code
before the redesign (commit 01bdbef) wrote them; today's writer must give the same. The input is made with
integer arithmetic from NumPy's Philox (stable across versions), so the bytes do not depend on the machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNTHETIC_TEACHERS

import store
from store import SampleResult, ShardResult, StoreWriter, TaskLayout, encodings

GOLDEN = Path(__file__).parent / "data" / "store_bytes_before_the_redesign.json"
N, S = 10, 4
SHAPES = {"gen": (1, 16), "depth": (576, 32), "seg": (576, 24)}
CASES = {  # encoding, zarr compression, formats, the passes of tasks
    "fp16-none-both-onepass": ("fp16", "none", ("zarr", "wds"), [("gen", "depth", "seg")]),
    "fp8-zstd-both-twopass": ("fp8", "zstd", ("zarr", "wds"), [("gen", "depth"), ("seg",)]),
    "bf16-none-wds-twopass": ("bf16", "none", ("wds",), [("seg",), ("gen", "depth")]),
}


def values(task: str, j: int) -> np.ndarray:
    bits = np.random.Philox(key=np.array([j, len(task)], dtype=np.uint64)).random_raw(int(np.prod(SHAPES[task])))
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return ((u - 0.5) * 8).reshape(SHAPES[task]).astype(np.float32)


def result(m, shard: int, tasks, enc: str, bad=(5,)) -> ShardResult:
    """Sample 5's image is missing, sample 6 has an id that needs escaping, sample 7 an upper-case extension,
    sample 2's seg target failed."""
    a, b = m.shard_range(shard)
    samples = [SampleResult(j, f"{j:09d}" if j != 6 else "odd id/6.x",
                            {"id": f"{j:09d}", "conversations": [{"from": "gpt", "value": f"caption {j}"}]},
                            f"{j:05d}/{j:09d}.jpg" if j != 7 else f"{j}/x.PNG",
                            None if j in bad else bytes((j * 7 + k) % 256 for k in range(100 + j)),
                            "image file not found" if j in bad else None) for j in range(a, b)]
    vals, scales, valid, task_errors = {}, {}, {}, {}
    for t in tasks:
        x = torch.from_numpy(np.stack([values(t, j) if j not in bad else np.zeros(SHAPES[t], np.float32)
                                       for j in range(a, b)]))
        vals[t], scales[t] = encodings.encode(x, enc)
        valid[t] = np.array([j not in bad and not (t == "seg" and j == 2) for j in range(a, b)])
        if t == "seg" and a <= 2 < b:
            task_errors[t] = {2 - a: "non-finite output"}
            vals[t][2 - a] = 0
            if scales[t] is not None:
                scales[t][2 - a] = 0
    return ShardResult(shard, tuple(tasks), samples, vals, scales, valid, task_errors)


def files_and_records(url, enc, compression, formats, passes) -> dict:
    layouts = {t: TaskLayout.for_shape(SHAPES[t], enc) for t in ("gen", "depth", "seg")}
    m = store.RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=N, shard_size=S,
                          formats=list(formats), tasks=layouts, zarr_compression=compression)
    w = StoreWriter.create(url, m, SYNTHETIC_TEACHERS)
    for tasks in passes:
        for i in range(m.num_shards):
            w.commit_shard(result(m, i, tasks, enc))
    out = {}
    for i, r in sorted(w.records().items()):
        out.update({name: dict(info) for name, info in sorted(r.files.items())})
        out[f"record {i}"] = {"tasks": r.tasks, "valid": r.valid, "errors": r.errors, "ids": r.ids,
                              "bad_images": r.bad_images}
    return json.loads(json.dumps(out))


@pytest.mark.parametrize("case", list(CASES))
def test_stores_are_byte_identical_to_those_written_before_the_redesign(tmp_path, case):
    want = json.loads(GOLDEN.read_text())[case]
    got = files_and_records(str(tmp_path / case), *CASES[case])
    assert got.keys() == want.keys()
    for name in want:  # a record may say more than it did then (each task's members' place in a sample, since)
        assert {k: v for k, v in got[name].items() if k in want[name]} == want[name], name
    assert all(set(got[n]) - set(want[n]) <= {"tasks"} for n in want if n.endswith(".tar"))
