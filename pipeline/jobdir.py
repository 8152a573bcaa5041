"""The working directory a Ray job is submitted with: an allow-list of what the job needs, nothing else.

    ray job submit --address http://127.0.0.1:8265 --working-dir "$(python -m pipeline.jobdir build/job)" -- \\
      python -m pipeline.extract_teachers ...

`ray job submit --working-dir .` uploads everything `.gitignore` does not exclude: a `.env`, credential files,
private keys, `.git/`, datasets or checkpoints kept under other names. This builds a fresh folder holding only
the olaf packages' sources and data files, the teacher manifests and pyproject.toml, plus `olaf_code.json`
with the submitting side's git commit (the uploaded copy has no .git; the store manifest records it from
there). Re-running replaces the folder, which it only ever does to a folder it made itself (marked by
`.olaf-jobdir`): an existing folder of anything else is refused, never deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.provenance import CODE_INFO, PACKAGES, REPO_ROOT, git_describe
from store import StoreError, atomic_path, refuse_inside_store

FILES = ("pyproject.toml",)
MARK = ".olaf-jobdir"  # in every folder build() makes: the only kind it replaces


class JobdirError(Exception):
    """The folder asked for cannot be (re)built without harm; the message says why."""


def allowed_files(root: Path) -> list[Path]:
    """The allow-list, relative to `root`."""
    out = []
    for pkg in PACKAGES:
        out += [p.relative_to(root) for p in sorted((root / pkg).rglob("*")) if p.suffix in (".py", ".yaml")
                and p.is_file() and "__pycache__" not in p.parts]
    out += [Path(f) for f in FILES if (root / f).is_file()]
    return out


def _check_target(out: Path, root: Path) -> None:
    if out == root or out in root.parents or (root in out.parents and out.parts[len(root.parts)] in PACKAGES):
        raise JobdirError(f"{out} holds olaf's sources (or is one of their folders): choose a folder of its own, "
                          f"e.g. build/job")
    if out.exists() and not out.is_dir():
        raise JobdirError(f"{out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise JobdirError(f"{out} exists and was not made by pipeline.jobdir (no {MARK} in it): it is not replaced; "
                          f"choose a new or empty folder, e.g. build/job")


def build(out: str | Path, root: Path = REPO_ROOT) -> Path:
    """(Re)build the allow-list folder `out` from the checkout `root`; returns its path."""
    out, root = Path(out).resolve(), Path(root).resolve()
    _check_target(out, root)
    with atomic_path(out) as tmp:
        tmp = Path(tmp)
        for rel in allowed_files(root):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
        (tmp / CODE_INFO).write_text(json.dumps({"git": git_describe(root)}) + "\n")
        (tmp / MARK).write_text("made by python -m pipeline.jobdir; it replaces this folder when asked to\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.jobdir", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="build/job", help="folder to (re)create (default build/job)")
    a = p.parse_args(argv)
    try:
        refuse_inside_store(a.out, "OUT")
        print(build(a.out))
    except (JobdirError, StoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
