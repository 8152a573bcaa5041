"""Shared fixtures: tiny teachers and small LLaVA-format datasets, built once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub: every model is built locally from config classes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray the tests start is single-node on 127.0.0.1, sends no usage stats, and uses a token of this session.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "token"
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    import atexit
    import secrets
    import tempfile

    _fd, _token_path = tempfile.mkstemp(prefix="olaf-ray-token-")
    os.write(_fd, secrets.token_hex(32).encode())
    os.close(_fd)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _token_path
    atexit.register(lambda: os.path.exists(_token_path) and os.unlink(_token_path))


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """OUT/teachers.yaml + OUT/{gen,depth,seg}: random-weight stand-ins saved with save_pretrained."""
    from teachers.tiny import build

    out = tmp_path_factory.mktemp("tiny_teachers")
    return build(out)


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """A 24-sample LLaVA-format dataset with 7 broken and 7 awkward-but-valid images mixed in."""
    from pipeline.sample import generate

    out = tmp_path_factory.mktemp("sample_ds")
    json_path = generate(out, num_samples=24, seed=11, bad=7, odd=7)
    return json_path, out / "images"


@pytest.fixture(scope="session")
def trainer_store(tmp_path_factory, tiny_teachers):
    from helpers import reference_store

    from pipeline.sample import generate

    ds = tmp_path_factory.mktemp("trainer_ds")
    json_path = generate(ds, num_samples=28, seed=5, bad=4)
    return reference_store(tmp_path_factory.mktemp("trainer_store") / "store", (json_path, ds / "images"),
                           tiny_teachers, teachers_yaml=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    import yaml

    from trainer.tiny import build

    out = tmp_path_factory.mktemp("tiny_models")
    cfg = build(out, lm_steps=0)
    data = yaml.safe_load(cfg.read_text())
    data.update(micro_batch_size=4, global_batch_size=4, num_workers=2, save_every=2,
                learning_rate=3e-3)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


from s3server import SeaweedFS, free_port  # noqa: E402, F401  (free_port: re-exported for the test modules)

# ---- a real S3-compatible server on loopback ------------------------------------------------------------------


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """SeaweedFS on loopback for the whole test run (tests/s3server.py). Sets AWS_* in this process's environment
    (inherited by Ray and every child), so s3:// URLs reach it the way they reach any bucket."""
    try:
        server = SeaweedFS.start(tmp_path_factory.mktemp("seaweedfs"))
    except RuntimeError as e:
        pytest.fail(str(e))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """A place to put stores: a local folder, or a fresh prefix of the SeaweedFS bucket. Call it with a name."""
    import uuid

    if request.param == "local":
        return lambda name: str(tmp_path / name)
    bucket = request.getfixturevalue("seaweedfs").bucket
    run = uuid.uuid4().hex[:8]
    return lambda name: f"s3://{bucket}/{run}/{name}"
