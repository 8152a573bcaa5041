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
from support.reference import BATCH, reference_store  # noqa: F401  (the suite's reference store, re-exported)

REPO = Path(__file__).resolve().parents[1]
SHARD = 8
EXTRACT_SHARD = 5  # the extraction dataset's 18 records: 4 shards (5, 5, 5, 3)
TRAINED_STEPS = 8  # the session's PT run (conftest `trained`)
# The teacher identity of stores whose targets are synthetic (store-layer tests): every store names its teachers.
SYNTHETIC_TEACHERS = {"format": 1, "name": "synthetic", "teachers": {}}


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


def export_on_a_full_disk(run_dir, fmt: str, out, limit: int) -> subprocess.CompletedProcess:
    """`python -m trainer.export RUN --format FMT --out OUT` whose process may write files of at most `limit` bytes
    (RLIMIT_FSIZE, SIGXFSZ ignored): the disk refuses the write as a full one would (ENOSPC's failure)."""
    code = ("import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "n = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
            "sys.argv = ['trainer.export'] + sys.argv[1:]; runpy.run_module('trainer.export', run_name='__main__')")
    return subprocess.run([sys.executable, "-B", "-c", code, str(limit), str(run_dir), "--format", fmt, "--out",
                           str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


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
