"""The authors' pinned environment, for the tests that hand olaf's files to their stack: a separate venv with
the versions their README and setup.py pin (transformers 4.41.1, tokenizers 0.19.1, huggingface_hub 0.24.7,
numpy 1.26, sentencepiece 0.1.99), built once and cached; torch is the CPU 2.13.0 on this machine's disk (they pin
2.2.0, whose CPU build is not on the package index; the loading code under test is transformers', not torch's).

    python tests/authors/env.py        # build it (make test does, before the suite); prints its python

It lives in .venv-authors (or $OLAF_AUTHORS_VENV) and is rebuilt when the pins below change. An overlay holds
transformers 4.43.4 alone (the first release with Llama-3.1's `llama3` RoPE), put in front with PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINS = ["torch==2.13.0", "transformers==4.41.1", "tokenizers==0.19.1", "huggingface_hub==0.24.7", "numpy==1.26.2",
        "safetensors==0.4.3", "sentencepiece==0.1.99"]
OVERLAY_PINS = ["transformers==4.43.4"]
OVERLAY = "overlay-transformers-4.43"


def location() -> Path:
    return Path(os.environ.get("OLAF_AUTHORS_VENV") or REPO / ".venv-authors")


def _stamp() -> str:
    return hashlib.sha256("\n".join(PINS + OVERLAY_PINS).encode()).hexdigest()[:16]


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"building the authors' environment failed: {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")


def ensure() -> Path:
    """The venv's python, built first if it is missing or its pins changed."""
    venv = location()
    python, stamp = venv / "bin" / "python", venv / ".olaf-pins"
    if python.is_file() and stamp.is_file() and stamp.read_text() == _stamp():
        return python
    if venv.exists():
        import shutil

        shutil.rmtree(venv)
    base = _base_python()
    subprocess.run([base if Path(base).is_file() else sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(python, *PINS)
    _pip(python, "--no-deps", "--target", str(venv / OVERLAY), *OVERLAY_PINS)
    stamp.write_text(_stamp())
    return python


def _base_python() -> str:
    """The interpreter olaf's own venv was made from: the new venv gets nothing of olaf's packages."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def overlay_env(newer: bool) -> dict:
    """The environment to run the venv's python with: PYTHONPATH puts transformers 4.43.4 first when `newer`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if newer:
        env["PYTHONPATH"] = str(location() / OVERLAY)
    return env


if __name__ == "__main__":
    print(ensure())
