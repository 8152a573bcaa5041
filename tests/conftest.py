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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
