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


def test_only_the_store_package_knows_the_format():
    """Names of the store's files, arrays and tar members are spelled in pipeline/store/ only (everyone else asks
    its public functions)."""
    import ast
    import re

    from pipeline.store import layout

    names = [re.escape(n) for n in (layout.MANIFEST, layout.ZARR, f"{layout.WDS}/", f"{layout.SHARDS}/", ".npy",
                                    "image_member")] + [r"(?<!-)shard-[0-9{]"]
    offenders = []
    for sub in ("pipeline", "trainer", "teachers"):
        for p in (REPO / sub).rglob("*.py"):
            if (REPO / "pipeline" / "store") in p.parents:
                continue
            tree = ast.parse(p.read_text())
            doc_nodes = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, ast.Module | ast.FunctionDef |
                         ast.ClassDef) and n.body and isinstance(n.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in doc_nodes:
                    offenders += [f"{p.relative_to(REPO)}:{node.lineno}: {n!r}" for n in names if re.search(n, node.value)]
    assert offenders == []
