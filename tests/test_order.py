"""The global training order and the stream that reads it: independent of world size and workers, every sample
once per epoch, O(1) resume (counted in bytes), elastic resume, shuffle quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNTHETIC_TEACHERS

import store
from store import GlobalOrder, Location, SampleResult, SampleTable, ShardResult, StoreError, TaskLayout, encodings

SHARDS, PER_SHARD = 24, 8
BAD = {3, 17, 18, 100}  # image errors at extraction: never in the order
G, MICRO = 16, 4


def make_store(url) -> str:
    m = store.RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=SHARDS * PER_SHARD,
                          shard_size=PER_SHARD, formats=["wds"], tasks={"gen": TaskLayout((1, 16), "fp16")})
    w = store.StoreWriter.create(url, m, SYNTHETIC_TEACHERS)
    for i in range(SHARDS):
        a, b = m.shard_range(i)
        samples = [SampleResult(j, f"s{j:05d}", {"id": f"s{j:05d}"}, f"{j}.jpg",
                                None if j in BAD else b"\xff\xd8" + bytes([j % 251]) * (50 + j),
                                "image file not found" if j in BAD else None) for j in range(a, b)]
        x = torch.arange(a, b, dtype=torch.float32).view(-1, 1, 1).expand(-1, 1, 16).contiguous()
        values, scales = encodings.encode(x, "fp16")
        w.commit_shard(ShardResult(i, ("gen",), samples, {"gen": values}, {"gen": scales},
                                   {"gen": np.array([j not in BAD for j in range(a, b)])}))
    return url


@pytest.fixture(scope="module")
def order_store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("order") / "store"))


def stream(url, **kw):
    args = {"global_batch": G, "micro_batch": MICRO, "seed": 7, "chunk": 2, "mix": 8} | kw
    return store.TargetStream(url, ["gen"], **args)


def batches(s, workers=0):
    if workers == 0:
        return list(s)
    return list(torch.utils.data.DataLoader(s, batch_size=None, num_workers=workers))


def position_ids(s, workers=0) -> dict[int, str]:
    """position -> sample id, from what the stream yields (each row's own id and position)."""
    out = {}
    for b in batches(s, workers):
        assert [r["position"] for r in b["rows"]] == list(range(*b["positions"]))
        for r in b["rows"]:
            assert r["position"] not in out
            out[r["position"]] = r["id"]
            assert float(r["targets"]["gen"][0, 0]) == int(r["id"][1:])  # the row's target is its own sample's
    return out


def test_the_order_is_the_same_for_any_world_size_and_workers(order_store):
    usable = {f"s{j:05d}" for j in range(SHARDS * PER_SHARD) if j not in BAD}
    steps = 2 * len(usable) // G + 1  # two epochs and a bit
    reference = None
    for world in (1, 2, 4):
        for workers in (0, 1, 2):
            got = {}
            for rank in range(world):
                mine = position_ids(stream(order_store, rank=rank, world_size=world, stop_step=steps), workers)
                assert not set(mine) & set(got)  # no position read by two ranks
                got |= mine
            assert sorted(got) == list(range(steps * G)), (world, workers)
            if reference is None:
                reference = got
            assert got == reference, (world, workers)
    n = len(usable)
    first, second = [reference[p] for p in range(n)], [reference[p] for p in range(n, 2 * n)]
    assert sorted(first) == sorted(usable) and sorted(second) == sorted(usable)  # each sample once per epoch
    assert first != second  # and each epoch in its own order
    # another seed, another order; the same seed, the same order
    other = position_ids(stream(order_store, seed=8, stop_step=2))
    assert [other[p] for p in range(2 * G)] != [reference[p] for p in range(2 * G)]
    again = position_ids(stream(order_store, stop_step=2))
    assert [again[p] for p in range(2 * G)] == [reference[p] for p in range(2 * G)]


def test_a_rank_takes_a_fixed_slice_of_each_global_batch(order_store):
    s = stream(order_store, rank=1, world_size=2, stop_step=3)
    got = [(b["step"], b["positions"], b["row_offset"]) for b in s]
    # G 16 = 2 ranks x 2 micro-batches x 4: rank 1 has micro-batches 2 and 3 of every step
    assert got == [(k, (k * 16 + o, k * 16 + o + 4), o) for k in range(3) for o in (8, 12)]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_resume_reads_nothing_it_consumed(tmp_path, backend, request):
    """Resuming at 10% or at 90% of an epoch: the first request is the first new micro-batch's bytes, exactly
    (counted through the stream's reader), and the batches are those of the uninterrupted stream."""
    url = str(tmp_path / "store") if backend == "local" else \
        f"s3://{request.getfixturevalue('seaweedfs').bucket}/{tmp_path.name}/store"
    make_store(url)
    rec = store.Store(url).records
    sizes = {}  # sample id -> its byte count in its tar, from the records
    for r in rec.values():
        for j, (_, n) in zip(rec[r.shard].ids, r.files[store.layout.tar_name(r.shard)]["samples"], strict=True):
            sizes[j] = n
    whole = list(stream(url, stop_step=12))
    n_usable = SHARDS * PER_SHARD - len(BAD)
    for fraction in (0.1, 0.9):
        step = int(fraction * n_usable) // G
        s = stream(url, stop_step=12)
        s.load_state_dict({**stream(url).state_dict(), "position": step * G})
        it = iter(s)
        first = next(it)
        assert first["positions"] == (step * G, step * G + MICRO)
        assert s.bytes_read == sum(sizes[r["id"]] for r in first["rows"])  # nothing before it, nothing else
        assert s.bytes_read < min(Location(url).size(store.layout.tar_name(i)) for i in range(SHARDS))
        rest = [first, *it]
        want = [b for b in whole if b["step"] >= step]
        assert [[r["id"] for r in b["rows"]] for b in rest] == [[r["id"] for r in b["rows"]] for b in want]


def test_a_position_saved_on_two_ranks_resumes_on_one(order_store):
    two = [stream(order_store, rank=r, world_size=2, stop_step=5) for r in range(2)]
    for s in two:  # three steps: each rank hands out its 2 micro-batches of each
        it = iter(s)
        for _ in range(3 * s.accum):
            s.consumed(next(it))
    states = [s.state_dict() for s in two]
    assert states[0] == states[1] and states[0]["position"] == 3 * G  # the position is global, not per rank
    continued = {b["positions"]: [r["id"] for r in b["rows"]] for s in two for b in s}  # both ranks, on from there
    one = stream(order_store, stop_step=5)
    one.load_state_dict(states[0])
    resumed = {b["positions"]: [r["id"] for r in b["rows"]] for b in one}
    assert sorted(resumed) == [(p, p + MICRO) for p in range(3 * G, 5 * G, MICRO)] and resumed == continued


def test_a_saved_position_of_another_order_is_refused(order_store):
    saved = stream(order_store).state_dict()
    with pytest.raises(StoreError, match="seed"):
        stream(order_store, seed=9).load_state_dict(saved)
    with pytest.raises(StoreError, match="global batch"):
        stream(order_store, global_batch=2 * G).load_state_dict(saved)
    with pytest.raises(StoreError, match="step boundary"):
        stream(order_store).load_state_dict({**saved, "position": 3})
    notes = stream(order_store, micro_batch=8).load_state_dict(saved)
    assert notes and "micro batch 4 -> 8" in notes[0]


def test_shuffle_quality_and_read_granularity():
    """At the real store's size (2,181 shards of 256): consecutive samples come from many shards, a global batch
    draws from ~G / chunk shards, and a micro-batch is a few contiguous runs of its tars."""
    n_shards, per = 2181, 256
    n = n_shards * per
    shard = np.arange(n) // per
    table = SampleTable(np.arange(n), shard, (np.arange(n) % per) * 1000, np.full(n, 1000), None)
    chunk, mix = 4, 32
    o = GlobalOrder(table, seed=42, chunk=chunk, mix=mix)
    e0 = o.epoch(0)
    assert np.array_equal(np.sort(e0), np.arange(n))
    s = shard[e0]
    # neighbours share a shard only when they come from the same chunk of the span: (chunk-1)/(mix-1)
    same = float((s[1:] == s[:-1]).mean())
    assert same < 1.2 * (chunk - 1) / (mix - 1), same
    distinct = [len(set(s[k:k + 256])) for k in range(0, n - 256, 256 * 50)]
    assert min(distinct) >= 0.85 * 256 / chunk, distinct  # ~64 chunks, nearly all from different shards
    # a micro-batch of 32 (aligned with a span) is at most mix / chunk contiguous runs
    for k in range(0, n - 32, 32 * 997):
        rows = np.sort(e0[k:k + 32])
        runs = 1 + int(((shard[rows[1:]] != shard[rows[:-1]]) | (rows[1:] != rows[:-1] + 1)).sum())
        assert runs <= mix // chunk
    # epochs differ; the same (seed, epoch) gives the same order
    assert not np.array_equal(e0, o.epoch(1))
    assert np.array_equal(e0, GlobalOrder(table, seed=42, chunk=chunk, mix=mix).epoch(0))
    with pytest.raises(ValueError, match="multiple"):
        GlobalOrder(table, seed=1, chunk=4, mix=30)


# ---- the order is the same as before the index; the index gives the records' table ---------------------------

GOLDEN = Path(__file__).parent / "data" / "order_before_the_index.json"


def golden_table(shard_sizes, bad, seed) -> SampleTable:
    """The tables tests/data/order_before_the_index.json was made from (byte sizes from a seeded generator)."""
    rng = np.random.default_rng(seed)
    index, shard, offset, size = [], [], [], []
    g = 0
    for i, n in enumerate(shard_sizes):
        off = 0
        for _ in range(n):
            s = int(rng.integers(100, 5000))
            if g not in bad:
                index.append(g)
                shard.append(i)
                offset.append(off)
                size.append(s)
            off += s
            g += 1
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return SampleTable(as64(index), as64(shard), as64(offset), as64(size), None)


@pytest.mark.parametrize("case", ["case0", "case1", "case2", "case3", "case4"])
def test_the_order_is_bit_identical_to_the_order_before_the_index(case):
    """The order computed span by span (what a reader asks for, and the whole epochs) gives the rows olaf's
    whole-epoch computation gave before the index (recorded in tests/data; chunk/mix pairs that are not
    multiples of Philox's 4 draws per step, partial spans, epoch boundaries, shards with one sample): existing
    checkpoints resume in the same order."""
    c = json.loads(GOLDEN.read_text())[case]
    table = golden_table(c["shard_sizes"], set(c["bad"]), c["table_seed"])
    assert table.fingerprint() == c["fingerprint"]
    order = GlobalOrder(table, c["seed"], c["chunk"], c["mix"])
    total = len(c["rows"])
    assert order.rows(0, total).tolist() == c["rows"]
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(np.arange(1, total), size=min(40, total - 1), replace=False))
    pieces = [order.rows(int(a), int(b)).tolist() for a, b in zip(np.r_[0, cuts], np.r_[cuts, total], strict=True)]
    assert sum(pieces, []) == c["rows"]
    n = len(table)
    assert np.concatenate([order.epoch(e) for e in range(3)]).tolist() == c["rows"][:3 * n]


def test_the_index_gives_the_records_table_and_the_same_batches(tmp_path):
    """Built from the records, the index holds the same table (mmapped arrays, ids decoded on demand, no Python
    object per sample): the stream reads the same samples at the same positions with it as without it."""
    url = make_store(str(tmp_path / "store"))
    without = store.Store(url)
    table = without.sample_table(["gen"])
    meta = store.StoreWriter.open(url).build_index()
    assert meta["usable"] == SHARDS * PER_SHARD - len(BAD)
    with_index = store.Store(url, use_index=True)
    assert with_index.index is not None and with_index._records is None  # not one record read
    indexed = with_index.sample_table(["gen"])
    assert isinstance(indexed.index, np.memmap) and not isinstance(indexed.ids, tuple)
    for col in ("index", "shard", "offset", "size"):
        assert np.array_equal(np.asarray(getattr(indexed, col)), getattr(table, col)), col
    assert [indexed.ids[r] for r in range(len(indexed))] == list(table.ids)
    assert with_index.done_shards(["gen"]) == without.done_shards(["gen"]) == list(range(SHARDS))
    assert with_index.usable_samples(["gen"]) == without.usable_samples(["gen"]) == len(table)
    assert with_index.samples_done(["gen"]) == without.samples_done(["gen"]) == SHARDS * PER_SHARD
    assert with_index.tar_urls(["gen"]) == without.tar_urls(["gen"])
    assert position_ids(stream(url, stop_step=4)) == position_ids(stream(without, stop_step=4))
    assert stream(url).state_dict() == stream(without).state_dict()  # the same order, fingerprint included


def test_a_stale_index_is_never_used(tmp_path, capsys):
    """The writer removes index.json before it commits or redoes a shard; a record committed behind its back (an
    older olaf) is seen in the listing of shards/; a damaged index file is named by verify."""
    from pipeline import inspect

    url = make_store(str(tmp_path / "store"))
    w = store.StoreWriter.open(url)
    w.build_index()
    assert store.load_index(w.loc)[0] is not None
    assert inspect.main([url, "verify"]) == 0
    w.redo(5)  # the writer's first step on a shard: the index goes
    index, why = store.load_index(w.loc)
    assert index is None and "no index" in why
    w.build_index()
    rec = w.loc.read_bytes(store.layout.record_name(3))
    w.loc.remove(store.layout.record_name(3))
    index, why = store.load_index(w.loc)
    assert index is None and "committed or removed" in why
    w.loc.write_bytes(store.layout.record_name(3), rec)
    assert store.load_index(w.loc)[0] is not None
    assert store.Store(url, use_index=True).done_shards(["gen"]) == [i for i in range(SHARDS) if i != 5]
    capsys.readouterr()
    path = Path(url) / "index" / "offset.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert inspect.main([url, "verify"]) == 1 and "index/offset.npy: sha256 differs" in capsys.readouterr().out
    assert inspect.main([url, "index"]) == 0 and inspect.main([url, "verify"]) == 0


def test_the_order_s_arrays_are_computed_once_per_node_and_mapped(tmp_path):
    """With a cache folder the chunks and each epoch's permutation are written once and mmapped by every process
    of the node (ranks, DataLoader workers), giving the same rows; epochs two back are dropped."""
    c = json.loads(GOLDEN.read_text())["case1"]
    table = golden_table(c["shard_sizes"], set(c["bad"]), c["table_seed"])
    first = GlobalOrder(table, c["seed"], c["chunk"], c["mix"], cache=tmp_path)
    assert first.rows(0, len(c["rows"])).tolist() == c["rows"]
    second = GlobalOrder(table, c["seed"], c["chunk"], c["mix"], cache=tmp_path)
    assert isinstance(second._starts, np.memmap) and isinstance(second._epoch(0)[0], np.memmap)
    assert second.rows(0, len(c["rows"])).tolist() == c["rows"]
    second.rows(5 * len(table), 5 * len(table) + 3)  # epoch 5: epochs 0..3 go
    kept = sorted(p.name for p in first.cache.glob("epoch-*"))
    # epochs 0..3 were computed, then dropped, with their checksums
    assert kept == ["epoch-5-at.npy", "epoch-5-at.npy.sha256", "epoch-5-chunks.npy", "epoch-5-chunks.npy.sha256"], kept


def test_a_flipped_bit_in_the_order_cache_is_found_and_the_arrays_computed_again(tmp_path, capfd):
    """One bit of the cached chunk starts made one epoch train a sample twice and another never: every cached array
    is checked against the checksum written with it, and a damaged one is computed again (one line says so)."""
    c = json.loads(GOLDEN.read_text())["case1"]
    table = golden_table(c["shard_sizes"], set(c["bad"]), c["table_seed"])
    first = GlobalOrder(table, c["seed"], c["chunk"], c["mix"], cache=tmp_path)
    epoch = first.epoch(0).tolist()
    assert sorted(epoch) == list(range(len(table)))  # each row once
    for name in ("chunk-starts.npy", "epoch-0-chunks.npy"):
        path = first.cache / name
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x01  # one bit of the last entry
        path.write_bytes(bytes(data))
        again = GlobalOrder(table, c["seed"], c["chunk"], c["mix"], cache=tmp_path)
        assert again.epoch(0).tolist() == epoch, name
        assert f"{path} does not match its checksum" in capfd.readouterr().err
        assert store.cache.valid(path)  # rewritten whole


def test_the_scale_benchmark_measures_a_plans_own_peak_memory(tmp_path, monkeypatch):
    """benchmarks/scale.py's plan row ran make_plan in a child and read its ru_maxrss, which Linux carries across
    exec from the forked image: with the benchmark holding 600 MB, a plan of a few MB said 660 MB. The child's own
    peak (VmHWM) does not see the parent's memory."""
    from benchmarks.scale import plan_row

    monkeypatch.setenv("OLAF_CACHE", str(tmp_path / "cache"))
    held = np.ones(600 * 2**20 // 8)  # 600 MB resident here
    row = plan_row(2000, tmp_path, "jsonl")
    assert held[-1] == 1 and 0 < row["plan_jsonl_peak"] < 300 * 2**20, row
