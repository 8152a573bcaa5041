"""Commands that could destroy what a user has: nothing of theirs deleted, no store overwritten by another command's
output, no provenance a repair could forge, no measured figures replaced. Each case failed before its fix
(reliability, round four)."""

from __future__ import annotations

import json

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
