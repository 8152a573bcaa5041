"""Every benchmark command docs/benchmarks.md documents runs here at a tiny size and prints its table: a
documented command that no longer runs (`extract --shape-true` raised a TypeError for a release, `probe` indexed
a dataclass) fails the suite. The figures themselves are not asserted: they are timings. (The GPU proof has its own
module, tests/test_gpu_proof.py.)"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from helpers import REPO, env

pytestmark = pytest.mark.slow


def bench(module: str, *argv: str, timeout: int = 600) -> str:
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *argv], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout


def rows(out: str) -> set[str]:
    """The first column of every table line."""
    return {line.split("  ")[0].strip() for line in out.splitlines()}


def test_the_data_path_at_real_sizes(tmp_path):
    out = bench("extract", "--shape-true", "--samples", "4", "--shard-size", "2", "--work-dir", str(tmp_path))
    for stage in ("decode (JPEG -> RGB)", "write zarr (local disk)", "write wds (local disk)", "verify wds (sha256)",
                  "end to end, --resize-on device"):
        assert stage in rows(out), out
    targets = (1 * 1024 + 576 * 1024 + 576 * 1536) * 2  # the three real target shapes in fp16
    assert f"bytes per sample: zarr {targets / 1e6:.2f} MB" in out, out


def test_the_extraction_naive_loop_against_the_ray_job(tmp_path):
    out = bench("extract", "--samples", "8", "--actors", "1", "--naive-samples", "2", "--work-dir", str(tmp_path))
    assert {"naive", "ray x1"} <= rows(out) and "vs naive" in out, out


def test_the_teachers_forward(tmp_path):
    out = bench("teacher_speed", "--sizes", "tiny", "--images", "2", "--repeats", "1")
    assert all(t in out for t in ("gen", "depth", "seg")), out


def test_stores_on_a_bucket(tmp_path, seaweedfs):
    prefix = f"s3://{seaweedfs.bucket}/bench-{uuid.uuid4().hex[:8]}"
    out = bench("bucket", "--samples", "8", "--shard-size", "4", "--dir", str(tmp_path / "local"), "--s3-url", prefix)
    assert "local" in out and "s3" in out, out


def test_resume_and_the_loader(tmp_path):
    out = bench("loader", "--samples", "16", "--shard-size", "8", "--micro-batch", "4", "--workers", "1",
                "--backends", "local", "--dir", str(tmp_path))
    assert "local" in out, out


def test_fp8_targets_in_pt(tmp_path):
    out = bench("fp8_targets", "--samples", "8", "--steps", "2", "--work-dir", str(tmp_path))
    assert "fp8" in out and "fp16" in out, out


def test_a_pt_step(tmp_path):
    out = bench("pt_step", "--size", "tiny", "--steps", "1", "--samples", "16", "--micro-batch", "2", "--workers", "1",
                "--work-dir", str(tmp_path))
    assert {"teachers inside the step", "targets from the store", "loader alone"} <= rows(out), out


def test_vlora_s_step_beside_ola_vlm_s():
    out = bench("vlora_step", "--size", "tiny", "--repeats", "1")
    for mode in ("LLaVA-1.5 PT (projector, NTP)", "OLA-VLM PT", "VLoRA PT", "VLoRA + OLA-VLM losses"):
        assert mode in out, out


def test_probing_one_pass_against_one_job_per_task():
    out = bench("probing", "--samples", "16", "--batches", "1", "--micro-batch", "4")
    assert "olaf: stored targets, all tasks, one pass" in out and "authors: the three jobs" in out, out


def test_olaf_at_scale(tmp_path):
    out = bench("scale", "--sizes", "3000,6000", "--ranks", "1", "--workers", "1", "--work-dir", str(tmp_path))
    for figure in ("plan (JSON whole / JSONL streamed), s", "index: bytes per sample on disk",
                   "start-up to the first batch, s", "node memory for the store, bytes per sample",
                   "resume near the end of epoch 2, s", "inspect summary (every record), s"):
        assert sum(figure in line for line in out.splitlines()) == 2, (figure, out)  # a line for each size


def test_the_trained_state_per_rank_under_ddp_and_fsdp():
    out = bench("sharding", "--vlora-dim", "64", "--vlora-depth", "1", "--vlora-rank", "4")
    assert {"none (DDP)", "fsdp (FSDP2)"} <= rows(out) and "2,027,531,264 trained parameters" in out, out


def test_per_task_reads_on_disk_and_s3():
    out = bench("task_reads", "--samples", "16", "--shard", "8", "--micro", "4")
    assert "local    gen " in out and "s3       gen " in out, out
