"""Runs read only the tasks they train: the sample index says where each task's members lie in a sample's range
(store.index's task columns, from the records the writer keeps), and the stream leaves the others' bytes out. The
bytes read are counted against the tar itself, parsed here; a store whose records predate the columns is read
whole, as before."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

import store
from store import layout


def stream(url, tasks, **kw):
    return store.TargetStream(url, tasks, global_batch=8, micro_batch=4, seed=1, chunk=2, mix=8, stop_step=2, **kw)


def member_bytes(url) -> dict[str, dict[str, int]]:
    """key -> {member suffix: its bytes in the tar (headers, data, padding)}, from the tars themselves."""
    out: dict[str, dict[str, int]] = {}
    s = store.Store(url)
    for i in s.done_shards([]):
        with tarfile.open(s.loc.path(layout.tar_name(i))) as tf:
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                out.setdefault(key, {})[suffix] = m.offset_data - m.offset + -(-m.size // 512) * 512
    return out


def read_all(s) -> tuple[list[dict], int]:
    rows = [r for b in s for r in b["rows"]]
    return rows, s.bytes_read


@pytest.mark.parametrize("tasks", [["gen"], ["seg"], ["gen", "seg"], []])
def test_a_run_reads_its_tasks_members_only(trainer_store, tasks):
    members = member_bytes(trainer_store)
    rows, got = read_all(stream(str(trainer_store), tasks))
    full_rows, full = read_all(stream(str(trainer_store), ["gen", "depth", "seg"]))
    skipped = [t for t in ("gen", "depth", "seg") if t not in tasks]
    want = sum(n for r in rows for suffix, n in members[layout.tar_key(r["id"])].items()
               if suffix.split(".")[0] not in skipped)
    assert got == want and got < full
    for a, b in zip(rows, full_rows, strict=True):  # the same samples, the trained targets unchanged
        assert a["id"] == b["id"] and a["image"] == b["image"]
        for t in tasks:
            assert a["valid"][t] == b["valid"][t]
            if a["valid"][t]:
                assert torch.equal(a["targets"][t], b["targets"][t])


def test_a_store_whose_records_predate_the_task_columns_is_read_whole(tmp_path, trainer_store):
    old = tmp_path / "old"
    shutil.copytree(trainer_store, old)
    shutil.rmtree(old / layout.INDEX, ignore_errors=True)
    for rec in (old / layout.SHARDS).glob("*.json"):
        d = json.loads(rec.read_text())
        for info in d["files"].values():
            info.pop("tasks", None)
        rec.write_text(json.dumps(d))
    members = member_bytes(old)
    rows, got = read_all(stream(str(old), ["gen"]))
    assert got == sum(sum(members[layout.tar_key(r["id"])].values()) for r in rows)
    table = store.Store(str(old), use_index=True).sample_table(["gen"])
    assert (np.asarray(table.task_at) == -1).all()


def test_the_index_files_hold_the_task_columns(tmp_path, trainer_store):
    copy = tmp_path / "copy"
    shutil.copytree(trainer_store, copy)
    store.index.build_index(store.Location(str(copy)), store.Store(str(copy)).manifest)
    s = store.Store(str(copy), use_index=True)
    t = s.sample_table(["gen"])
    assert s.indexed, s.no_index  # read from the files
    assert t.tasks == ("gen", "depth", "seg") and t.task_at.shape == (len(t), 3)
    members = member_bytes(copy)
    for r in range(len(t)):  # each task's bytes: its .npy (and .scale.npy) members, from the tar
        m = members[layout.tar_key(t.ids[r])]
        for k, task in enumerate(t.tasks):
            assert t.task_len[r, k] == sum(n for suffix, n in m.items() if suffix.split(".")[0] == task)
