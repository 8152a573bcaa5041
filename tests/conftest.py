"""Shared fixtures, built once per test session: tiny teachers and models, the datasets, the stores every module
reads, a trained PT run, a Ray head on loopback, a real S3 server on loopback."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.localray import LOOPBACK_ENV

# Tests never reach a hub: every model is built locally from config classes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "OLAF_CACHE" not in os.environ:  # readers' caches (a remote store's index, the order's arrays): this session's
    import atexit
    import tempfile

    os.environ["OLAF_CACHE"] = tempfile.mkdtemp(prefix="olaf-cache-")
    atexit.register(shutil.rmtree, os.environ["OLAF_CACHE"], True)
# Every Ray the tests start is single-node on 127.0.0.1, sends no usage stats, and uses a token of this session.
os.environ.update(LOOPBACK_ENV)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("RAY_ADDRESS", None)
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    import atexit
    import secrets
    import tempfile

    _fd, _token_path = tempfile.mkstemp(prefix="olaf-ray-token-")
    os.write(_fd, secrets.token_hex(32).encode())
    os.close(_fd)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _token_path
    atexit.register(lambda: os.path.exists(_token_path) and os.unlink(_token_path))

from support.s3server import SeaweedFS, free_port  # noqa: E402

# ---- models -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """OUT/teachers.yaml + OUT/{gen,depth,seg}: random-weight stand-ins saved with save_pretrained."""
    from teachers.tiny import build

    return build(tmp_path_factory.mktemp("tiny_teachers"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, trainer_dataset):
    """trainer.tiny's LLM (its tokenizer knows the sample's words) and CLIP tower, and a config for them."""
    import yaml

    from trainer.tiny import build

    cfg = build(tmp_path_factory.mktemp("tiny_models"), trainer_dataset[0], lm_steps=0)
    data = yaml.safe_load(cfg.read_text())
    data["optim"].update(micro_batch_size=4, global_batch_size=4, learning_rate=3e-3)
    data["data"].update(num_workers=2)
    data["run"].update(save_every=2, tensorboard=False)
    data["model"].update(gradient_checkpointing=False)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


# ---- datasets and stores ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """A 24-sample LLaVA-format dataset with 7 broken and 7 awkward-but-valid images mixed in."""
    from pipeline.sample import generate

    out = tmp_path_factory.mktemp("sample_ds")
    return generate(out, num_samples=24, seed=11, bad=7, odd=7), out / "images"


@pytest.fixture(scope="session")
def extract_dataset(tmp_path_factory):
    """What the extraction tests run on: 18 records, 7 of them broken, 7 awkward (4 shards of EXTRACT_SHARD)."""
    from pipeline.sample import generate

    out = tmp_path_factory.mktemp("extract_ds")
    return generate(out, num_samples=4, seed=3, bad=7, odd=7), out / "images"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, extract_dataset, tiny_teachers):
    """The extraction dataset's store, written the straightforward way (one process, no Ray)."""
    from helpers import EXTRACT_SHARD, reference_store

    return reference_store(tmp_path_factory.mktemp("ref") / "store", extract_dataset, tiny_teachers, shard=EXTRACT_SHARD)


@pytest.fixture(scope="session")
def trainer_dataset(tmp_path_factory):
    from pipeline.sample import generate

    ds = tmp_path_factory.mktemp("trainer_ds")
    return generate(ds, num_samples=28, seed=5, bad=4), ds / "images"


@pytest.fixture(scope="session")
def trainer_store(tmp_path_factory, trainer_dataset, tiny_teachers):
    from helpers import reference_store

    return reference_store(tmp_path_factory.mktemp("trainer_store") / "store", trainer_dataset, tiny_teachers,
                           teachers_yaml=True)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, trainer_store, tiny_models, tiny_teachers):
    """A finished PT run of TRAINED_STEPS steps on the trainer store (in this process)."""
    from helpers import TRAINED_STEPS, call, trainer_args

    from trainer.pt import run

    out = tmp_path_factory.mktemp("run") / "out"
    rc, log = call(run, trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", str(TRAINED_STEPS)))
    assert rc == 0, log
    return out


# ---- servers on loopback ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, seaweedfs):
    """One Ray head on 127.0.0.1 for the session's extraction jobs (`--address`), stopped afterwards without
    touching any other Ray on the machine. Started after the S3 server: its workers, like a real cluster's
    nodes, have the bucket's credentials in their environment."""
    from pipeline import localray

    state = tmp_path_factory.mktemp("ray_head")
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], state / "auth_token")  # the session's token
    info = localray.start(state, port=free_port(), dashboard_port=free_port(), num_cpus=2)
    yield f"127.0.0.1:{info['port']}"
    localray.stop(state)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """SeaweedFS on loopback for the whole test run (support/s3server.py). Sets AWS_* in this process's environment
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
