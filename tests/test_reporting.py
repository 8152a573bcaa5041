"""W&B beside TensorBoard (`run.report_to`, trainer/reporting.py): an offline W&B run folder holds every logged
loss and held-out figure and the run's config; a missing package or a failed login is one line and the run
trains on."""

from __future__ import annotations

import json
import struct
import sys

from helpers import call, trainer_args

from trainer.pt import run as trainer


def wandb_records(path):
    """The protobuf records of a W&B run file (LevelDB's log format: 32 KiB blocks of chunks with a 7-byte
    header -- crc, length, type --, after W&B's own 7-byte header), read here without W&B's reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first start a record, middle / last extend it
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def test_an_offline_wandb_run_holds_the_losses_and_the_config(tmp_path, trainer_store, tiny_models, tiny_teachers,
                                                             monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    argv = trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "4", "--set", "log_every=1",
                        "--set", "num_workers=0", "--set", "run.report_to=[tensorboard, wandb]", "--set", "run.tensorboard=true",
                        "--eval-store",
                        trainer_store, "--eval-every", "2", "--eval-samples", "4")
    rc, log = call(trainer, argv)
    assert rc == 0, log
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history, config = {}, {}
    for r in wandb_records(runs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.run.config.update})
    train = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert sorted(history) == [1, 2, 3, 4]
    for rec in train:
        for k, v in rec.items():
            if k != "step":
                assert history[rec["step"]][k] == v, (rec["step"], k)
    for rec in (json.loads(x) for x in (out / "logs" / "eval.jsonl").read_text().splitlines()):
        assert history[rec["step"]]["eval/loss"] == rec["loss"]
    value = lambda k: config[k]["value"] if isinstance(config[k], dict) and "value" in config[k] else config[k]  # noqa: E731
    assert value("data")["store"] == str(trainer_store)
    assert value("stores")[0]["url"] == str(trainer_store)
    assert list((out / "tensorboard").iterdir())  # and TensorBoard beside it
    # a resume continues the same W&B run
    assert (out / "wandb-run-id").read_text().strip() in runs[0].name


def test_without_the_wandb_package_the_run_trains_and_says_so_once(tmp_path, trainer_store, tiny_models,
                                                                   tiny_teachers, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", "--max-steps",
                                         "2", "--set", "num_workers=0", "--set", "run.report_to=wandb"))
    assert rc == 0, log
    notes = [ln for ln in log.splitlines() if "wandb" in ln and not ln.startswith("exported")]
    assert len(notes) == 1 and "olaf[wandb]" in notes[0], notes
    assert (tmp_path / "out" / "export").is_dir()


def test_a_failed_wandb_login_is_one_line_and_the_run_trains(tmp_path, trainer_store, tiny_models, tiny_teachers,
                                                            monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", "--max-steps",
                                         "2", "--set", "num_workers=0", "--set", "run.report_to=wandb"))
    assert rc == 0, log
    notes = [ln for ln in log.splitlines() if "wandb could not start" in ln]
    assert len(notes) == 1 and "API key" in notes[0], log


def test_an_unknown_reporter_is_refused(tmp_path, trainer_store, tiny_models, tiny_teachers):
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out",
                                         "--set", "run.report_to=mlflow"))
    assert rc == 2 and "run.report_to" in log and "mlflow" in log
