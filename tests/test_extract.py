"""The extraction job as users run it (its own process) with tiny teachers: as a driver of a Ray cluster (one head
on loopback for the session) and on a local Ray it starts; end to end, an added task, resume after kill -9, a
killed actor; on a local folder and on a real S3-compatible server (SeaweedFS on loopback).

Every store is compared file by file (sha256 of every tar and Zarr shard file) with a single-process reference
that runs the same stages in a plain loop, without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from helpers import (
    EXTRACT_SHARD,
    REPO,
    call,
    extract,
    extraction_args,
    records,
    reference_store,
    same_data,
    start_extraction,
    wait_for,
)

import store
from pipeline import localray
from pipeline.extract.cli import main as extraction_main
from recipes.manifest import load_manifest
from store import Location, layout

pytestmark = pytest.mark.slow
BAD_REASONS = ("not found", "undecodable image", "not an image", "empty", "escapes the image folder",
               "text-only record", "decompression bomb")


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


def test_a_job_on_a_cluster_matches_the_reference_and_adds_a_task_later(tmp_path, extract_dataset, tiny_teachers,
                                                                         reference, ray_head):
    """gen and depth first, resized on the teachers' device (here the actor's CPU: decode workers ship decoded
    images, the actor checks its recipes against Pillow first); then seg alone, with its teacher actor killed
    mid-run (Ray restarts it and re-runs its batch), which leaves the other tasks' objects untouched; the store
    equals the one-pass PIL reference byte for byte; a third run finds nothing to do."""
    out = tmp_path / "store"
    argv = extraction_args(extract_dataset, out, tiny_teachers, "--address", ray_head, "--resize-on", "device")
    rc, log = extract([*argv, "--tasks", "gen,depth"])
    assert rc == 0, log
    assert "extraction summary" in log and "4 written now" in log
    s = store.Store(out)
    assert s.tasks == ["gen", "depth"] and s.done_shards(["seg"]) == [] and s.manifest.finished
    assert s.manifest.extraction["resize_on"] == "device" and s.manifest.progress["samples_done"] == 18
    from PIL import features

    assert s.manifest.extraction["libjpeg_turbo"] == features.version("libjpeg_turbo")  # what the pixels depend on
    assert s.manifest.extraction["zlib"] == features.version("zlib") and s.manifest.extraction["pillow"]
    from recipes.weights_files import manifest_files_sha256  # read by the actors, where the weights are

    recorded = {t: v["weights_files_sha256"] for t, v in s.teachers()["teachers"].items()}
    assert recorded == manifest_files_sha256(load_manifest(tiny_teachers), ["gen", "depth"])
    errors = [json.loads(x) for x in Location(out).read_bytes(layout.ERRORS).decode().splitlines()]
    reasons = " | ".join(e["reason"] for e in errors)
    assert len(errors) == 7 and all(e["task"] is None for e in errors)
    assert all(what in reasons for what in BAD_REASONS), reasons
    bad_ids = {e["id"] for e in errors}
    for r in json.loads(extract_dataset[0].read_text()):  # every other sample, the awkward modes too, is valid
        assert all(s.get(r["id"])["valid"].values()) == (r["id"] not in bad_ids), r
    before = {i: dict(r.files) for i, r in s.records.items()}

    p = start_extraction([*argv, "--tasks", "seg", "--prefetch", "1", "--max-writers", "1"])
    with_seg = lambda: [i for i, r in records(out).items() if "seg" in r.tasks]  # noqa: E731
    wait_for(lambda: _actor_pids() and with_seg() or p.poll() is not None, what="a running actor and a seg shard")
    assert p.poll() is None and len(with_seg()) < 4, "the job finished before its actor could be killed"
    for pid in _actor_pids():
        os.kill(pid, signal.SIGKILL)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    s = store.Store(out)
    assert s.tasks == ["gen", "depth", "seg"] and s.done_shards(["gen", "depth", "seg"]) == [0, 1, 2, 3]
    for i, files in before.items():  # gen and depth objects untouched: only seg was computed
        assert all(s.records[i].files[rel] == info for rel, info in files.items() if rel.startswith(layout.ZARR))
    assert [r["tasks"] for r in s.manifest.runs] == [["gen", "depth"], ["seg"]]
    same_data(out, reference)
    assert store.verify_store(s, full=True, progress=False)["ok"]
    rc, log = extract(argv)  # again: everything verified, nothing recomputed
    assert rc == 0 and "nothing to do" in log, log
    same_data(out, reference)


def test_resume_after_killing_the_driver(seaweedfs, extract_dataset, tiny_teachers, reference, ray_head):
    """kill -9 of the driver mid-job, writing to a bucket (Ray ends the dead driver's tasks and actors wherever they
    were): the next run removes what the interrupted writes left and finishes with the bytes of an uninterrupted
    run. (The local Ray a driver starts and stops: test_failures' SIGTERM case.)"""
    out = f"s3://{seaweedfs.bucket}/kill-{os.getpid()}/store"
    argv = extraction_args(extract_dataset, out, tiny_teachers, "--address", ray_head)
    p = start_extraction([*argv, "--prefetch", "1", "--max-writers", "1"])
    wait_for(lambda: len(records(out)) >= 1 or p.poll() is not None, what="a first shard")
    assert p.poll() is None, "the job finished before it could be killed"
    p.kill()
    p.wait()
    done_before = len(records(out))
    assert 1 <= done_before < 4
    rc, log = extract(argv)
    assert rc == 0, log
    assert f"{4 - done_before} written now, {done_before} were already done" in log
    same_data(out, reference)  # byte-identical to an uninterrupted run
    loc = Location(out)
    assert not store.orphans(loc)
    assert all(not n.rsplit("/", 1)[-1].startswith(".") for d in (layout.WDS, layout.SHARDS) for n in loc.list(d))


def test_structural_problems_stop_before_any_work(tmp_path, tiny_teachers, extract_dataset):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "1", "image": "a.jpg"}, {"image": "b.jpg"}, {"id": "1", "image": "c.jpg"},
                               "not a record"]))
    rc, log = call(extraction_main, extraction_args((bad, extract_dataset[1]), tmp_path / "out", tiny_teachers))
    assert rc == 2
    assert "3 structural problem(s)" in log and "missing or empty 'id'" in log and "duplicate id '1'" in log \
        and "not a JSON object" in log
    assert "Started a local Ray" not in log and not (tmp_path / "out").exists()
    (tmp_path / "obj.json").write_text(json.dumps({"id": "1"}))
    rc, log = call(extraction_main, extraction_args((tmp_path / "obj.json", extract_dataset[1]), tmp_path / "out",
                                                    tiny_teachers))
    assert rc == 2 and "expected a JSON list" in log


def test_incompatible_resume_is_refused(tmp_path, extract_dataset, tiny_teachers, reference):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    store.StoreWriter.open(out).save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    argv = extraction_args(extract_dataset, out, tiny_teachers)
    argv[argv.index("--shard-size") + 1] = "4"
    rc, log = call(extraction_main, argv + ["--fidelity", "corrected", "--plan-only"])
    assert rc == 2
    assert "shard size is 5, this run asks 4" in log and "depth: recipe differs" in log and "fidelity" in log
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    rc, log = call(extraction_main, extraction_args(extract_dataset, tmp_path / "junk", tiny_teachers, "--plan-only"))
    assert rc == 2 and "is not an olaf store" in log


def test_a_plan_that_says_ok_means_the_run_will_start(tmp_path, extract_dataset, tiny_teachers):
    """--plan-only refused nothing a real run refuses before its first shard: an output that cannot be written,
    weights that are not where the manifest says, a store made with other weight files. It leaves no folder."""
    from teachers.tiny import build

    teachers = tmp_path / "teachers"
    shutil.copytree(tiny_teachers.parent, teachers)
    manifest = teachers / "teachers.yaml"
    new = tmp_path / "new" / "store"
    rc, log = call(extraction_main, extraction_args(extract_dataset, new, manifest, "--plan-only"))
    assert rc == 0 and "plan OK" in log and not (tmp_path / "new").exists(), log
    (tmp_path / "afile").write_text("x")
    rc, log = call(extraction_main, extraction_args(extract_dataset, tmp_path / "afile" / "store", manifest,
                                                    "--plan-only"))
    assert rc == 2 and "cannot be written" in log and "plan OK" not in log, log
    # a store made with these weights, then other weight files under the same path
    made = reference_store(tmp_path / "made", extract_dataset, manifest, shard=EXTRACT_SHARD, teachers_yaml=True)
    rc, log = call(extraction_main, extraction_args(extract_dataset, made, manifest, "--plan-only"))
    assert rc == 0 and "can be continued" in log, log
    other = build(tmp_path / "other", seed=1)
    shutil.copytree(other.parent / "depth", teachers / "depth", dirs_exist_ok=True)
    rc, log = call(extraction_main, extraction_args(extract_dataset, made, manifest, "--plan-only"))
    assert rc == 2 and "depth: the weight files differ" in log and "plan OK" not in log, log
    shutil.rmtree(teachers / "seg")
    rc, log = call(extraction_main, extraction_args(extract_dataset, tmp_path / "s2", manifest, "--plan-only"))
    assert rc == 2 and "seg" in log and "plan OK" not in log, log


def test_a_division_of_the_cluster_that_cannot_work_is_refused(extract_dataset, tiny_teachers):
    """How the cluster is divided is a function of its resources (`ray.cluster_resources()`): actors that would
    leave no CPU to decode, or more GPUs than there are, are refused in one line naming the way out."""
    from pipeline.extract.cli import parse_args
    from pipeline.extract.resources import plan_resources
    from pipeline.extract.settings import UsageError

    manifest = load_manifest(tiny_teachers)
    s = parse_args(extraction_args(extract_dataset, "/nowhere", tiny_teachers, "--actors", "2"))
    with pytest.raises(UsageError, match=r"2 actors x 1 CPUs leave 0 of the cluster's 2 CPUs.*--cpus-per-actor"):
        plan_resources({"CPU": 2.0}, s.cluster_ask, manifest)
    s = parse_args(extraction_args(extract_dataset, "/nowhere", tiny_teachers, "--actors", "3", "--gpus-per-actor", "1"))
    with pytest.raises(UsageError, match="3 actors x 1.0 GPUs need 3 GPUs; the cluster has 2"):
        plan_resources({"CPU": 16.0, "GPU": 2.0}, s.cluster_ask, manifest)
    res = plan_resources({"CPU": 16.0, "GPU": 2.0},
                         parse_args(extraction_args(extract_dataset, "/nowhere", tiny_teachers)).cluster_ask,
                         manifest)  # the defaults on a 2-GPU node: an actor per GPU, recipes on the GPU, its dtypes
    assert (res.actors, res.device, res.resize_on, res.batch, res.max_writers) == (2, "cuda", "device", 4, 5)
    assert res.dtype == {t: manifest.teachers[t].compute_dtype for t in manifest.teachers}


# ---- `ray job submit` on a head of its own ------------------------------------------------------------------------

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


def test_ray_job_submit_uploads_only_the_allow_list_to_a_loopback_head(tmp_path):
    """pipeline.localray's head listens on loopback only; `ray job submit` of a pipeline.jobdir folder ships the
    olaf sources and nothing planted beside them (.env, keys, .git, data); stopping the head ends exactly its
    processes, not a bystander's."""
    from pipeline import jobdir

    src = tmp_path / "checkout"
    for rel in jobdir.allowed_files(REPO):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    secrets = {".env": "AWS_SECRET_ACCESS_KEY=hunter2", ".git/config": "[core]", "id_rsa": "KEY",
               "data/private.json": "[]", "pipeline/.env": "X=1", "runs/ckpt.pt": "weights"}
    for rel, text in secrets.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    job = jobdir.build(tmp_path / "job", root=src)
    shipped = {str(p.relative_to(job)) for p in job.rglob("*") if p.is_file()}
    assert shipped == {str(r) for r in jobdir.allowed_files(src)} | {jobdir.CODE_INFO, jobdir.MARK}
    assert not shipped & set(secrets) and "store/layout.py" in shipped

    state = tmp_path / "ray"
    state.mkdir()
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], state / "auth_token")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        info = localray.start(state, port=free_port(), dashboard_port=free_port(), num_cpus=1)
        mine = localray._marked(info["marker"])
        assert len(mine) >= 3  # gcs, raylet, agents, ...
        assert _listen_ips(mine) == {b"127.0.0.1"}, "the head must listen on loopback, and only there"
        code = "import os, json; print('FILES', json.dumps(sorted(os.path.relpath(os.path.join(d, f)) " \
               "for d, _, fs in os.walk('.') for f in fs)))"
        p = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(job),
                            "--", "python", "-c", code], env={**os.environ, **localray.ray_env(state)},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        seen = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("FILES")).split(" ", 1)[1])
        assert "store/layout.py" in seen and ".env" not in seen and "pipeline/.env" not in seen
        localray.stop(state)
        assert not [q for q in mine if localray._alive(q)]
        assert bystander.poll() is None
    finally:
        localray.stop(state)
        bystander.kill()


@pytest.mark.slow
def test_a_store_gaining_tasks_computes_from_its_committed_images(tmp_path, extract_dataset, tiny_teachers,
                                                                  reference, ray_head):
    """An image that changes between `--tasks none` and adding the teachers (rot, or a folder edited under the
    same name) replaced the store's committed image and its targets were computed from it. The targets come from
    the image the store holds (checked by the tar's sha256), which stays: the store equals the one-pass reference
    of the original images byte for byte."""
    json_path, images = extract_dataset
    copy = tmp_path / "data"
    shutil.copytree(images, copy / "images")
    shutil.copy(json_path, copy / json_path.name)
    good = [r for r in json.loads(json_path.read_text()) if r.get("image")
            and store.Store(reference).get(r["id"])["valid"].get("gen")]
    victim, other = copy / "images" / good[0]["image"], copy / "images" / good[1]["image"]
    out = tmp_path / "store"
    argv = extraction_args((copy / json_path.name, copy / "images"), out, tiny_teachers, "--address", ray_head)
    rc, log = extract([*argv, "--tasks", "none"])
    assert rc == 0, log
    assert victim.read_bytes() != other.read_bytes()
    victim.write_bytes(other.read_bytes())  # the folder now holds another picture under the sample's name
    rc, log = extract([*argv, "--tasks", "gen,depth,seg"])
    assert rc == 0, log
    same_data(out, reference)
    st = store.Store(out)
    assert st.decode(st.find(good[0]["id"])[1], [])["image"] == (images / good[0]["image"]).read_bytes()


def test_a_teacher_free_store_is_told_what_is_true(tmp_path, extract_dataset, tiny_teachers):
    """A store of images, captions and ids holds no target: teachers of either fidelity may join it; its runs start
    no teacher actor, so a one-CPU cluster is no reason to refuse them."""
    from pipeline.extract.cli import parse_args
    from pipeline.extract.plan import make_plan
    from pipeline.extract.resources import plan_resources

    json_path, images = extract_dataset
    plan = make_plan(json_path, images, 5)
    m = store.RunManifest(dataset=plan.source.dataset_info(), num_samples=plan.num_samples, shard_size=5,
                          formats=["zarr", "wds"], tasks={})
    store.StoreWriter.create(str(tmp_path / "free"), m, load_manifest(tiny_teachers).identity([]))
    argv = extraction_args(extract_dataset, tmp_path / "free", tiny_teachers, "--plan-only")
    rc, log = call(extraction_main, [*argv, "--tasks", "gen,depth,seg", "--fidelity", "corrected"])
    assert rc == 0 and "plan OK" in log and "fidelity" not in log, log
    res = plan_resources({"CPU": 1.0}, parse_args([*argv, "--tasks", "none", "--num-cpus", "1"]).cluster_ask,
                         load_manifest(tiny_teachers))
    assert res.actors == 0 and res.gpus_per_actor == 0 and res.max_writers >= 1
    # a store that holds targets keeps its one fidelity
    made = tmp_path / "made"
    m.tasks = {"gen": store.TaskLayout((1, 16), "fp16")}
    store.StoreWriter.create(str(made), m, load_manifest(tiny_teachers).identity(["gen"]))
    rc, log = call(extraction_main, [*extraction_args(extract_dataset, made, tiny_teachers, "--plan-only"),
                                     "--tasks", "gen", "--fidelity", "corrected"])
    assert rc == 2 and "fidelity original" in log, log


def test_a_first_run_that_commits_no_shard_ends_with_its_summary_and_exit_1(tmp_path, extract_dataset, capsys):
    """Its output on a disk that fills: every shard failed, and the run ended in KeyError: 'id_length' while building
    the sample index. It ends as any run with failed shards does: the summary names them, exit status 1."""
    import time
    from types import SimpleNamespace

    from pipeline.extract.plan import make_plan
    from pipeline.extract.run import finish

    plan = make_plan(extract_dataset[0], extract_dataset[1], 5)
    m = store.RunManifest(dataset=plan.source.dataset_info(), num_samples=plan.num_samples, shard_size=5,
                          formats=["zarr", "wds"], tasks={}, runs=[{"started": "now", "tasks": []}])
    w = store.StoreWriter.create(str(tmp_path / "store"), m, {"format": 1, "name": "none", "teachers": {}})
    failed = {i: "OSError: [Errno 28] No space left on device" for i in range(plan.num_shards)}
    sched = SimpleNamespace(done={}, failed=failed, by_others=set())
    rc = finish(w, plan, dict.fromkeys(range(plan.num_shards), ()), sched, [], time.time(), 1.0)
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED shards: 0: OSError" in out and "0 of 4 done in the store" in out, out
    assert store.load_index(w.loc)[0] is not None and not w.manifest.finished
