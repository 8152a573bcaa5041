"""Part `pipeline`: the extraction's Ray job end to end, as a user runs it; stopped at its time, its partial
progress still read."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from benchmarks import extract
from benchmarks.gpu_proof.machine import CoreSampler
from benchmarks.gpu_proof.runner import OverBudget, Proof
from benchmarks.gpu_proof.setup import Setup

REPO = Path(__file__).resolve().parents[2]


def part_pipeline(proof: Proof, s: Setup) -> None:
    """`python -m pipeline.extract_teachers` on a local Ray, as a user runs it, on generated JPEGs."""
    import importlib.util

    from pipeline.sample import generate

    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("the Ray job needs ray: pip install 'ray[default,data]' (olaf's own requirement)")
    proof.check("generating the dataset")
    data = s.work / "job-data"
    json_path = generate(data, s.job_images, seed=0)
    proof.put("images", s.job_images)
    proof.check("saving the teachers")
    if s.tiny:
        from teachers.tiny import build

        manifest = build(s.work / "job-teachers")
    else:
        manifest = extract.full_size_teachers(s.work / "job-teachers", torch.bfloat16)
    batch = 8 if s.tiny else 64
    cmd = extract.job_command(json_path, data / "images", s.work / "job-store", manifest, batch)
    if s.tiny:  # two cores: the actor and the decoders share them
        cmd += ["--torch-threads", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5", "--resize-on", "cpu"]
    if s.ray_address:
        cmd += ["--address", s.ray_address]
    proof.check("the Ray job")
    proof.put("command", " ".join(cmd[1:]))
    result, cores = run_job(cmd, max(5.0, proof.left()))
    progress = job_progress(s.work / "job-store")
    rate = progress.get("samples_per_s")
    decode_ms = progress.get("decode_cpu_ms_per_sample")
    proof.put("job", {**result, "progress": progress, "img_s": rate, "actor_busy": progress.get("actor_busy_fraction"),
                      "decode_cpu_ms_per_sample": decode_ms,
                      "decode_cores": round(rate * decode_ms / 1e3, 2) if rate and decode_ms else None,
                      "node_cores_busy": cores})
    if result["timed_out"]:
        raise OverBudget("the rest of the Ray job (it was stopped; the figures are from what it finished)")
    if result["returncode"] != 0:
        raise RuntimeError(f"the job exited {result['returncode']}: {result['tail'][-800:]}")


def run_job(cmd: list[str], timeout: float, grace_s: float = 30.0) -> tuple[dict, dict]:
    """Run the job; SIGTERM at `timeout` (it commits what it finished), SIGKILL `grace_s` later. Returns what it did
    and the node's busy CPU cores, sampled each second from /proc/stat."""
    from pipeline.localray import LOOPBACK_ENV

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV | {
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # the cluster is the command's --address, or its own
    sampler = CoreSampler()
    t0 = time.perf_counter()
    with sampler, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True) as p:
        timed_out = False
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGTERM)
            try:
                out, _ = p.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
        finally:  # the alarm or a signal came first: the job must not outlive this part (Popen's exit waits for it)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return ({"returncode": p.returncode, "timed_out": timed_out, "wall_s": round(time.perf_counter() - t0, 1),
             "tail": out[-3000:]}, sampler.summary())


def job_progress(path: Path) -> dict:
    """The progress the job kept in its store's manifest (samples/s, decode CPU, actor busy fraction)."""
    import store

    try:
        return dict(store.Store(str(path)).manifest.progress)
    except Exception as e:  # no store: the job failed before it made one
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
