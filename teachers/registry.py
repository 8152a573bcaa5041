"""Which adapter computes which architecture, and loading a set of teachers from a manifest."""

from __future__ import annotations

import torch

from recipes.manifest import ManifestError, TeacherManifest, TeacherSpec
from teachers.base import Teacher
from teachers.depth import DepthTeacher
from teachers.gen import GenTeacher
from teachers.hf_vision import HFVisionTeacher
from teachers.seg import SegTeacher
from teachers.standin import StandInTeacher

ADAPTERS: dict[str, type[Teacher]] = {cls.architecture: cls for cls in (GenTeacher, DepthTeacher, SegTeacher,
                                                                        StandInTeacher, HFVisionTeacher)}


def adapter_for(spec: TeacherSpec) -> type[Teacher]:
    try:
        return ADAPTERS[spec.architecture]
    except KeyError:
        raise ManifestError(
            f"teacher '{spec.task}': unknown architecture {spec.architecture!r}; known: {', '.join(ADAPTERS)}"
        ) from None


def load_teachers(
    manifest: TeacherManifest, tasks, device: str | torch.device = "cpu",
    dtype: torch.dtype | dict[str, torch.dtype] = torch.float32
) -> dict[str, Teacher]:
    """Load the teachers of `tasks` (checked against the manifest first, so a typo fails before any load), each
    in its dtype (`dtype`: one for all, or one per task, as `compute_dtypes` resolves them)."""
    specs = manifest.select(list(tasks))
    adapters = [adapter_for(s) for s in specs]
    per_task = dtype if isinstance(dtype, dict) else dict.fromkeys(tasks, dtype)
    return {s.task: a.load(s, device=device, dtype=per_task[s.task]) for s, a in zip(specs, adapters, strict=True)}


class TeacherSet:
    """The loaded teachers of one worker: one decoded batch in, every teacher's targets out.

    A batch that fails as a whole (a kernel error, an out-of-memory) is retried one sample at a time, so a sample
    that breaks a teacher is reported alone; non-finite outputs are reported per sample too.
    """

    def __init__(self, teachers: dict[str, Teacher], device: str | torch.device,
                 files_sha256: dict[str, str] | None = None):
        self.teachers = teachers
        self.device = torch.device(device)
        self.files_sha256 = dict(files_sha256 or {})  # the weight files' content, where they were found

    @classmethod
    def load(cls, manifest: TeacherManifest, tasks, device="cpu", dtype=torch.float32) -> TeacherSet:
        """`dtype`: one for all teachers, or {task: dtype}."""
        from recipes.weights_files import manifest_files_sha256

        return cls(load_teachers(manifest, tasks, device=device, dtype=dtype), device,
                   manifest_files_sha256(manifest, tasks))

    def subset(self, tasks) -> TeacherSet:
        return TeacherSet({t: self.teachers[t] for t in tasks}, self.device, self.files_sha256)

    def weights_sha256(self) -> dict[str, str]:
        return {t: teacher.weights_sha256 for t, teacher in self.teachers.items()}

    def provenance(self) -> dict[str, dict]:
        """What computes each task's targets, as a shard's record keeps it: the evidence a store's teacher
        identity is checked against (store.identity)."""
        return {t: {"weights_sha256": teacher.weights_sha256, "recipe_sha256": teacher.spec.recipe_hash(),
                    "compute_dtype": str(teacher.dtype).removeprefix("torch."),
                    **({"weights_files_sha256": self.files_sha256[t]} if t in self.files_sha256 else {})}
                for t, teacher in self.teachers.items()}

    def _forward(self, teacher: Teacher, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        try:
            return teacher(x), {}
        except Exception:
            if x.is_cuda:
                torch.cuda.empty_cache()  # an out-of-memory batch may still fit one image at a time
        errors: dict[int, str] = {}
        rows = []
        for i in range(x.shape[0]):
            try:
                rows.append(teacher(x[i:i + 1]))
            except Exception as e:
                errors[i] = f"teacher failed: {type(e).__name__}: {str(e)[:200]}"
                rows.append(torch.zeros(1, *teacher.spec.output_shape, device=x.device))
        return torch.cat(rows), errors

    def run_recipes(self, images: list) -> dict[str, torch.Tensor]:
        """Every teacher's recipe on this device, bit-exactly (recipes.pil_exact): decoded uint8 (h, w, 3) images,
        or rows the decode worker resized already ({task: uint8 (H, W, 3)}) -> task -> uint8 (n, H, W, 3)."""
        import warnings

        from recipes.preprocess import preprocess_on_device

        with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            rows = [img if isinstance(img, dict) else torch.as_tensor(img).to(self.device, non_blocking=True)
                    for img in images]
            out = {}
            for task, teacher in self.teachers.items():
                done = [torch.as_tensor(r[task]).to(self.device) if isinstance(r, dict) else
                        preprocess_on_device(teacher.spec, r) for r in rows]
                out[task] = (torch.stack(done) if done else torch.zeros(
                    (0, *teacher.spec.preprocess.input_size, 3), dtype=torch.uint8, device=self.device))
        return out

    def run(self, pixels: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, str]]]:
        """pixels: task -> uint8 (n, H, W, 3) numpy or tensor. Returns (task -> float32 (n, T, W) on the device,
        task -> {row: reason} for rows that are not valid)."""
        import warnings

        outs, errors = {}, {}
        for task, teacher in self.teachers.items():
            arr = pixels[task]
            if len(arr) == 0:
                outs[task], errors[task] = torch.zeros(0, *teacher.spec.output_shape, device=self.device), {}
                continue
            with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we never write them
                warnings.simplefilter("ignore", UserWarning)
                x = torch.as_tensor(arr).to(self.device, non_blocking=True)
            out, errs = self._forward(teacher, x)
            bad = (~torch.isfinite(out).flatten(1).all(dim=1)).nonzero().flatten().tolist()
            for i in bad:
                errs.setdefault(i, "non-finite values in the teacher's output")
                out[i] = 0
            outs[task], errors[task] = out, errs
        return outs, errors
