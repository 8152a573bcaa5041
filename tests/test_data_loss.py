"""Commands that could destroy what a user has: nothing of theirs deleted, no store overwritten by another command's
output, no provenance a repair could forge, no measured figures replaced. Each case failed before its fix
(reliability, round four)."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import call, one_error_line

from pipeline import localray

# ---- localray stop: only the folder its own mark proves it made ---------------------------------------------


def test_localray_stop_never_removes_a_folder_it_did_not_make(tmp_path):
    state, mine = tmp_path / "state", tmp_path / "mine"
    state.mkdir()
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (state / "state.json").write_text(json.dumps({"marker": "123-abcd", "temp_dir": str(mine), "port": 1,
                                                  "dashboard_port": 2, "agent_port": 3}))
    rc, log = call(localray.main, ["stop", state])
    assert rc == 0 and "left" in log and "did not make it" in log, log
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert not (state / "state.json").exists()
    # a mark of another head proves nothing either
    (mine / localray.TEMP_MARK).write_text("999-ffff")
    (state / "state.json").write_text(json.dumps({"marker": "123-abcd", "temp_dir": str(mine), "dashboard_port": 2}))
    assert call(localray.main, ["stop", state])[0] == 0 and (mine / "thesis.tex").is_file()
    # the folder start made (its mark, this head's marker) is removed
    made = tmp_path / "olaf-ray-x"
    made.mkdir()
    (made / localray.TEMP_MARK).write_text("123-abcd")
    (made / "session_latest").mkdir()
    (state / "state.json").write_text(json.dumps({"marker": "123-abcd", "temp_dir": str(made), "dashboard_port": 2}))
    assert call(localray.main, ["stop", state])[0] == 0 and not made.exists()


def test_a_damaged_localray_state_is_one_line_and_touches_nothing(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    for damaged in ('{"marker": "123-ab", "temp_d', "[1, 2]", '{"marker": 5, "temp_dir": "/", "dashboard_port": 1}',
                    '{"marker": "1-a", "temp_dir": "/tmp"}'):
        (state / "state.json").write_text(damaged)
        for cmd in ("stop", "env"):
            rc, log = call(localray.main, [cmd, state])
            assert rc == 2 and "state.json is damaged" in one_error_line(log), (damaged, log)
        assert (state / "state.json").read_text() == damaged  # kept: the user decides


# ---- no command writes inside a store; a damaged manifest is restored from its backup --------------------------


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _store(path, tiny_teachers):
    """A verified 2-shard store with its teachers named."""
    from test_store import create, make_result

    from recipes.manifest import load_manifest

    w = create(str(path), teachers=load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    for i in range(w.manifest.num_shards):
        w.commit_shard(make_result(w.manifest, i))
    w.rebuild_errors()
    return path


def test_no_command_writes_inside_a_store(tmp_path, trained, tiny_teachers, tiny_models, trainer_store,
                                          extract_dataset):
    """`render --out STORE/olaf_store.json` replaced the manifest with a PNG. Every command that writes a file or
    folder refuses a path in a store, in one line, and the store keeps every byte."""
    from helpers import extraction_args, trainer_args

    from pipeline import inspect, jobdir, llava, sample
    from pipeline.extract.cli import main as extraction_main
    from trainer import export, plot, pt, tiny

    st = _store(tmp_path / "store", tiny_teachers)
    assert call(inspect.main, [st, "verify"])[0] == 0
    before = _files(st)
    cases = [(inspect.main, [st, "render", "--out", st / "olaf_store.json"]),
             (inspect.main, [st, "render", "--out", st / "wds" / "look.png"]),
             (export.main, [trained, "--format", "llava", "--out", st / "export"]),
             (plot.main, [trained, "--out", st / "loss.png"]),
             (llava.main, ["from-images", extract_dataset[1], "--out", st / "d.json"]),
             (sample.main, [st / "sample"]),
             (jobdir.main, [st / "job"]),
             (tiny.main, [st / "models"]),
             (pt.run, trainer_args(trainer_store, tiny_models, tiny_teachers, st / "run")),
             (extraction_main, extraction_args(extract_dataset, st / "inner", tiny_teachers, "--plan-only"))]
    (tmp_path / "link").symlink_to(st)  # through a link too
    cases.append((inspect.main, [st, "render", "--out", tmp_path / "link" / "teachers.yaml"]))
    for main, argv in cases:
        rc, log = call(main, argv)
        assert rc == 2 and "inside the olaf store" in log and "Traceback" not in log, (argv, log)
    assert _files(st) == before and call(inspect.main, [st, "verify"])[0] == 0
    rc, log = call(inspect.main, [st, "render", "--out", tmp_path / "look.png"])  # outside: fine
    assert rc == 0 and (tmp_path / "look.png").read_bytes()[:4] == b"\x89PNG", log


def test_a_damaged_manifest_is_restored_from_its_backup(tmp_path, tiny_teachers):
    from pipeline import inspect
    from store import layout

    st = _store(tmp_path / "store", tiny_teachers)
    good = (st / layout.MANIFEST).read_bytes()
    assert (st / layout.MANIFEST_BACKUP).read_bytes() == good  # written with every manifest save
    rc, log = call(inspect.main, [st, "repair-manifest"])
    assert rc == 2 and "is sound: nothing to restore" in one_error_line(log)
    for damage in (b"\x89PNG\r\n\x1a\n" + bytes(64), good[: len(good) // 2], b'{"format": "olaf.store/1"}'):
        (st / layout.MANIFEST).write_bytes(damage)
        for cmd in (["summary"], ["verify"]):
            rc, log = call(inspect.main, [st, *cmd])
            assert rc == 2 and "repair-manifest" in one_error_line(log), log
        rc, log = call(inspect.main, [st, "repair-manifest"])
        assert rc == 0 and "restored" in log and (st / layout.MANIFEST).read_bytes() == good
        assert call(inspect.main, [st, "verify"])[0] == 0
    # both copies damaged: no repair to suggest, nothing written
    (st / layout.MANIFEST).write_bytes(b"junk")
    (st / layout.MANIFEST_BACKUP).write_bytes(b"junk too")
    rc, log = call(inspect.main, [st, "summary"])
    assert rc == 2 and "missing or damaged too" in one_error_line(log)
    rc, log = call(inspect.main, [st, "repair-manifest"])
    assert rc == 2 and (st / layout.MANIFEST).read_bytes() == b"junk"


# ---- the teacher identity: a repair trusts only the copy the shards' records confirm ------------------------


def test_a_forged_identity_is_found_by_the_shards_records_and_never_repaired_into_place(tmp_path, extract_dataset,
                                                                                       tiny_teachers):
    """Forged weight hashes in the manifest's copy made verify blame teachers.yaml and `repair-teachers` write the
    forgery into it. Each shard's record now says what computed it; the copy it confirms is the one kept."""
    import pytest
    import yaml
    from helpers import EXTRACT_SHARD, reference_store

    import store
    from pipeline import inspect
    from store import layout

    st = reference_store(tmp_path / "store", extract_dataset, tiny_teachers, shard=EXTRACT_SHARD, teachers_yaml=True)
    made = yaml.safe_load((st / layout.TEACHERS).read_text())
    recs = store.read_records(store.Location(st))
    for t in ("gen", "depth", "seg"):  # every record names what computed it, as teachers.yaml does
        want = {k: made["teachers"][t][k] for k in ("weights_sha256", "recipe_sha256", "compute_dtype")}
        assert all({k: r.teachers[t][k] for k in want} == want for r in recs.values()), t
    forged = "f" * 64

    def manifest_copy(edit):
        w = store.StoreWriter.open(st)
        edit(w.manifest.teachers)
        w.save_manifest()

    def yaml_file(edit):
        d = yaml.safe_load((st / layout.TEACHERS).read_text())
        edit(d)
        (st / layout.TEACHERS).write_text(yaml.safe_dump(d, sort_keys=False))

    def forge(d):
        d["teachers"]["gen"]["weights_sha256"] = forged

    # the copy forged: teachers.yaml is confirmed, and the repair fixes the copy, not teachers.yaml
    manifest_copy(forge)
    rc, log = call(inspect.main, [st, "verify"])
    assert rc == 1 and "confirm teachers.yaml, not the manifest's copy" in log and "gen: weights_sha256 ffff" in log
    assert call(inspect.main, [st, "repair-teachers"])[0] == 0
    assert yaml.safe_load((st / layout.TEACHERS).read_text()) == made
    assert store.read_manifest(store.Location(st)).teachers == made and call(inspect.main, [st, "verify"])[0] == 0
    # teachers.yaml forged: the copy is confirmed and restores it
    yaml_file(forge)
    rc, log = call(inspect.main, [st, "verify"])
    assert rc == 1 and "confirm the manifest's copy, not teachers.yaml" in log, log
    assert call(inspect.main, [st, "repair-teachers"])[0] == 0 and call(inspect.main, [st, "verify"])[0] == 0
    assert yaml.safe_load((st / layout.TEACHERS).read_text()) == made
    # both forged alike: they agree with each other, not with the shards
    manifest_copy(forge)
    yaml_file(forge)
    rc, log = call(inspect.main, [st, "verify"])
    assert rc == 1 and "names other teachers than the shards record" in log, log
    rc, log = call(inspect.main, [st, "repair-teachers"])
    assert rc == 2 and "re-extract" in one_error_line(log)
    # both forged, each its own way: no repair
    yaml_file(lambda d: d["teachers"]["depth"].update(recipe_sha256=forged))
    rc, log = call(inspect.main, [st, "repair-teachers"])
    assert rc == 2 and "neither matches what the shards record" in one_error_line(log)
    # the trainer relies on the records too: teachers.yaml forged to please it is refused
    expected = yaml.safe_load((st / layout.TEACHERS).read_text())
    with pytest.raises(store.StoreError, match=r"gen: weights_sha256 ffff.*by the shards' records"):
        store.Store(st).require(["gen"], expected_teachers=expected)


def test_without_evidence_neither_copy_is_trusted_over_the_other(tmp_path, tiny_teachers):
    """A store whose records do not say what computed them (an older olaf's): copies that differ are both
    suspect, and the repair refuses; a teachers.yaml that no longer parses is still restored from the copy."""
    from pipeline import inspect
    from store import layout

    st = _store(tmp_path / "store", tiny_teachers)
    good = (st / layout.TEACHERS).read_text()
    (st / layout.TEACHERS).write_text(good.replace("float32", "float16", 1))
    rc, log = call(inspect.main, [st, "verify"])
    assert rc == 1 and "neither copy can be trusted over the other" in log
    rc, log = call(inspect.main, [st, "repair-teachers"])
    assert rc == 2 and "neither copy can be trusted" in one_error_line(log)
    (st / layout.TEACHERS).write_text("teachers: [unclosed")
    assert call(inspect.main, [st, "repair-teachers"])[0] == 0 and (st / layout.TEACHERS).read_text() == good


# ---- reliability, round five: the manifest's backup, two jobs' saves, an empty store's index -------------------

def _teacher_free_then_gen(path, shard_size: int = 4):
    """A 2-shard store made without teachers (images, captions, ids), then given gen: (its backup before gen was
    added, the writer)."""
    import numpy as np
    from helpers import SYNTHETIC_TEACHERS

    from store import RunManifest, SampleResult, ShardResult, StoreWriter, TaskLayout, layout, now

    m = RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=8, shard_size=shard_size,
                    formats=["zarr", "wds"], tasks={})
    w = StoreWriter.create(str(path), m, SYNTHETIC_TEACHERS)

    def samples(i):
        return [SampleResult(j, f"s{j}", {"id": f"s{j}"}, f"{j}.jpg", b"\xff\xd8" + bytes([j]) * 40)
                for j in range(*m.shard_range(i))]

    for i in range(m.num_shards):
        w.commit_shard(ShardResult(i, (), samples(i), {}, {}, {}))
    w.finish_run(None, w.records(), m.num_shards, [])
    before = (path / layout.MANIFEST_BACKUP).read_bytes()
    w.start_run({"started": now(), "tasks": ["gen"]}, {}, {}, SYNTHETIC_TEACHERS, {"gen": TaskLayout((1, 16), "fp16")},
                ["gen"])
    for i in range(m.num_shards):
        n = len(samples(i))
        values = np.full((n, 1, 16), i, dtype=np.float16)
        w.commit_shard(ShardResult(i, ("gen",), samples(i), {"gen": values}, {"gen": None},
                                   {"gen": np.ones(n, dtype=bool)}))
    w.finish_run(None, w.records(), m.num_shards, [])
    w.build_index()
    return before, w


def test_repair_manifest_reconciles_a_backup_a_save_behind_with_the_records(tmp_path):
    """A backup from before the teachers were added used to be installed as it was: verify then called both shards
    bad and re-running the add command found nothing to do. The records are the truth: the tasks they hold come
    back, with their layouts read from the store's own files, and the command says so."""
    from pipeline import inspect
    from store import Store, layout

    st = tmp_path / "store"
    before, w = _teacher_free_then_gen(st)
    good = json.loads((st / layout.MANIFEST).read_text())
    assert json.loads(before)["tasks"] == {} and good["tasks"]["gen"]["shape"] == [1, 16]
    assert json.loads(before)["generation"] < good["generation"]
    for damage in (b"junk", (st / layout.MANIFEST).read_bytes()[:200]):
        (st / layout.MANIFEST_BACKUP).write_bytes(before)
        (st / layout.MANIFEST).write_bytes(damage)
        rc, log = call(inspect.main, [st, "repair-manifest"])
        assert rc == 0 and "tasks gen added" in log, log
        assert ("save(s) behind" in log) == (damage != b"junk"), log  # a cut manifest still says its generation
        restored = json.loads((st / layout.MANIFEST).read_text())
        assert restored["tasks"] == good["tasks"] and restored["finished"]  # every shard is done for gen
        assert (st / layout.MANIFEST_BACKUP).read_bytes() == (st / layout.MANIFEST).read_bytes()
        assert call(inspect.main, [st, "verify"])[0] == 0
        assert Store(str(st)).done_shards(["gen"]) == [0, 1]


def test_repair_manifest_refuses_another_stores_backup(tmp_path):
    """Another store's manifest as the backup was installed (the store could then be continued with neither shard
    size). Refused, naming what differs, and nothing is written."""
    from pipeline import inspect
    from store import layout

    st = tmp_path / "store"
    _teacher_free_then_gen(st)
    other = tmp_path / "other"
    _teacher_free_then_gen(other, shard_size=3)  # another store, another shard size
    twin = tmp_path / "twin"
    _teacher_free_then_gen(twin)  # another store of the same geometry
    cases = [(other / layout.MANIFEST, b"junk", "do not put there"),
             (twin / layout.MANIFEST, (st / layout.MANIFEST).read_bytes()[:120], "the damaged manifest says"),
             (twin / layout.MANIFEST, b"junk", "the sample index says"),
             (twin / layout.MANIFEST, b"junk", "the shards' records say")]
    for backup, damage, said in cases:
        if said == "the shards' records say":
            (st / layout.INDEX_META).unlink()  # the records alone still tell
        (st / layout.MANIFEST_BACKUP).write_bytes(backup.read_bytes())
        (st / layout.MANIFEST).write_bytes(damage)
        rc, log = call(inspect.main, [st, "repair-manifest"])
        assert rc == 2 and "is not this store's manifest" in one_error_line(log) and said in log, log
        assert (st / layout.MANIFEST).read_bytes() == damage


def test_two_jobs_saving_one_manifest_keep_each_others_tasks(tmp_path):
    """`--tasks none` and `--tasks gen,...` on one output: the teacher-free job kept a manifest without the teachers
    in memory and saved it on every commit; its last save lost the added tasks. Every save merges what is on disk,
    under the store's manifest lock."""
    import numpy as np
    from helpers import SYNTHETIC_TEACHERS

    from store import RunManifest, SampleResult, ShardResult, StoreError, StoreWriter, TaskLayout, layout, now
    from store.lease import ManifestLock

    m = RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=8, shard_size=4,
                    formats=["wds"], tasks={})
    free = StoreWriter.create(str(tmp_path / "store"), m, SYNTHETIC_TEACHERS)
    adder = StoreWriter.open(str(tmp_path / "store"))
    free.start_run({"started": now(), "tasks": []}, {}, {}, SYNTHETIC_TEACHERS, {}, ["gen"])
    teachers = {**SYNTHETIC_TEACHERS, "teachers": {"gen": {"weights_sha256": "ab" * 32}}}
    adder.start_run({"started": now(), "tasks": ["gen"]}, {}, {}, teachers, {"gen": TaskLayout((1, 16), "fp16")}, ["gen"])
    samples = [SampleResult(j, f"s{j}", {"id": f"s{j}"}, f"{j}.jpg", b"\xff\xd8" * 9) for j in range(4)]
    rec = free.commit_shard(ShardResult(0, (), samples, {}, {}, {}))
    free.record_progress({"samples_done": 4})  # the teacher-free job's save after the other's start
    free.finish_run(None, {0: rec}, 1, [])
    disk = json.loads((tmp_path / "store" / layout.MANIFEST).read_text())
    assert list(disk["tasks"]) == ["gen"] and disk["finished"] is None  # gen is not done anywhere
    assert len(disk["runs"]) == 2 and all(r.get("id") for r in disk["runs"])
    assert "gen" in yaml.safe_load((tmp_path / "store" / "teachers.yaml").read_text())["teachers"]
    adder.commit_shard(ShardResult(1, ("gen",), [SampleResult(j, f"s{j}", {"id": f"s{j}"}, f"{j}.jpg", b"\xff\xd8")
                                                 for j in range(4, 8)],
                                   {"gen": np.zeros((4, 1, 16), np.float16)}, {"gen": None}, {"gen": np.ones(4, bool)}))
    # a live lock of another job is waited for, then refused in one line; a lapsed one is broken
    clock = [1000.0]
    lock = tmp_path / "store" / layout.MANIFEST_LOCK
    lock.write_text(json.dumps({"owner": f"elsewhere:{1}:x", "expires": 1030.0}))
    waiting = ManifestLock(free.loc, wait=5, clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + 1))
    with pytest.raises(StoreError, match="has been held by elsewhere"):
        waiting.__enter__()
    clock[0] = 2000.0
    with ManifestLock(free.loc, clock=lambda: clock[0]):
        assert json.loads(lock.read_text())["owner"] != "elsewhere:1:x"
    assert not lock.exists()


def test_an_index_of_a_store_with_no_committed_shard_is_built_and_said(tmp_path):
    """A first run that committed no shard (its disk full) ended in KeyError: 'id_length' while building the index."""
    from helpers import SYNTHETIC_TEACHERS

    from pipeline import inspect
    from store import RunManifest, StoreWriter, load_index

    m = RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=8, shard_size=4,
                    formats=["zarr", "wds"], tasks={})
    w = StoreWriter.create(str(tmp_path / "store"), m, SYNTHETIC_TEACHERS)
    meta = w.build_index()
    assert meta["usable"] == 0 and meta["shards"] == []
    index, _ = load_index(w.loc)
    assert len(index.ids) == 0 and len(index.columns["offset"]) == 0
    rc, log = call(inspect.main, [tmp_path / "store", "index"])
    assert rc == 0 and "no shard of the 2 is committed yet" in log, log
