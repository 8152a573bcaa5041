"""Hard failures a cluster user hits, each kept as a case: a hang, silent zeros, code execution on resume, SIGTERM,
unstorable ids, two jobs on one output, damaged records, and one clear message where a traceback was. Tiny
stores and models, real Ray, real processes and signals; every case asserts the exit status, the one-line
message, and that no good sample was lost."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    REPO,
    call,
    env,
    extraction_args,
    one_error_line,
    processes_mentioning,
    records,
    reference_store,
    same_data,
    start_extraction,
    trainer_args,
    wait_for,
)
from test_store import N, create, make_result

import store
from pipeline import inspect, localray
from pipeline.extract.cli import main as extraction_main
from recipes.manifest import load_manifest
from store import Location, layout
from trainer.pt import run as trainer


def trainer_process(argv, timeout=300) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "trainer.pt", *map(str, argv)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


# ---- 1. no usable sample: a clear end, never a hang; workers die with their parent ------------------------------

def test_a_store_without_usable_images_is_refused(tmp_path, tiny_models, tiny_teachers):
    from pipeline.sample import generate

    json_path = generate(tmp_path / "ds", num_samples=0, bad=5, seed=2)
    path = reference_store(tmp_path / "store", (json_path, tmp_path / "ds" / "images"), tiny_teachers,
                           teachers_yaml=True)
    rc, log = call(trainer, trainer_args(path, tiny_models, tiny_teachers, tmp_path / "out"))
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
    rc, log = trainer_process(trainer_args(path, tiny_models, tiny_teachers, out), timeout=180)
    assert rc == 2 and "none of this process's 4 samples has an image the trainer can use" in one_error_line(log)
    wait_for(lambda: processes_mentioning(str(out)) == [], timeout=10, what="no DataLoader worker left spinning")


@pytest.mark.slow
def test_sigterm_to_the_trainer_takes_its_workers_along(tmp_path, trainer_store, tiny_models, tiny_teachers):
    out = tmp_path / "out-sigterm"
    argv = trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "500", "--set", "num_workers=2")
    p = subprocess.Popen([sys.executable, "-m", "trainer.pt", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env())
    wait_for(lambda: len(processes_mentioning(str(out))) >= 3 or p.poll() is not None, what="the 2 workers")
    assert p.poll() is None  # the trainer and its 2 workers run
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    wait_for(lambda: processes_mentioning(str(out)) == [], timeout=10, what="the workers to exit")


def test_a_worker_whose_trainer_died_before_it_started_dies_too():
    """The race a loaded machine showed: SIGTERM reached the trainer while its DataLoader workers were still
    starting, so by the time a worker asked for its parent, init had adopted it and it ran on. The worker now
    checks against the trainer pid bound before it started."""
    code = "from trainer.data import worker_init; worker_init(2**22 + 7, 0); print('alive', flush=True)"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and "alive" not in p.stdout, (p.returncode, p.stdout, p.stderr[-500:])


# ---- 2. a missing Zarr chunk is never read as zeros -----------------------------------------------------------

def test_a_missing_zarr_chunk_is_named_not_read_as_zeros(tmp_path, capsys):
    url = str(tmp_path / "store")
    w = create(url)
    for i in range(w.manifest.num_shards):
        w.commit_shard(make_result(w.manifest, i))
    gone = "targets.zarr/depth/c/1/0/0"
    assert gone in store.Store(url).records[1].files
    Location(url).remove(gone)
    with pytest.raises(store.StoreError, match=f"shard 1: {gone} is missing"):
        store.Store(url).get(f"{4:09d}", ["depth"])
    assert store.Store(url).get(f"{0:09d}", ["depth"])["valid"]["depth"]  # shard 0 is still fine
    for cmd in (["stats"], ["show", f"{4:09d}"]):
        assert inspect.main([url, *cmd]) == 2, cmd
        assert f"{gone} is missing" in one_error_line(capsys.readouterr().err)


# ---- 3. --resume never runs code from the checkpoint folder ----------------------------------------------------

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_resume_refuses_a_crafted_checkpoint_without_running_it(tmp_path, trained, trainer_store, tiny_models,
                                                                tiny_teachers):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "PWNED"
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(str(marker))}))
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "99", "--resume"))
    assert rc == 2 and "optimizer.pt holds more than tensors and plain values, refused" in one_error_line(log)
    assert not marker.exists()


# ---- 4. SIGTERM to the extraction driver ---------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_extraction_like_ctrl_c(tmp_path, extract_dataset, tiny_teachers):
    """SIGTERM mid-job: exit 143 with one line, the committed shards whole, the local Ray it started stopped.
    (Re-running finishes the store: test_extract's resume after kill -9, the harder case, shows it.)"""
    out = tmp_path / "store"
    p = start_extraction(extraction_args(extract_dataset, out, tiny_teachers, "--prefetch", "1", "--max-writers", "1"))
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


# ---- 5. problems found before any work, in one line ----------------------------------------------------------

def test_an_unstorable_id_is_rejected_before_any_work(tmp_path, extract_dataset, tiny_teachers):
    recs = json.loads(extract_dataset[0].read_text())
    recs[3]["id"] = "bad\ud800id"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))  # ensure_ascii: the lone surrogate is written as \ud800
    rc, log = call(extraction_main, extraction_args((bad, extract_dataset[1]), tmp_path / "out", tiny_teachers))
    assert rc == 2 and "record 3: id 'bad\\ud800id' is not valid Unicode text" in log and "Traceback" not in log
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_found_before_the_teachers_load(tmp_path, extract_dataset, tiny_teachers,
                                                                            seaweedfs):
    (tmp_path / "afile").write_text("x")
    rc, log = call(extraction_main, extraction_args(extract_dataset, tmp_path / "afile" / "store", tiny_teachers))
    assert rc == 2 and "cannot be written (Not a directory)" in one_error_line(log)
    assert "Started a local Ray" not in log
    # a bucket this identity may read but not write (its own process: credentials are read per process)
    q = subprocess.run([sys.executable, "-m", "pipeline.extract_teachers",
                        *extraction_args(extract_dataset, f"s3://{seaweedfs.bucket}/read-only/store", tiny_teachers)],
                       cwd=REPO, env=env(**seaweedfs.read_only_env), capture_output=True, text=True, timeout=120)
    assert q.returncode == 2 and "cannot be written" in one_error_line(q.stdout + q.stderr), q.stdout + q.stderr


def test_an_unparsable_teachers_yaml_is_one_message(tmp_path, trainer_store, tiny_models, tiny_teachers, capsys):
    path = tmp_path / "store"
    shutil.copytree(trainer_store, path)
    (path / layout.TEACHERS).write_text("teachers: [unclosed\n  - {")
    rc, log = call(trainer, trainer_args(path, tiny_models, tiny_teachers, tmp_path / "out"))
    assert rc == 2 and "teachers.yaml is damaged (not YAML" in one_error_line(log)
    assert inspect.main([str(path), "summary"]) == 2
    assert "teachers.yaml is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--set", "layers=3"], "layers must be a mapping"),
    (["--set", "micro_batch_size=0"], "micro_batch_size must be >= 1, got 0"),
    (["--set", "learning_rate=-1e-3"], "learning_rate must be > 0"),
    (["--set", "num_workers=-1"], "num_workers must be >= 0"),
    (["--set", "tasks=gen,Normals"], "not a safe identifier"),
    (["--max-steps", "-5"], "max_steps must be >= 1"),
])
def test_bad_trainer_settings_are_one_message(tmp_path, trainer_store, tiny_models, tiny_teachers, extra, message):
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", *extra))
    assert rc == 2 and "bad trainer config" in log and message in log, log
    assert "Traceback" not in log and not (tmp_path / "out").exists()


def test_a_task_no_teacher_of_the_manifest_computes_is_one_line(tmp_path, trainer_store, tiny_models, tiny_teachers):
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", "--set",
                                         "tasks=gen,normals"))
    assert rc == 2 and "unknown teacher(s) 'normals'" in log and "defines gen, depth, seg" in log, log
    assert "Traceback" not in log and not (tmp_path / "out").exists()


def test_tasks_given_as_a_word_are_a_list():
    from trainer.config import load_config

    assert load_config([], {"store": "s", "output_dir": "o"}, ["tasks=gen"]).tasks.names == ["gen"]


@pytest.mark.parametrize("which", ["missing path", "uncached id"])
def test_a_model_that_is_not_there_is_one_message(tmp_path, trainer_store, tiny_models, tiny_teachers, which,
                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = str(tmp_path / "no-such-llm") if which == "missing path" else "someone/not-in-the-cache-llm"
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "out", "--llm", llm))
    line = one_error_line(log)
    assert rc == 2 and f"cannot load the LLM tokenizer {llm!r}" in line
    assert ("does not exist" if which == "missing path" else "HF_HUB_OFFLINE is set") in line


def test_conversations_that_cannot_be_tokenised_are_bad_samples(tmp_path, tiny_teachers, extract_dataset, tiny_models):
    from pipeline.extract.decode import decode_batch
    from pipeline.inputs import load_records

    recs = json.loads(extract_dataset[0].read_text())
    good = [r for r in recs if r.get("image") and (extract_dataset[1] / r["image"]).is_file()][:3]
    odd = [dict(good[0], id="turn-not-object", conversations=["a string"]),
           dict(good[1], id="value-not-string", conversations=[{"from": "gpt", "value": 7}])]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(good[2:] + odd))
    records_, _ = load_records(path, image_folder=extract_dataset[1])
    spec = load_manifest(tiny_teachers).teachers["gen"]
    b = decode_batch(records_, [spec])
    errors = {s.id: s.error for s in b.samples}
    assert errors[good[2]["id"]] is None and b.ids == [good[2]["id"]]  # the good neighbour keeps its target
    assert "conversations[0] is not an object" in errors["turn-not-object"]
    assert "conversations[0].value is not a string" in errors["value-not-string"]
    # and the trainer's tokenisation does not crash on them either (should one reach it)
    import yaml
    from transformers import AutoTokenizer

    from trainer.templates import PromptBuilder, get_template

    cfg = yaml.safe_load(tiny_models.read_text())
    pb = PromptBuilder(AutoTokenizer.from_pretrained(cfg["model"]["llm"]), get_template(cfg["model"]["chat_template"]), max_text_tokens=64)
    assert pb(odd[0]).text_labels and pb(odd[1]).text_ids


def test_a_huge_caption_is_cut_before_tokenising(tiny_models):
    import yaml
    from transformers import AutoTokenizer

    from trainer.templates import MAX_CHARS_PER_TOKEN, PromptBuilder, get_template

    cfg = yaml.safe_load(tiny_models.read_text())
    tok = AutoTokenizer.from_pretrained(cfg["model"]["llm"])
    seen = []

    class Spy:  # the real tokenizer, recording how much text it is handed
        bos_token_id = tok.bos_token_id

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

    pb = PromptBuilder(Spy(), get_template(cfg["model"]["chat_template"]), max_text_tokens=100)
    caption = "a red square above a blue circle " * (50_000_000 // 33)  # 50 MB
    out = pb({"conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]})
    assert len(out.text_ids) == len(out.text_labels) == 100
    assert max(seen) <= MAX_CHARS_PER_TOKEN * 100 + 64
    full = tok(caption[:20_000], add_special_tokens=False)["input_ids"]  # what fits is what the untruncated text gives
    assert [i for i in out.text_labels if i >= 0][:50] == full[:50]


# ---- 6. leases: two jobs, one store --------------------------------------------------------------------------

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


@pytest.mark.slow
def test_two_jobs_on_one_output_compute_each_shard_once(seaweedfs, extract_dataset, tiny_teachers, reference, ray_head):
    """Started together on one new bucket prefix: whichever creates the store first, the other continues it (a
    writability probe is no store's content), and no shard is computed twice."""
    out = f"s3://{seaweedfs.bucket}/two-jobs-{time.time_ns()}/store"
    argv = extraction_args(extract_dataset, out, tiny_teachers, "--address", ray_head, "--max-writers", "1",
                           "--prefetch", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5")
    jobs = [start_extraction(argv) for _ in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in jobs]
    assert [p.returncode for p in jobs] == [0, 0], logs
    written = [int(log.split(" written now")[0].rsplit(" ", 1)[-1]) for log in logs]
    assert sum(written) == 4, (written, logs)  # not 8: no shard was computed twice
    same_data(out, reference)
    assert not [n for n in Location(out).list(layout.SHARDS) if n.endswith(".lease")]


@pytest.mark.slow
def test_damaged_records_are_redone_and_held_shards_taken_over_when_their_lease_lapses(
        tmp_path, extract_dataset, tiny_teachers, reference, ray_head, capsys):
    """Shard 1's record is damaged, shard 2's lacks its files list: both are redone. Another job holds shard 3
    (record taken away, lease held) and then vanishes: this job computes the others, says it waits, and takes
    shard 3 over once its lease lapses -- when the test says so, after the job said it waits, not after a fixed
    time. Nothing is computed twice, nothing is lost."""
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    w = store.StoreWriter.open(out)
    w.save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    loc = w.loc
    loc.write_bytes(layout.record_name(1), b'["not", "an object"]')
    d = json.loads(loc.read_bytes(layout.record_name(2)))
    d["files"] = {}  # a record without files once counted as done forever
    loc.write_bytes(layout.record_name(2), json.dumps(d).encode())
    assert inspect.main([str(out), "summary"]) == 0
    said = capsys.readouterr().out
    assert "shard 1: damaged record" in said and "shard 2: damaged record" in said and "lists no files" in said
    other = w.leases("other-job", ttl=3600)
    w.redo(3)  # as the other job does before rewriting it
    assert other.take(3)
    p = start_extraction(extraction_args(extract_dataset, out, tiny_teachers, "--address", ray_head))
    log = []
    for line in p.stdout:  # until the job says it waits for the other job's shard
        log.append(line)
        if "waiting for 1 shard(s) that another job is computing (other-job)" in line:
            break
    assert p.poll() is None and sorted(records(out)) == [0, 1, 2], "".join(log)  # the others done, 3 not
    w.leases("other-job", ttl=-1).renew(3)  # the other job is gone: its lease lapses now
    rest, _ = p.communicate(timeout=300)
    log = "".join(log) + rest
    assert p.returncode == 0, log
    assert "3 written now, 1 were already done" in log
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


# ---- provenance of exactness ---------------------------------------------------------------------------------

def test_the_job_upload_records_the_submitters_git_commit(tmp_path):
    """Under `ray job submit` the job runs from an uploaded copy without .git: the store still records the
    commit, the one pipeline.jobdir saw on the submitting side."""
    from pipeline import jobdir

    job = jobdir.build(tmp_path / "job")
    code = "import pipeline.provenance as s, json; print(json.dumps([s.__file__, s.code_version()]))"
    p = subprocess.run([sys.executable, "-c", code], cwd=job, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in env().items() if k != "PYTHONPATH"})
    where, version = json.loads(p.stdout.strip().splitlines()[-1])
    assert where.startswith(str(job)) and not (job / ".git").exists()
    assert version["git"] == jobdir.git_describe(REPO) and version["git"]


def test_other_image_libraries_on_resume_are_warned_about(tmp_path, extract_dataset, tiny_teachers, reference):
    from recipes.imageops import image_libraries

    out = tmp_path / "store"
    shutil.copytree(reference, out)
    w = store.StoreWriter.open(out)
    w.save(load_manifest(tiny_teachers).identity(["gen", "depth", "seg"]))
    w.manifest.extraction.update(image_libraries(), pillow="9.0.0")
    w.save_manifest()
    argv = extraction_args(extract_dataset, out, tiny_teachers, "--plan-only")
    rc, log = call(extraction_main, argv)
    assert rc == 0 and f"pillow 9.0.0 -> {image_libraries()['pillow']}" in log and "bit-exact" in log, log
    w.manifest.extraction.update(image_libraries())
    w.save_manifest()
    rc, log = call(extraction_main, argv)
    assert rc == 0 and "image libraries differ" not in log
