"""The house's rules, read from the code itself: olaf's packages form layers with no import running back up, the
store is the only code that knows the format, the trainer never reaches a teacher, no function grows past a
screen, the README's layout names what is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> the olaf packages it may import (bottom up: store, then recipes on it, pipeline and trainer on top)
LAYERS = {
    "store": set(),
    "recipes": {"store"},  # a weight file's sha256 is kept in the node's cache (store.cache)
    "teachers": {"recipes"},
    "pipeline": {"recipes", "teachers", "store"},
    "trainer": {"recipes", "store"},
    # what the tests and benchmarks share (a real S3 server, the reference store), then the benchmarks, on top
    "support": {"recipes", "store", "teachers", "pipeline"},
    "benchmarks": {"recipes", "store", "teachers", "pipeline", "trainer", "support"},
}
MAX_FUNCTION_LINES = 60


def _modules(package: str):
    for p in sorted((REPO / package).rglob("*.py")):
        yield p, ast.parse(p.read_text())


def _imported_packages(tree: ast.AST) -> set[str]:
    """The top-level packages a module imports (anywhere in it, lazily too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_packages_import_only_the_layers_below_them():
    offenders = []
    for package, allowed in LAYERS.items():
        for path, tree in _modules(package):
            wrong = (_imported_packages(tree) & set(LAYERS)) - allowed - {package}
            offenders += [f"{path.relative_to(REPO)} imports {w}" for w in sorted(wrong)]
    assert offenders == []


def test_benchmarks_are_a_package_on_the_layers():
    """No benchmark edits sys.path or imports from tests/ (benchmarks are commands of their own package, `python -m
    benchmarks.<name>`), and no module of theirs is named like one of olaf's packages."""
    offenders = []
    for package in ("benchmarks", "support"):
        for path, tree in _modules(package):
            imported = _imported_packages(tree)
            offenders += [f"{path.relative_to(REPO)} imports from tests/" for name in ("helpers", "conftest", "tests")
                          if name in imported]
            offenders += [f"{path.relative_to(REPO)} edits sys.path" for n in ast.walk(tree)
                          if isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", "") == "sys"]
            if path.stem in LAYERS:
                offenders.append(f"{path.relative_to(REPO)} is named like olaf's package {path.stem}")
    assert offenders == []


def test_the_layers_have_no_cycle():
    """Checked on the rules themselves, so that a rule added later cannot make a circle."""
    done: set[str] = set()

    def visit(p: str, path: tuple[str, ...]) -> None:
        assert p not in path, f"import cycle: {' -> '.join(path + (p,))}"
        for q in LAYERS[p]:
            visit(q, path + (p,))
        done.add(p)

    for p in LAYERS:
        visit(p, ())
    assert done == set(LAYERS)


def test_functions_fit_on_a_screen():
    long = [f"{path.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for package in LAYERS for path, tree in _modules(package) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_only_the_store_package_knows_the_format():
    """Names of the store's files, arrays and tar members are spelled in store/ only (everyone else asks its
    public functions)."""
    from store import layout

    names = [re.escape(n) for n in (layout.MANIFEST, layout.ZARR, f"{layout.WDS}/", f"{layout.SHARDS}/", ".npy",
                                    "image_member", "__key__")] + [r"(?<!-)shard-[0-9{]"]
    offenders = []
    for package in set(LAYERS) - {"store"}:
        for path, tree in _modules(package):
            doc_nodes = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, ast.Module | ast.FunctionDef |
                         ast.ClassDef) and n.body and isinstance(n.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in doc_nodes:
                    offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {n!r}" for n in names
                                  if re.search(n, node.value)]
    assert offenders == []


def test_the_task_names_are_spelled_once():
    """`gen`, `depth`, `seg` as a tuple or list literal only in recipes.manifest.TASKS."""
    offenders = []
    for package in LAYERS:
        for path, tree in _modules(package):
            for node in ast.walk(tree):
                if isinstance(node, ast.Tuple | ast.List) and [getattr(e, "value", None) for e in node.elts] == \
                        ["gen", "depth", "seg"] and path != REPO / "recipes" / "manifest.py":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_the_readme_layout_names_every_module():
    """The README's Layout block has a line per package (`pkg/  what it is: module, module, ...`); every module on
    disk is named on its package's line and every name there is a module, so the layout cannot go stale."""
    section = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    entries: dict[str, str] = {}
    for line in block.strip("\n").splitlines():
        if line[:1].strip():
            package, _, text = line.partition(" ")
            entries[package] = text
        else:
            entries[package] += " " + line.strip()
    listed = set()
    for package, text in entries.items():
        names = re.sub(r"\([^)]*\)", "", text.split(": ", 1)[1])
        listed |= {package + name.strip() + ".py" for name in names.split(",")}
    packages = {p.parent.relative_to(REPO).as_posix() + "/" for top in LAYERS for p in (REPO / top).rglob("__init__.py")}
    actual = {p.relative_to(REPO).as_posix() for top in LAYERS for p in (REPO / top).rglob("*.py")
              if p.name != "__init__.py"}
    assert set(entries) == packages
    assert sorted(actual - listed) == [] and sorted(listed - actual) == []
