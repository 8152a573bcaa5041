"""Many nodes, on loopback: a Ray cluster of two nodes whose worker node is killed (-9) in the middle of the
extraction, and a trainer on two torchrun nodes, one killed, resumed on the other. The slow tier."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from helpers import (
    REPO,
    call,
    env,
    extraction_args,
    processes_mentioning,
    same_data,
    start_extraction,
    trainer_args,
    wait_for,
)

import store
from pipeline import inspect
from pipeline.localray import descendants

pytestmark = pytest.mark.slow


def _ray_tasks_under(pid: int) -> list[int]:
    """Ray worker processes below a raylet that are running a task or an actor of the job (setproctitle names
    them `ray::<function or class>`)."""
    out = []
    for p in descendants({pid}):
        try:
            title = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith((b"ray::decode_task", b"ray::write_task", b"ray::TeacherActor", b"ray::verify_task")):
            out.append(p)
    return out


def test_a_worker_node_killed_mid_job_loses_nothing(tmp_path, extract_dataset, tiny_teachers, reference):
    """A head and a second node joined to it (ray.cluster_utils.Cluster: two raylets on 127.0.0.1). Once the
    second node runs the job's work, its raylet and everything under it get SIGKILL: the job says so in a line,
    finishes on the head, every good sample stored exactly once, `verify --full` clean."""
    from ray.cluster_utils import Cluster

    # the GCS checks its nodes every half second (Ray's default takes ~15 s to call a node dead: longer than this
    # tiny job runs after the kill)
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2, "health_check_timeout_ms": 500}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "_system_config": health})
    try:
        second = cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        raylet = second.all_processes["raylet"][0].process.pid
        out = tmp_path / "store"
        argv = extraction_args(extract_dataset, out, tiny_teachers, "--address", cluster.address, "--decode-cpus", "1",
                               "--prefetch", "4")
        p = start_extraction(argv)
        wait_for(lambda: _ray_tasks_under(raylet) or p.poll() is not None, timeout=240, what="work on the second node")
        assert p.poll() is None, p.communicate()[0]
        doomed = descendants({raylet})
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)  # the node is gone at once: no goodbye to the GCS
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
        said = [line for line in log.splitlines() if "left the cluster" in line]
        assert len(said) == 1 and "Traceback" not in log, log
        same_data(str(out), reference)  # every good sample, exactly once, the reference's bytes
        rec = store.read_records(store.Location(str(out)))
        ids = [i for r in rec.values() for i in r.ids]
        assert len(ids) == len(set(ids)) == sum(r.count for r in reference_records(reference).values())
        rc, verified = call(inspect.main, [out, "verify", "--full"])
        assert rc == 0, verified
    finally:
        cluster.shutdown()


def reference_records(path) -> dict:
    return store.read_records(store.Location(str(path)))


def test_a_trainer_on_two_nodes_killed_on_one_resumes_on_the_other(tmp_path, trainer_store, tiny_models, tiny_teachers):
    """`torchrun --nnodes 2` on 127.0.0.1 (two agents, one process each, gloo), node 1 killed with SIGKILL after
    the step-2 checkpoint: node 0 stops too (its peer is gone), and `--resume` on one node gives the losses and
    samples of an uninterrupted run."""
    from trainer.pt import run as trainer

    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = free_port()

    def argv(out):
        return trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "4",
                            "--set", "global_batch_size=8", "--set", "num_workers=1", "--set", "save_every=2")

    out = tmp_path / "out"
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "trainer.pt",
                               *argv(out)], cwd=REPO, env=env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for k in range(2)]
    wait_for(lambda: (out / "checkpoints" / "step-000002").exists() or any(n.poll() is not None for n in nodes),
             what="step 2")
    assert all(n.poll() is None for n in nodes), "a node ended before it could be killed"
    os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1 gone: its agent and its rank
    nodes[1].wait()
    t0 = time.monotonic()
    survivor, _ = nodes[0].communicate(timeout=600)
    assert nodes[0].returncode != 0 and time.monotonic() - t0 < 600, survivor
    assert not processes_mentioning(str(out))  # nothing of the run is left behind
    ref = tmp_path / "ref"
    rc, log = call(trainer, argv(ref))
    assert rc == 0, log
    rc, log = call(trainer, argv(out) + ["--resume"])
    assert rc == 0 and "resumed from" in log, log
    rows = lambda d: [json.loads(x) for x in (d / "logs" / "train.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(ref), rows(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
    ids = lambda d: [json.loads(x)["ids"] for x in (d / "logs" / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert ids(out) == ids(ref)
