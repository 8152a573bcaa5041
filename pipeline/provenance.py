"""What a store records about how it was made, beyond the teachers: olaf's code version (git commit and a hash of
the sources that ran), the library versions, and the image libraries the recipes' exact pixels depend on."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path

from recipes.imageops import image_libraries

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recipes", "teachers", "store", "pipeline", "trainer")  # olaf's Python packages, bottom up
CODE_INFO = "olaf_code.json"  # in a Ray job's working dir: the submitting side's git commit (pipeline.jobdir)


def git_describe(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> dict:
    """olaf's version, the git commit (in a Ray job's uploaded working dir: the one pipeline.jobdir recorded on
    the submitting side), and a hash of the source that ran, which always identifies the code."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("olaf")
    except PackageNotFoundError:
        pkg = "unknown"
    h = hashlib.sha256()
    for sub in PACKAGES:
        for p in sorted((REPO_ROOT / sub).rglob("*.py")):
            h.update(str(p.relative_to(REPO_ROOT)).encode())
            h.update(p.read_bytes())
    git = git_describe(REPO_ROOT)
    if git is None and (REPO_ROOT / CODE_INFO).is_file():
        git = json.loads((REPO_ROOT / CODE_INFO).read_text()).get("git")
    return {"version": pkg, "git": git, "source_sha256": h.hexdigest()}


def versions() -> dict:
    """The libraries that computed a store."""
    import ray
    import torch
    import transformers
    import zarr

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__, "zarr": zarr.__version__, **image_libraries()}


def image_library_warnings(existing, now: dict, where: str = "this machine") -> list[str]:
    """Pixels are bit-exact only for the Pillow / libjpeg-turbo / zlib that computed them: a resume or an added
    task with other versions may give targets that differ in the last bits from those already stored (`existing`:
    the store's RunManifest, or None). Pillow 13 and later resize in another pass order than the authors' Pillow
    (10.2), for every version of a store."""
    out = []
    if int(str(now.get("pillow", "0")).split(".")[0]) >= 13:
        out.append(f"warning: Pillow {now['pillow']} on {where} resizes an image whose height shrinks by more than "
                   f"twice as many pixels as its width vertically first; the authors' Pillow 10.2 always went "
                   f"horizontally first, so such images (e.g. portrait photos for the depth recipe) get slightly "
                   f"other pixels and targets. Install pillow<13 (what olaf's requirements ask) to match them.")
    if existing is None:
        return out
    before = {**existing.extraction, **{k: v for r in existing.runs for k, v in r.items() if k in now}}
    changed = [f"{k} {before[k]} -> {now[k]}" for k in now if k in before and before[k] != now[k]]
    if changed:
        out.append(f"warning: the image libraries differ from those the store was computed with ({', '.join(changed)} "
                   f"on {where}): the recipes' resizes are bit-exact only within one set of versions, so targets "
                   f"computed now may differ slightly from those already stored. Install the store's versions to "
                   f"keep the store uniform, or use a new --output.")
    return out
