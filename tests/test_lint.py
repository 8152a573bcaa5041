"""The code base passes ruff (rules in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    p = subprocess.run([ruff, "check", "pipeline", "teachers", "trainer", "tests", "benchmarks"], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_trainer_never_imports_teachers():
    """The trainer reads targets from stores; it must not even be able to reach a teacher."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "trainer").rglob("*.py")
                 if any(line.strip().startswith(("import teachers", "from teachers")) for line in p.read_text().splitlines())]
    assert offenders == []
