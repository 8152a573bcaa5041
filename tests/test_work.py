"""The sample id travels with the data: a shard is assembled by joining the teachers' outputs on ids, and every
sample must be accounted for exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.extract.compute import BatchTargets, assemble_shard
from pipeline.extract.decode import DecodedBatch
from store import RunManifest, SampleResult, TaskLayout

M = RunManifest(dataset={}, num_samples=6, shard_size=6, formats=["wds"],
                tasks={"gen": TaskLayout((1, 4), "fp16"), "seg": TaskLayout((4, 2), "fp16", (2, 2))})
IDS = ["a", "b", "c", "d", "e", "f"]
BAD = {"c"}


def sample(j):
    sid = IDS[j]
    return SampleResult(j, sid, {"id": sid}, f"{sid}.jpg", None if sid in BAD else b"img",
                        "missing" if sid in BAD else None)


def value(task, sid):
    """The target of sample `sid`: its position in IDS, so a row put in the wrong place is visible."""
    shape = M.tasks[task].shape
    return np.full(shape, (IDS.index(sid) if sid in IDS else 99) + (10 if task == "seg" else 0), np.float16)


def targets(ids, errors=None):
    return BatchTargets(list(ids), {t: np.stack([value(t, i) for i in ids]) if ids else
                                    np.zeros((0, *M.tasks[t].shape), np.float16) for t in M.tasks},
                        dict.fromkeys(M.tasks), errors or {}, 0.0)


def batches():
    b1 = DecodedBatch({}, [sample(j) for j in range(3)], 0.0)
    b2 = DecodedBatch({}, [sample(j) for j in range(3, 6)], 0.0)
    return [b1, b2]


def test_outputs_land_on_their_samples_whatever_the_order():
    b1, b2 = batches()
    assert b1.ids == ["a", "b"]  # the bad sample has no pixel row
    # the teachers' outputs come back in another order and grouping than the batches: the join is on ids
    r = assemble_shard(M, 0, ("gen", "seg"), [b2, b1], [targets(["f", "a"]), targets(["d", "b", "e"],
                                                                                      {"seg": {"e": "NaN"}})])
    assert [s.id for s in r.samples] == IDS
    for pos, sid in enumerate(IDS):
        assert r.valid["gen"][pos] == (sid not in BAD)
        assert r.valid["seg"][pos] == (sid not in BAD | {"e"})
        want = value("gen", sid) if sid not in BAD else np.zeros((1, 4), np.float16)
        np.testing.assert_array_equal(r.values["gen"][pos], want)
    assert r.task_errors == {"gen": {}, "seg": {4: "NaN"}} and not r.values["seg"][4].any()


@pytest.mark.parametrize("ids, message", [
    (["a", "b", "d", "e"], r"no target for \['f'\]"),
    (["a", "b", "d", "e", "f", "a"], "two targets for sample 'a'"),
    (["a", "b", "d", "e", "f", "c"], "a target for 'c', which is not a good sample"),
    (["a", "b", "d", "e", "f", "zz"], "a target for 'zz'"),
])
def test_every_sample_is_accounted_for_exactly_once(ids, message):
    with pytest.raises(RuntimeError, match=message):
        assemble_shard(M, 0, ("gen",), batches(), [targets(ids)])


def test_a_batch_missing_from_the_shard_is_refused():
    with pytest.raises(RuntimeError, match="not exactly indices 0..5"):
        assemble_shard(M, 0, ("gen",), batches()[:1], [targets(["a", "b"])])
