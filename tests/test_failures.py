"""Hard failures a cluster user hits, each kept as a case: a hang, silent zeros, code execution on resume, secrets
in the job upload, SIGTERM, unstorable ids, two jobs on one output, and one clear message where a traceback was.
Tiny stores and models, real Ray, real processes and signals; every case asserts the exit status, the one-line
message, and that no good sample was lost."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from helpers import reference_store
from test_extract import args, dataset, records, reference, run, same_data, start, wait_for  # noqa: F401
from test_store import N, create, make_result

import store
from pipeline import inspect, localray
from recipes.manifest import load_manifest
from store import Location, layout

REPO = Path(__file__).resolve().parents[1]


def trainer(argv, timeout=300, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.run([sys.executable, "-m", "trainer.pt", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def targs(store_path, models, teachers, out, *extra):
    return ["--store", str(store_path), "--config", str(models), "--teachers-manifest", str(teachers),
            "--output-dir", str(out), *extra]


def one_error_line(log: str) -> str:
    """The run printed exactly one `error:` line and no traceback: return it."""
    assert "Traceback" not in log, log
    lines = [ln for ln in log.splitlines() if ln.startswith("error:") or ": error:" in ln]
    assert len(lines) == 1, log
    return lines[0]


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


# ---- 1. no usable sample: a clear end, never a hang; workers die with their parent ------------------------------

def test_a_store_without_usable_images_is_refused(tmp_path, tiny_models, tiny_teachers):
    from pipeline.sample import generate

    json_path = generate(tmp_path / "ds", num_samples=0, bad=5, seed=2)
    path = reference_store(tmp_path / "store", (json_path, tmp_path / "ds" / "images"), tiny_teachers,
                           teachers_yaml=True)
    rc, log = trainer(targs(path, tiny_models, tiny_teachers, tmp_path / "out"), timeout=120)
    assert rc == 2 and "none of its 5 samples in done shards has a usable image" in one_error_line(log)


def undecodable_store(path: Path, tiny_teachers) -> Path:
    """A store whose records say every image was fine, with image bytes the trainer cannot decode."""
    manifest = load_manifest(tiny_teachers)
    tasks = ("gen", "depth", "seg")
    m = store.RunManifest(dataset={"json": "x", "sha256": "0" * 64}, num_samples=8, shard_size=8, formats=["wds"],
                          tasks={t: store.TaskLayout.for_shape(manifest.teachers[t].output_shape, "fp16") for t in tasks})
    w = store.StoreWriter.create(path, m, manifest.identity(list(tasks)))
    rec = {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]}
    samples = [store.SampleResult(j, f"{j:09d}", {"id": f"{j:09d}", **rec}, f"x/{j}.jpg", b"\xff\xd8 not a jpeg")
               for j in range(8)]
    shapes = {t: manifest.teachers[t].output_shape for t in tasks}
    w.commit_shard(store.ShardResult(0, tasks, samples, {t: np.zeros((8, *s), np.float16) for t, s in shapes.items()},
                                     dict.fromkeys(tasks), {t: np.ones(8, bool) for t in tasks}))
    return path


def test_a_stream_that_yields_nothing_ends_with_an_error_not_a_hang(tmp_path, tiny_models, tiny_teachers):
    path = undecodable_store(tmp_path / "store", tiny_teachers)
    out = tmp_path / "out-undecodable"
    rc, log = trainer(targs(path, tiny_models, tiny_teachers, out), timeout=180)
    assert rc == 2 and "none of this process's 4 samples has an image the trainer can use" in one_error_line(log)
    time.sleep(1)
    assert processes_mentioning(str(out)) == []  # no DataLoader worker left spinning


def test_sigterm_to_the_trainer_takes_its_workers_along(tmp_path, trainer_store, tiny_models, tiny_teachers):
    out = tmp_path / "out-sigterm"
    argv = targs(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "500", "--set", "num_workers=2")
    p = subprocess.Popen([sys.executable, "-m", "trainer.pt", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(lambda: len(processes_mentioning(str(out))) >= 3 or p.poll() is not None, what="the 2 workers")
    assert p.poll() is None  # the trainer and its 2 workers run
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    wait_for(lambda: processes_mentioning(str(out)) == [], timeout=10, what="the workers to exit")


# ---- 2. a missing Zarr chunk is never read as zeros -----------------------------------------------------------

def test_a_missing_zarr_chunk_is_named_not_read_as_zeros(tmp_path, capsys):
    url = str(tmp_path / "store")
    w = create(url)
    loc = Location(url)
    for i in range(w.manifest.num_shards):
        w.commit_shard(make_result(w.manifest, i))
    gone = "targets.zarr/depth/c/1/0/0"
    assert gone in store.Store(url).records[1].files
    loc.remove(gone)
    with pytest.raises(store.StoreError, match=f"shard 1: {gone} is missing"):
        store.Store(url).get(f"{4:09d}", ["depth"])
    assert store.Store(url).get(f"{0:09d}", ["depth"])["valid"]["depth"]  # shard 0 is still fine
    for cmd in (["stats"], ["show", f"{4:09d}"]):
        assert inspect.main([url, *cmd]) == 2, cmd
        err = capsys.readouterr().err
        assert f"{gone} is missing" in one_error_line(err)


# ---- 3. --resume never runs code from the checkpoint folder ----------------------------------------------------

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_crafted_checkpoint_without_running_it(tmp_path, trainer_store, tiny_models, tiny_teachers):
    out = tmp_path / "out"
    rc, log = trainer(targs(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "2"))
    assert rc == 0, log
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "PWNED"
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(str(marker))}))
    rc, log = trainer(targs(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "4", "--resume"))
    assert rc == 2 and "optimizer.pt holds more than tensors and plain values, refused" in one_error_line(log)
    assert not marker.exists()


# ---- 4. the job upload is an allow-list ------------------------------------------------------------------------

def test_the_job_upload_holds_only_the_allow_list(tmp_path):
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
    assert shipped == {str(r) for r in jobdir.allowed_files(src)} | {jobdir.CODE_INFO}
    assert not shipped & set(secrets) and "store/layout.py" in shipped

    # and through a real `ray job submit`: the job sees the code, not the planted .env
    state = tmp_path / "ray"
    state.mkdir()
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], state / "auth_token")
    localray.start(state, port=free_port(), dashboard_port=free_port(), num_cpus=1)
    try:
        env = {**os.environ, **localray.ray_env(state)}
        code = "import os, json; print('FILES', json.dumps(sorted(os.path.relpath(os.path.join(d, f)) " \
               "for d, _, fs in os.walk('.') for f in fs)))"
        p = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(job),
                            "--", "python", "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        seen = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("FILES")).split(" ", 1)[1])
        assert "store/layout.py" in seen and ".env" not in seen and "pipeline/.env" not in seen
    finally:
        localray.stop(state)


# ---- 5. SIGTERM to the extraction driver ---------------------------------------------------------------------

def test_sigterm_stops_extraction_like_ctrl_c(tmp_path, dataset, tiny_teachers, reference):  # noqa: F811
    out = tmp_path / "store"
    p = start(args(dataset, out, tiny_teachers, "--prefetch", "1", "--max-writers", "1"))
    wait_for(lambda: len(records(out)) >= 1 or p.poll() is not None, what="a first shard")
    assert p.poll() is None, "the job finished before it could be stopped"
    ray_pids = [pid for pid in localray.descendants({p.pid}) if pid != p.pid]
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 143, log
    assert "SIGTERM: stopped; committed shards are safe" in log and "Fatal Python error" not in log
    done = records(out)
    assert 1 <= len(done) < 4 and not store.check_files(Location(out), {n: f for r in done.values()
                                                                        for n, f in r.files.items()})
    wait_for(lambda: not [q for q in ray_pids if localray._alive(q)], timeout=30, what="its Ray to stop")
    rc, log = run(args(dataset, out, tiny_teachers))
    assert rc == 0 and f"{4 - len(done)} written now" in log, log
    same_data(out, reference)


# ---- 6. an id the writer could not store is refused up front -------------------------------------------------

def test_an_unstorable_id_is_rejected_before_any_work(tmp_path, dataset, tiny_teachers):  # noqa: F811
    recs = json.loads(dataset[0].read_text())
    recs[3]["id"] = "bad\ud800id"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))  # ensure_ascii: the lone surrogate is written as \ud800
    rc, log = run(args((bad, dataset[1]), tmp_path / "out", tiny_teachers), timeout=120)
    assert rc == 2 and "record 3: id 'bad\\ud800id' is not valid Unicode text" in log and "Traceback" not in log
    assert not (tmp_path / "out").exists()


# ---- 7. one clear message ---------------------------------------------------------------------------------------

def test_an_output_that_cannot_be_written_is_found_before_the_teachers_load(tmp_path, dataset, tiny_teachers,  # noqa: F811
                                                                            seaweedfs):
    (tmp_path / "afile").write_text("x")
    rc, log = run(args(dataset, tmp_path / "afile" / "store", tiny_teachers), timeout=120)
    assert rc == 2 and "cannot be written (Not a directory)" in one_error_line(log)
    assert "Started a local Ray" not in log
    # a bucket this identity may read but not write
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | seaweedfs.read_only_env
    q = subprocess.run([sys.executable, "-m", "pipeline.extract_teachers",
                        *args(dataset, f"s3://{seaweedfs.bucket}/read-only/store", tiny_teachers)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 2 and "cannot be written" in one_error_line(q.stdout + q.stderr), q.stdout + q.stderr


def test_damaged_shard_records_are_redone(tmp_path, dataset, tiny_teachers, reference, capsys):  # noqa: F811
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    loc = Location(out)
    store.StoreWriter.open(out).save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    loc.write_bytes(layout.record_name(1), b'["not", "an object"]')
    d = json.loads(loc.read_bytes(layout.record_name(2)))
    d["files"] = {}  # a record without files once counted as done forever
    loc.write_bytes(layout.record_name(2), json.dumps(d).encode())
    assert inspect.main([str(out), "summary"]) == 0
    said = capsys.readouterr().out
    assert "shard 1: damaged record" in said and "shard 2: damaged record" in said and "lists no files" in said
    rc, log = run(args(dataset, out, tiny_teachers))
    assert rc == 0 and "2 written now, 2 were already done" in log, log
    same_data(out, reference)


def test_an_unparsable_teachers_yaml_is_one_message(tmp_path, trainer_store, tiny_models, tiny_teachers, capsys):
    path = tmp_path / "store"
    shutil.copytree(trainer_store, path)
    (path / layout.TEACHERS).write_text("teachers: [unclosed\n  - {")
    rc, log = trainer(targs(path, tiny_models, tiny_teachers, tmp_path / "out"), timeout=120)
    assert rc == 2 and "teachers.yaml is damaged (not YAML" in one_error_line(log)
    assert inspect.main([str(path), "summary"]) == 2
    assert "teachers.yaml is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--set", "layers=3"], "layers must be a mapping"),
    (["--set", "micro_batch_size=0"], "micro_batch_size must be >= 1, got 0"),
    (["--set", "learning_rate=-1e-3"], "learning_rate must be > 0"),
    (["--set", "num_workers=-1"], "num_workers must be >= 0"),
    (["--set", "tasks=gen,normals"], "tasks ['normals'] unknown"),
    (["--max-steps", "-5"], "max_steps must be >= 1"),
])
def test_bad_trainer_settings_are_one_message(tmp_path, trainer_store, tiny_models, tiny_teachers, extra, message):
    rc, log = trainer(targs(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", *extra), timeout=60)
    assert rc == 2 and "bad trainer config" in log and message in log, log
    assert "Traceback" not in log and not (tmp_path / "out").exists()


def test_tasks_given_as_a_word_are_a_list():
    from trainer.config import load_config

    assert load_config([], {"store": "s", "output_dir": "o"}, ["tasks=gen"]).tasks == ["gen"]


@pytest.mark.parametrize("which", ["missing path", "uncached id"])
def test_a_model_that_is_not_there_is_one_message(tmp_path, trainer_store, tiny_models, tiny_teachers, which):
    llm = str(tmp_path / "no-such-llm") if which == "missing path" else "someone/not-in-the-cache-llm"
    rc, log = trainer(targs(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", "--llm", llm),
                      env_extra={"HF_HUB_OFFLINE": "1"}, timeout=120)
    line = one_error_line(log)
    assert rc == 2 and f"cannot load the LLM tokenizer {llm!r}" in line
    assert ("does not exist" if which == "missing path" else "HF_HUB_OFFLINE is set") in line


def test_conversations_that_cannot_be_tokenised_are_bad_samples(tmp_path, tiny_teachers, dataset, tiny_models):  # noqa: F811
    from pipeline.extract.decode import decode_batch
    from pipeline.llava import load_records

    recs = json.loads(dataset[0].read_text())
    good = [r for r in recs if r.get("image") and (dataset[1] / r["image"]).is_file()][:3]
    odd = [dict(good[0], id="turn-not-object", conversations=["a string"]),
           dict(good[1], id="value-not-string", conversations=[{"from": "gpt", "value": 7}])]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(good[2:] + odd))
    records, _ = load_records(path)
    spec = load_manifest(tiny_teachers).teachers["gen"]
    b = decode_batch(records, str(dataset[1]), [spec])
    errors = {s.id: s.error for s in b.samples}
    assert errors[good[2]["id"]] is None and b.ids == [good[2]["id"]]  # the good neighbour keeps its target
    assert "conversations[0] is not an object" in errors["turn-not-object"]
    assert "conversations[0].value is not a string" in errors["value-not-string"]
    # and the trainer's tokenisation does not crash on them either (should one reach it)
    import yaml
    from transformers import AutoTokenizer

    from trainer.templates import PromptBuilder, get_template

    cfg = yaml.safe_load(tiny_models.read_text())
    tok = AutoTokenizer.from_pretrained(cfg["llm"])
    pb = PromptBuilder(tok, get_template(cfg["chat_template"]), max_text_tokens=64)
    assert pb(odd[0]).text_labels and pb(odd[1]).text_ids


# ---- 8. also ----------------------------------------------------------------------------------------------------

def test_a_huge_caption_is_cut_before_tokenising(tiny_models):
    import yaml
    from transformers import AutoTokenizer

    from trainer.templates import MAX_CHARS_PER_TOKEN, PromptBuilder, get_template

    cfg = yaml.safe_load(tiny_models.read_text())
    tok = AutoTokenizer.from_pretrained(cfg["llm"])
    seen = []

    class Spy:  # the real tokenizer, recording how much text it is handed
        bos_token_id = tok.bos_token_id

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

    pb = PromptBuilder(Spy(), get_template(cfg["chat_template"]), max_text_tokens=100)
    caption = "a red square above a blue circle " * (50_000_000 // 33)  # 50 MB
    out = pb({"conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]})
    assert len(out.text_ids) == len(out.text_labels) == 100
    assert max(seen) <= MAX_CHARS_PER_TOKEN * 100 + 64
    full = tok(caption[:20_000], add_special_tokens=False)["input_ids"]  # what fits is what the untruncated text gives
    assert [i for i in out.text_labels if i >= 0][:50] == full[:50]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_lease_keeps_a_second_job_off_a_shard(tmp_path, backend, request):
    """Time is the test's: the leases read a clock it moves, never the wall clock."""
    url = str(tmp_path / "s") if backend == "local" else f"s3://{request.getfixturevalue('seaweedfs').bucket}/lease-{time.time_ns()}"
    loc = Location(url)
    loc.makedirs()
    now = [1000.0]
    a, b = (store.Leases(loc, owner, ttl=60, clock=lambda: now[0]) for owner in ("job-a", "job-b"))
    assert a.take(3) and a.take(3)  # its own: still held
    assert not b.take(3) and b.holder(3)["owner"] == "job-a"
    b.release(3)  # not b's to release
    assert b.holder(3)["owner"] == "job-a"
    now[0] += 59.0  # a second before it lapses: still a's
    assert not b.take(3)
    now[0] += 2.0  # lapsed: b breaks it and takes the shard
    assert b.holder(3) is None and b.take(3) and b.holder(3)["owner"] == "job-b"
    b.release(3)
    assert not loc.exists(layout.lease_name(3)) and store.orphans(loc, leases=b) == [] and b.held == set()
    # renewal: a lease renewed once a quarter of its TTL has passed holds a full TTL from then
    assert a.take(7)
    now[0] += 16.0
    a.renew_due()
    now[0] += 59.0
    assert not b.take(7)
    a.release_all()
    assert b.take(7) and a.held == set()
    # a driver killed with -9 on this host holds nothing: its lease is stale at once, not after its expiry
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert store.Leases(loc, f"{socket.gethostname()}:{dead.pid}:killed", ttl=600).take(4)
    assert b.holder(4) is None and b.take(4)
    assert store.Leases(loc, ttl=600).take(5)  # this live process: held
    assert not b.take(5)


def test_two_jobs_on_one_output_compute_each_shard_once(tmp_path, dataset, tiny_teachers, reference):  # noqa: F811
    out = tmp_path / "store"
    jobs = [start(args(dataset, out, tiny_teachers, "--max-writers", "1", "--prefetch", "1", "--num-cpus", "2"))
            for _ in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in jobs]
    assert [p.returncode for p in jobs] == [0, 0], logs
    written = [int(log.split(" written now")[0].rsplit(" ", 1)[-1]) for log in logs]
    assert sum(written) == 4, (written, logs)  # not 8: no shard was computed twice
    same_data(out, reference)
    assert not [n for n in Location(out).list(layout.SHARDS) if n.endswith(".lease")]


def test_shards_another_job_holds_are_waited_for_then_taken_over(tmp_path, dataset, tiny_teachers, reference):  # noqa: F811
    """Another job holds shards 2 and 3 and then vanishes: this one computes the others, says it waits, and takes
    the two over once their leases lapse, which happens when the test says (after the job said it waits), not
    after a fixed time. Nothing is computed twice, nothing is lost."""
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    w = store.StoreWriter.open(out)
    w.save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    other = w.leases("other-job", ttl=3600)
    for i in (2, 3):
        w.redo(i)  # as the other job does before rewriting them
        assert other.take(i)
    p = start(args(dataset, out, tiny_teachers))
    log = []
    for line in p.stdout:  # until the job says it waits for the other job's shards
        log.append(line)
        if "waiting for 2 shard(s) that another job is computing (other-job)" in line:
            break
    assert p.poll() is None and len(records(out)) == 2, "".join(log)  # the other two done, 2 and 3 not
    lapsed = w.leases("other-job", ttl=-1)  # the other job is gone: its leases lapse now
    for i in (2, 3):
        lapsed.renew(i)
    rest, _ = p.communicate(timeout=300)
    log = "".join(log) + rest
    assert p.returncode == 0, log
    assert "2 written now, 2 were already done" in log
    same_data(out, reference)


def test_the_format_doc_says_what_the_tar_writer_does(tmp_path):
    import tarfile

    url = str(tmp_path / "s")
    w = create(url, formats=("wds",))
    w.commit_shard(make_result(w.manifest, 0))
    with tarfile.open(tmp_path / "s" / layout.tar_name(0)) as tf:
        members = tf.getmembers()
    assert len(members) > N // 3 and all(mem.pax_headers for mem in members)  # PAX, as the doc now says
    assert "PAX" in (REPO / "docs" / "format.md").read_text()



# ---- provenance of exactness (from the full-scale extraction issue) -------------------------------------------

def test_the_job_upload_records_the_submitters_git_commit(tmp_path):
    """Under `ray job submit` the job runs from an uploaded copy without .git: the store still records the
    commit, the one pipeline.jobdir saw on the submitting side."""
    from pipeline import jobdir

    job = jobdir.build(tmp_path / "job")
    code = "import pipeline.provenance as s, json; print(json.dumps([s.__file__, s.code_version()]))"
    p = subprocess.run([sys.executable, "-c", code], cwd=job, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    where, version = json.loads(p.stdout.strip().splitlines()[-1])
    assert where.startswith(str(job)) and not (job / ".git").exists()
    assert version["git"] == jobdir.git_describe(REPO) and version["git"]


def test_other_image_libraries_on_resume_are_warned_about(tmp_path, dataset, tiny_teachers, reference):  # noqa: F811
    from recipes.imageops import image_libraries

    out = tmp_path / "store"
    shutil.copytree(reference, out)
    w = store.StoreWriter.open(out)
    w.save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    w.manifest.extraction.update(image_libraries(), pillow="9.0.0")
    w.save_manifest()
    rc, log = run(args(dataset, out, tiny_teachers, "--plan-only"), timeout=120)
    assert rc == 0 and f"pillow 9.0.0 -> {image_libraries()['pillow']}" in log and "bit-exact" in log, log
    w.manifest.extraction.update(image_libraries())
    w.save_manifest()
    rc, log = run(args(dataset, out, tiny_teachers, "--plan-only"), timeout=120)
    assert rc == 0 and "image libraries differ" not in log
