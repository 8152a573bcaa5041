"""Several stores in one global order (`--store A --store B --mix 3,1`): the shares, every sample read from its own
store (ids may collide), the same draws on any number of ranks, one local and one s3 store, a resume with another
mix refused; the trainer's samples log names each id's store."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import SYNTHETIC_TEACHERS, call, trainer_args

import store
from store import SampleResult, ShardResult, StoreError, TaskLayout, encodings
from store.order import mix_counts
from trainer.pt import run as trainer

SHARDS, PER_SHARD, BAD = 6, 8, {5, 20}
G, MICRO = 8, 4


def make_store(url, base: float) -> str:
    """SHARDS x PER_SHARD samples s00000.. (the same ids in every store made here); sample j's gen target is
    base + j, so a value says which store it was read from."""
    m = store.RunManifest(dataset={"json": f"synthetic-{base}", "sha256": "0" * 64}, num_samples=SHARDS * PER_SHARD,
                          shard_size=PER_SHARD, formats=["wds"], tasks={"gen": TaskLayout((1, 4), "fp16")})
    w = store.StoreWriter.create(url, m, SYNTHETIC_TEACHERS)
    for i in range(SHARDS):
        a, b = m.shard_range(i)
        samples = [SampleResult(j, f"s{j:05d}", {"id": f"s{j:05d}"}, f"{j}.jpg",
                                None if j in BAD else b"\xff\xd8" + bytes([j % 251]) * 40,
                                "image file not found" if j in BAD else None) for j in range(a, b)]
        x = (base + torch.arange(a, b, dtype=torch.float32)).view(-1, 1, 1).expand(-1, 1, 4).contiguous()
        values, scales = encodings.encode(x, "fp16")
        w.commit_shard(ShardResult(i, ("gen",), samples, {"gen": values}, {"gen": scales},
                                   {"gen": np.array([j not in BAD for j in range(a, b)])}))
    return url


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return make_store(str(root / "a"), 0.0), make_store(str(root / "b"), 1000.0)


def stream(urls, weights, **kw):
    return store.TargetStream(list(urls), ["gen"], global_batch=G, micro_batch=MICRO, seed=3, chunk=2, mix=8,
                              weights=weights, **kw)


def drawn(s) -> list[tuple[int, int]]:
    """(store, dataset index) of every sample the stream yields, each checked against its target's value."""
    out = []
    for b in s:
        for r in b["rows"]:
            value = float(np.asarray(r["targets"]["gen"]).ravel()[0])
            src = 0 if value < 1000 else 1
            assert r["store"] == src and value - 1000 * src == r["index"], (r["store"], r["index"], value)
            out.append((src, r["index"]))
    return out


def test_the_counts_keep_the_total_and_follow_the_weights():
    assert mix_counts([46, 46], None) == [46, 46]
    assert mix_counts([46, 46], [3, 1]) == [69, 23]
    assert mix_counts([10, 90], [1, 1]) == [50, 50]  # store 0 repeats 5x, store 1 gives a subset of 50
    assert sum(mix_counts([7, 11, 13], [0.2, 0.3, 0.5])) == 31


def test_a_3_to_1_mix_draws_three_quarters_from_the_first_store(two_stores):
    usable = SHARDS * PER_SHARD - len(BAD)  # 46 in each store
    samples = drawn(stream(two_stores, [3, 1], stop_step=200 // G))
    assert len(samples) == 200
    share = sum(src == 0 for src, _ in samples) / len(samples)
    assert abs(share - 0.75) <= 0.05, share
    epoch = drawn(stream(two_stores, [3, 1], stop_step=-(-2 * usable // G)))[:2 * usable]
    per_store = Counter(src for src, _ in epoch)
    assert per_store == {0: 69, 1: 23}  # 0.75 and 0.25 of the epoch's 92
    counts = Counter(epoch)
    assert all(counts[(0, j)] in (1, 2) for j in range(SHARDS * PER_SHARD) if j not in BAD)  # 46 whole + 23 again
    assert all(counts[(1, j)] <= 1 for j in range(SHARDS * PER_SHARD))  # a subset of 23, each once
    assert not any((s, j) in counts for s in (0, 1) for j in BAD)


def test_without_weights_a_mix_is_the_concatenation_and_the_same_on_two_ranks(two_stores):
    usable = SHARDS * PER_SHARD - len(BAD)
    one = drawn(stream(two_stores, None, stop_step=-(-2 * usable // G)))[:2 * usable]
    assert Counter(one) == Counter((s, j) for s in (0, 1) for j in range(SHARDS * PER_SHARD) if j not in BAD)
    ranks = [stream(two_stores, None, stop_step=4, rank=r, world_size=2) for r in (0, 1)]
    by_rank = [list(s) for s in ranks]
    # global batch k: rank 0's micro-batch, then rank 1's -- the one-process stream's two micro-batches
    merged = [r for k in range(4) for b in (by_rank[0][k], by_rank[1][k]) for r in b["rows"]]
    assert [(r["store"], r["index"]) for r in merged] == one[:4 * G]
    ids = stream(two_stores, None).ids_of(0, 4 * G)
    assert ids == [f"s{j:05d}" for _, j in one[:4 * G]]  # colliding ids, told apart by their store
    assert stream(two_stores, None).stores_of(0, 4 * G) == [s for s, _ in one[:4 * G]]


def test_a_resume_with_another_mix_or_store_set_is_refused_in_one_line(two_stores, tmp_path):
    saved = stream(two_stores, [3, 1]).state_dict()
    with pytest.raises(StoreError) as e:
        stream(two_stores, [1, 1]).load_state_dict(saved)
    msg = str(e.value)
    assert "\n" not in msg and "weight 3.0" in msg and "weight 1.0" in msg and "new --output-dir" in msg
    with pytest.raises(StoreError, match="one store"):
        stream(two_stores[:1], None).load_state_dict(saved)
    third = make_store(str(tmp_path / "c"), 2000.0)
    with pytest.raises(StoreError, match="saved run read"):
        stream([two_stores[0], third], [3, 1]).load_state_dict(saved)
    stream(two_stores, [3, 1]).load_state_dict(saved)  # the same mix resumes


def test_a_local_and_an_s3_store_mix(two_stores, seaweedfs, tmp_path):
    remote = make_store(f"s3://{seaweedfs.bucket}/{tmp_path.name}/b", 1000.0)
    samples = drawn(stream([two_stores[0], remote], [1, 1], stop_step=6))
    assert {s for s, _ in samples} == {0, 1} and len(samples) == 6 * G


# ---- the trainer ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_free(tmp_path_factory, trainer_dataset, tiny_teachers):
    from support.reference import reference_store

    root = tmp_path_factory.mktemp("teacher_free")
    return [reference_store(root / name, trainer_dataset, tiny_teachers, tasks=(),
                            teachers_yaml=True) for name in "ab"]


@pytest.mark.slow
def test_the_trainer_mixes_two_stores_3_to_1_and_refuses_another_mix_on_resume(tmp_path, teacher_free, tiny_models,
                                                                                tiny_teachers):
    out = tmp_path / "out"
    a, b = teacher_free

    def argv(mix, *extra):
        return [*trainer_args(a, tiny_models, tiny_teachers, out), "--store", b, "--mix", mix, "--set", "tasks=[]",
                "--set", "global_batch_size=8", "--set", "num_workers=0", "--set", "save_every=5", *extra]

    rc, log = call(trainer, argv("3,1", "--max-steps", "25"))
    assert rc == 0, log
    steps = [json.loads(x) for x in (out / "logs" / "samples.jsonl").read_text().splitlines()]
    stores = [s for rec in steps for s in rec["stores"]]
    assert len(stores) == 200 and abs(stores.count(0) / 200 - 0.75) <= 0.05
    assert all(len(rec["stores"]) == len(rec["ids"]) for rec in steps)
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["stores"] == [str(a), str(b)] and config["data"]["mix"] == [3.0, 1.0]
    rc, log = call(trainer, argv("1,1", "--max-steps", "30", "--resume"))
    assert rc == 2 and "weight 3.0" in log and "weight 1.0" in log, log
    assert len([ln for ln in log.splitlines() if ln.startswith("error:")]) == 1
