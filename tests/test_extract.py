"""extract_teachers on a real local Ray (loopback) with tiny teachers: end to end, resume, faults, added tasks;
to a local folder and to a real S3-compatible server (SeaweedFS on loopback).

Every store is compared file by file (sha256 of every tar and zarr shard file) with a single-process reference
that runs the same stages in a plain loop, without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from helpers import BATCH, SHARD, reference_store

import store
from pipeline import localray
from recipes.manifest import load_manifest
from store import Location, layout

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipeline.sample import generate

    out = tmp_path_factory.mktemp("extract_ds")
    return generate(out, num_samples=16, seed=3, bad=7, odd=7), out / "images"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, tiny_teachers):
    return reference_store(tmp_path_factory.mktemp("ref") / "store", dataset, tiny_teachers)


def args(dataset, out, manifest, *extra):
    json_path, images = dataset
    return ["--data-path", str(json_path), "--image-folder", str(images), "--output", str(out),
            "--teachers-manifest", str(manifest), "--shard-size", str(SHARD), "--batch-size", str(BATCH),
            "--torch-threads", "1", "--no-progress", *extra]


def start(argv, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.extract_teachers", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run(argv, timeout=300) -> tuple[int, str]:
    p = start(argv)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def records(url) -> dict:
    return store.read_records(Location(url))


def same_data(a, b) -> None:
    """Every data file of store `a` (any URL) equals the reference's, by the records and by the objects."""
    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb)
    loc = Location(a)
    for i in ra:
        fa, fb = ra[i].files, rb[i].files
        assert fa.keys() == fb.keys(), i
        for rel in fa:
            assert fa[rel]["sha256"] == fb[rel]["sha256"], f"shard {i}: {rel} differs from the reference"
        assert ra[i].valid == rb[i].valid and ra[i].errors == rb[i].errors
    assert not store.check_files(loc, {n: f for r in ra.values() for n, f in r.files.items()}, full=True)


def wait_for(cond, timeout=180, what="condition"):
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_end_to_end_with_bad_files_matches_the_reference(store_root, dataset, tiny_teachers, reference):
    """The local run resizes on the device (here the actor's CPU): decode workers ship decoded images and the
    actor runs the recipes after checking them against Pillow; its store equals the PIL path's reference too."""
    out = store_root("store")
    device = not out.startswith("s3://")
    rc, log = run(args(dataset, out, tiny_teachers, *(["--resize-on", "device"] if device else [])))
    assert rc == 0, log
    assert "extraction summary" in log and "4 written now" in log
    same_data(out, reference)
    s = store.Store(out)
    assert s.manifest.finished and s.manifest.progress["samples_done"] == 30
    assert s.manifest.extraction["resize_on"] == ("device" if device else "cpu")
    from PIL import features

    assert s.manifest.extraction["libjpeg_turbo"] == features.version("libjpeg_turbo")  # what the pixels depend on
    assert s.manifest.extraction["zlib"] == features.version("zlib") and s.manifest.extraction["pillow"]
    errors = [json.loads(x) for x in Location(out).read_bytes(layout.ERRORS).decode().splitlines()]
    reasons = " | ".join(e["reason"] for e in errors)
    assert len(errors) == 7 and all(e["task"] is None for e in errors)
    for what in ("not found", "undecodable image", "not an image", "empty", "escapes the image folder",
                 "text-only record", "decompression bomb"):
        assert what in reasons, what
    bad_ids = {e["id"] for e in errors}
    records = json.loads(dataset[0].read_text())
    for r in records:  # every other sample, the awkward modes included, has all three targets
        got = s.get(r["id"])
        assert all(got["valid"].values()) == (r["id"] not in bad_ids), r
    assert store.verify_store(s, full=True, progress=False)["ok"]
    rc, log = run(args(dataset, out, tiny_teachers))  # again: everything verified, nothing recomputed
    assert rc == 0 and "nothing to do" in log, log
    same_data(out, reference)


def test_resume_after_killing_the_driver(store_root, dataset, tiny_teachers, reference):
    out = store_root("store")
    p = start(args(dataset, out, tiny_teachers, "--prefetch", "1", "--max-writers", "1"), start_new_session=True)
    wait_for(lambda: len(records(out)) >= 1 or p.poll() is not None, what="a first shard")
    assert p.poll() is None, "the job finished before it could be killed"
    victims = [pid for pid in localray.descendants({p.pid}) if pid != p.pid]
    os.killpg(p.pid, signal.SIGKILL)
    for pid in victims:  # the local Ray it started, wherever its processes went
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    done_before = len(records(out))
    assert 1 <= done_before < 4
    rc, log = run(args(dataset, out, tiny_teachers))
    assert rc == 0, log
    assert f"{4 - done_before} written now, {done_before} were already done" in log
    same_data(out, reference)  # byte-identical to an uninterrupted run
    loc = Location(out)
    assert not store.orphans(loc)
    assert all(not n.rsplit("/", 1)[-1].startswith(".") for d in (layout.WDS, layout.SHARDS) for n in loc.list(d))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1, stopped afterwards without touching any other Ray on the machine."""
    state = tmp_path_factory.mktemp("ray_head")
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], state / "auth_token")  # the session's token (conftest)
    info = localray.start(state, port=free_port(), dashboard_port=free_port(), num_cpus=2)
    yield f"127.0.0.1:{info['port']}"
    localray.stop(state)


def _actor_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::TeacherActor"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_actor_killed_mid_job_is_restarted(tmp_path, dataset, tiny_teachers, reference, ray_head):
    out = tmp_path / "store"
    p = start(args(dataset, out, tiny_teachers, "--address", ray_head, "--prefetch", "1", "--max-writers", "1"))
    wait_for(lambda: _actor_pids() and len(records(out)) >= 1 or p.poll() is not None,
             what="a running actor")
    assert p.poll() is None, "the job finished before its actor could be killed"
    killed = _actor_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert len(records(out)) == 4
    same_data(out, reference)
    assert store.verify_store(store.Store(out), full=True, progress=False)["ok"]


def test_adding_a_task_later_computes_only_that_task(tmp_path, dataset, tiny_teachers, reference, ray_head):
    out = tmp_path / "store"
    rc, log = run(args(dataset, out, tiny_teachers, "--tasks", "gen,depth", "--address", ray_head))
    assert rc == 0, log
    s = store.Store(out)
    assert s.tasks == ["gen", "depth"] and s.done_shards(["seg"]) == []
    before = {i: dict(r.files) for i, r in s.records.items()}
    rc, log = run(args(dataset, out, tiny_teachers, "--tasks", "seg", "--address", ray_head))
    assert rc == 0, log
    s = store.Store(out)
    assert s.tasks == ["gen", "depth", "seg"] and s.done_shards(["gen", "depth", "seg"]) == [0, 1, 2, 3]
    for i, files in before.items():  # gen and depth files untouched: only seg was computed
        for rel, info in files.items():
            if rel.startswith(layout.ZARR):
                assert s.records[i].files[rel] == info, rel
    runs = s.manifest.runs
    assert [r["tasks"] for r in runs] == [["gen", "depth"], ["seg"]]
    same_data(out, reference)


def test_structural_problems_stop_before_any_work(tmp_path, tiny_teachers, dataset):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "1", "image": "a.jpg"}, {"image": "b.jpg"}, {"id": "1", "image": "c.jpg"},
                               "not a record"]))
    rc, log = run(args((bad, dataset[1]), tmp_path / "out", tiny_teachers), timeout=120)
    assert rc == 2
    assert "3 structural problem(s)" in log and "missing or empty 'id'" in log and "duplicate id '1'" in log \
        and "not a JSON object" in log
    assert "Started a local Ray" not in log and not (tmp_path / "out").exists()
    (tmp_path / "obj.json").write_text(json.dumps({"id": "1"}))
    rc, log = run(args((tmp_path / "obj.json", dataset[1]), tmp_path / "out", tiny_teachers), timeout=120)
    assert rc == 2 and "expected a JSON list" in log


def test_incompatible_resume_is_refused(tmp_path, dataset, tiny_teachers, reference):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    store.StoreWriter.open(out).save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    argv = args(dataset, out, tiny_teachers)
    argv[argv.index("--shard-size") + 1] = "4"
    rc, log = run(argv + ["--fidelity", "corrected", "--plan-only"], timeout=120)
    assert rc == 2
    assert "shard size is 8, this run asks 4" in log and "depth: recipe differs" in log and "fidelity" in log
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    rc, log = run(args(dataset, tmp_path / "junk", tiny_teachers, "--plan-only"), timeout=120)
    assert rc == 2 and "is not an olaf store" in log


def test_localray_stops_only_its_own_processes(tmp_path):
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], tmp_path / "auth_token")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = localray.start(tmp_path, port=free_port(), dashboard_port=free_port(), num_cpus=1)
        mine = localray._marked(info["marker"])
        assert len(mine) >= 3  # gcs, raylet, agents, ...
        assert _listen_ips(mine) == {b"127.0.0.1"}, "the head must listen on loopback, and only there"
        localray.stop(tmp_path)
        assert not [p for p in mine if localray._alive(p)]
        assert bystander.poll() is None
    finally:
        bystander.kill()


def _listen_ips(pids: list[int]) -> set[bytes]:
    """Local addresses of the TCP sockets these processes listen on (from /proc/net/tcp)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    ips = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            hexip = f[1].split(":")[0]
            ips.add(".".join(str(int(hexip[i:i + 2], 16)) for i in (6, 4, 2, 0)).encode())
    return ips


def test_actors_that_would_starve_decoding_are_refused(tmp_path, dataset, tiny_teachers):
    rc, log = run(args(dataset, tmp_path / "store", tiny_teachers, "--actors", "2", "--num-cpus", "2"), timeout=120)
    assert rc == 2, log
    assert "2 actors x 1 CPUs leave 0 of the cluster's 2 CPUs" in log and "--cpus-per-actor" in log
