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
