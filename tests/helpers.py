"""Helpers the test modules share: the single-process reference store, running the commands (extraction as a
process, as users run it; the trainer and the inspector in this process, where no signal is involved), and
comparing stores."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import store
from pipeline.extract.compute import assemble_shard, compute_shard
from pipeline.extract.plan import make_plan
from recipes.manifest import load_manifest
from recipes.weights_files import manifest_files_sha256

REPO = Path(__file__).resolve().parents[1]
SHARD, BATCH = 8, 4
EXTRACT_SHARD = 5  # the extraction dataset's 18 records: 4 shards (5, 5, 5, 3)
TRAINED_STEPS = 8  # the session's PT run (conftest `trained`)
# The teacher identity of stores whose targets are synthetic (store-layer tests): every store names its teachers.
SYNTHETIC_TEACHERS = {"format": 1, "name": "synthetic", "teachers": {}}


def reference_store(path: Path, dataset, manifest_path: Path, tasks=("gen", "depth", "seg"), shard: int = SHARD,
                    teachers_yaml: bool = False) -> Path:
    """The straightforward way: one process, shard after shard, batch after batch."""
    from teachers.registry import TeacherSet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's actors (--torch-threads 1): the same kernels, the same bytes
    try:
        json_path, images = dataset
        plan = make_plan(json_path, images, shard)
        manifest = load_manifest(manifest_path)
        teachers = TeacherSet.load(manifest, tasks)
        layouts = {t: store.TaskLayout.for_shape(manifest.teachers[t].output_shape, "fp16") for t in tasks}
        m = store.RunManifest(dataset=plan.dataset_info(), num_samples=plan.num_samples, shard_size=shard,
                              formats=["zarr", "wds"], tasks=layouts)
        # teachers.yaml as the Ray job records it; the extraction tests compare data files only
        identity = manifest.identity(list(tasks), teachers.weights_sha256(),
                                     files_sha256=manifest_files_sha256(manifest, tasks)) if teachers_yaml else None
        w = store.StoreWriter.create(path, m, identity)
        specs = [manifest.teachers[t] for t in tasks]
        for i in range(plan.num_shards):
            metas, targets = compute_shard(plan.shard_records(i), str(images), specs, teachers,
                                           dict.fromkeys(tasks, "fp16"), BATCH)
            w.commit_shard(assemble_shard(m, i, tuple(tasks), metas, targets))
        return path
    finally:
        torch.set_num_threads(threads)


# ---- commands -----------------------------------------------------------------------------------------------------

def call(main, argv) -> tuple[int, str]:
    """A command's `main(argv)` in this process: (exit status, everything it printed). Signal handlers it sets
    are put back."""
    out = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    return rc, out.getvalue()


def trainer_args(store_path, models_cfg, teachers_yaml, out, *extra) -> list[str]:
    return ["--store", str(store_path), "--config", str(models_cfg), "--teachers-manifest", str(teachers_yaml),
            "--output-dir", str(out), *extra]


def kill_trainer_after(argv: list[str], out: Path, step: int) -> None:
    """`python -m trainer.pt ARGV` in its own process group, killed with SIGKILL once checkpoint `step` exists
    (a run that finishes first fails the test: it could not be killed mid-way)."""
    p = subprocess.Popen([sys.executable, "-m", "trainer.pt", *argv], cwd=REPO, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (out / "checkpoints" / f"step-{step:06d}").exists() or p.poll() is not None, what=f"step {step}")
    assert p.poll() is None, "the run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def env(**extra) -> dict[str, str]:
    """This process's environment for a child: no torchrun variables, no RAY_ADDRESS, and this process's torch
    threads (a run continued here after a child's gives the same numbers)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")
    own = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return {k: v for k, v in os.environ.items() if k not in drop} | own | extra


def extraction_args(dataset, out, manifest, *extra) -> list[str]:
    json_path, images = dataset
    return ["--data-path", str(json_path), "--image-folder", str(images), "--output", str(out),
            "--teachers-manifest", str(manifest), "--shard-size", str(EXTRACT_SHARD), "--batch-size", str(BATCH),
            "--torch-threads", "1", "--no-progress", *extra]


def start_extraction(argv, **kw) -> subprocess.Popen:
    """The extraction as users run it: its own process (with `--address`: a driver of that Ray; without: on a
    local Ray it starts and stops)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.extract_teachers", *argv], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def extract(argv, timeout=300) -> tuple[int, str]:
    p = start_extraction(argv)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def records(url) -> dict:
    return store.read_records(store.Location(url))


def same_data(a, b) -> None:
    """Every data file of store `a` (any URL) equals the reference's, by the records and by the objects."""
    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb)
    for i in ra:
        fa, fb = ra[i].files, rb[i].files
        assert fa.keys() == fb.keys(), i
        for rel in fa:
            assert fa[rel]["sha256"] == fb[rel]["sha256"], f"shard {i}: {rel} differs from the reference"
        assert ra[i].valid == rb[i].valid and ra[i].errors == rb[i].errors
    every = {n: f for r in ra.values() for n, f in r.files.items()}
    assert not store.check_files(store.Location(a), every, full=True)


def wait_for(cond, timeout=180, what="condition"):
    """Poll `cond` until it holds (events, not durations: the timeout only stops a hung test)."""
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def one_error_line(log: str) -> str:
    """The run printed exactly one `error:` line and no traceback: return it."""
    assert "Traceback" not in log, log
    lines = [ln for ln in log.splitlines() if ln.startswith("error:") or ": error:" in ln]
    assert len(lines) == 1, log
    return lines[0]
