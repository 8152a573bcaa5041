"""The working directory a Ray job is submitted with: an allow-list of what the job needs, nothing else.

    ray job submit --address http://127.0.0.1:8265 --working-dir "$(python -m pipeline.jobdir build/job)" -- \\
      python -m pipeline.extract_teachers ...

`ray job submit --working-dir .` uploads everything `.gitignore` does not exclude: a `.env`, credential files,
private keys, `.git/`, datasets or checkpoints kept under other names. This builds a fresh folder holding only
the olaf packages' sources and data files, the teacher manifests and pyproject.toml, plus `olaf_code.json`
with the submitting side's git commit (the uploaded copy has no .git; the store manifest records it from
there). Re-running replaces the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.provenance import CODE_INFO, PACKAGES, REPO_ROOT, git_describe

FILES = ("pyproject.toml",)


def allowed_files(root: Path) -> list[Path]:
    """The allow-list, relative to `root`."""
    out = []
    for pkg in PACKAGES:
        out += [p.relative_to(root) for p in sorted((root / pkg).rglob("*")) if p.suffix in (".py", ".yaml")
                and p.is_file() and "__pycache__" not in p.parts]
    out += [Path(f) for f in FILES if (root / f).is_file()]
    return out


def build(out: str | Path, root: Path = REPO_ROOT) -> Path:
    out = Path(out).resolve()
    root = Path(root).resolve()
    if out == root or root in out.parents and out.parts[len(root.parts)] in PACKAGES:
        raise SystemExit(f"error: {out} would overwrite the sources; choose a folder outside them (e.g. build/job)")
    shutil.rmtree(out, ignore_errors=True)
    for rel in allowed_files(root):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)
    (out / CODE_INFO).write_text(json.dumps({"git": git_describe(root)}) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.jobdir", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="build/job", help="folder to (re)create (default build/job)")
    a = p.parse_args(argv)
    print(build(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
