"""Which adapter computes which architecture, and loading a set of teachers from a manifest."""

from __future__ import annotations

import torch

from pipeline.teacher_manifest import ManifestError, TeacherManifest, TeacherSpec
from teachers.base import Teacher
from teachers.depth import DepthTeacher
from teachers.gen import GenTeacher
from teachers.seg import SegTeacher

ADAPTERS: dict[str, type[Teacher]] = {cls.architecture: cls for cls in (GenTeacher, DepthTeacher, SegTeacher)}


def adapter_for(spec: TeacherSpec) -> type[Teacher]:
    try:
        return ADAPTERS[spec.architecture]
    except KeyError:
        raise ManifestError(
            f"teacher '{spec.task}': unknown architecture {spec.architecture!r}; known: {', '.join(ADAPTERS)}"
        ) from None


def load_teachers(
    manifest: TeacherManifest, tasks, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Teacher]:
    """Load the teachers of `tasks` (checked against the manifest first, so a typo fails before any load)."""
    specs = manifest.select(list(tasks))
    adapters = [adapter_for(s) for s in specs]
    return {s.task: a.load(s, device=device, dtype=dtype) for s, a in zip(specs, adapters, strict=True)}
