"""Tried as a hostile and as a careless user would: nothing deleted that olaf did not make, no gigabytes from a
98-byte image, no training on an edited position or on other teachers' targets, no store that verifies while
it lies, one line instead of a traceback. Each case failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, SYNTHETIC_TEACHERS, call

from pipeline import jobdir

# ---- the job folder: only ever replace what jobdir made -----------------------------------------------------------

def test_jobdir_never_deletes_a_folder_it_did_not_make(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("user data")
    rc, log = call(jobdir.main, [keep])
    assert rc == 2 and "was not made by pipeline.jobdir" in log and (keep / "mine.txt").read_text() == "user data"
    for sources in (REPO, REPO.parent, REPO / "store"):  # the checkout, the folder holding it, a package of it
        rc, log = call(jobdir.main, [sources])
        assert rc == 2 and "holds olaf's sources" in log, sources
    assert (REPO / "store" / "layout.py").is_file()
    (tmp_path / "afile").write_text("x")
    assert call(jobdir.main, [tmp_path / "afile"])[0] == 2 and (tmp_path / "afile").read_text() == "x"
    # a folder it made is rebuilt, whatever was added to it; an empty one is used
    job = tmp_path / "job"
    assert call(jobdir.main, [job])[0] == 0 and (job / jobdir.MARK).is_file()
    (job / "stale.py").write_text("old")
    assert call(jobdir.main, [job])[0] == 0 and not (job / "stale.py").exists() and (job / "store" / "layout.py").is_file()
    (tmp_path / "empty").mkdir()
    assert call(jobdir.main, [tmp_path / "empty"])[0] == 0


# ---- a tiny file that the recipes would blow up to gigabytes -----------------------------------------------------

def test_an_image_the_recipes_would_blow_up_is_a_bad_sample_with_its_reason(tmp_path, tiny_teachers):
    """A 98-byte 4000x1 PNG passes the source-pixel cap, but the gen recipe's shortest edge of 224 would make it
    896,000 x 224: refused by size, before any pixel is made, on the PIL path and on the device path alike; its
    neighbour in the batch is unaffected."""
    import torch
    from PIL import Image

    from pipeline.extract.decode import decode_batch
    from pipeline.inputs import load_records
    from recipes import pil_exact
    from recipes.imageops import MAX_RESIZE_PIXELS, BadImage, resize_shortest_edge
    from recipes.manifest import load_manifest

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4000, 1), (200, 10, 10)).save(images / "sliver.png", optimize=True)
    Image.new("RGB", (64, 48), (10, 200, 10)).save(images / "fine.png")
    assert (images / "sliver.png").stat().st_size < 200
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "sliver", "image": "sliver.png", "conversations": conv},
                                                 {"id": "fine", "image": "fine.png", "conversations": conv}]))
    records, _ = load_records(tmp_path / "d.json", image_folder=images)
    specs = list(load_manifest(tiny_teachers).teachers.values())
    for resize_on in ("cpu", "device"):
        b = decode_batch(records, specs, resize_on=resize_on)
        errors = {s.id: s.error for s in b.samples}
        assert errors["fine"] is None and b.ids == ["fine"], resize_on
        assert "aspect ratio 4000:1" in errors["sliver"], errors
    wide = Image.new("RGB", (3000, 100))  # an aspect the caps allow, a size they do not
    with pytest.raises(BadImage, match=f"over the cap of {MAX_RESIZE_PIXELS}"):
        resize_shortest_edge(wide, 800, "bilinear")
    with pytest.raises(BadImage, match="over the cap"):
        pil_exact.resize(torch.zeros(100, 3000, 3, dtype=torch.uint8), 24000, 800, "bilinear")


# ---- --resume trusts no edited position ----------------------------------------------------------------------

@pytest.mark.parametrize("position", [16, 80, -8])
def test_a_data_position_that_is_not_the_steps_is_refused(tmp_path, trained, trainer_store, tiny_models, tiny_teachers,
                                                          position):
    """The checkpoint says step 8 of global batch 4: its position must be 32. Another one (edited, damaged)
    would train on other samples than samples.jsonl lists, or crash: one line, and nothing trained."""
    import shutil

    from helpers import one_error_line, trainer_args

    from trainer.pt import run as trainer

    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["data"]["position"] == state["step"] * state["data"]["global_batch"]
    state["data"]["position"] = position
    (ckpt / "state.json").write_text(json.dumps(state))
    before = (out / "logs" / "train.jsonl").read_text()
    rc, log = call(trainer, trainer_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "12", "--resume"))
    assert rc == 2 and f"data position {position} is not its step" in one_error_line(log)
    assert (out / "logs" / "train.jsonl").read_text() == before


# ---- verify checks what the records claim about the tars ----------------------------------------------------

@pytest.mark.parametrize("edit", ["ids", "ranges"])
def test_verify_finds_records_whose_ids_or_ranges_lie_about_the_tar(tmp_path, edit):
    """Edited ids, or byte ranges rotated by one sample, keep every file's sha256: verify --full still names the
    shard, and the trainer's stream refuses to hand out a sample under another id."""
    from test_store import create, make_result

    import store
    from store import layout

    url = str(tmp_path / "s")
    w = create(url)
    for i in range(w.manifest.num_shards):
        w.commit_shard(make_result(w.manifest, i))
    loc = store.Location(url)
    d = json.loads(loc.read_bytes(layout.record_name(1)))
    if edit == "ids":
        d["ids"] = ["fake-0", *d["ids"][1:]]
    else:
        ranges = d["files"][layout.tar_name(1)]["samples"]
        d["files"][layout.tar_name(1)]["samples"] = ranges[1:] + ranges[:1]
    loc.write_bytes(layout.record_name(1), json.dumps(d).encode())
    report = store.verify_store(store.Store(url), full=True, progress=False)
    assert not report["ok"] and list(report["bad_shards"]) == ["1"], report
    said = " ".join(report["bad_shards"]["1"])
    assert ("'fake-0' in the record" if edit == "ids" else "by the record") in said
    stream = store.TargetStream(url, ["gen"], global_batch=9, micro_batch=9, stop_step=1)
    with pytest.raises(store.StoreError, match="the tar does not match its record"):
        list(stream)


# ---- other teachers' targets -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_weights_store(tmp_path_factory, tiny_teachers):
    """A store extracted with tiny teachers of other (random) weights, declared the same way (local paths)."""
    from helpers import reference_store

    from pipeline.sample import generate
    from teachers.tiny import build

    root = tmp_path_factory.mktemp("other_weights")
    other = build(root / "teachers", seed=1)
    json_path = generate(root / "ds", num_samples=3, seed=9)
    return reference_store(root / "store", (json_path, root / "ds" / "images"), other, teachers_yaml=True), other


def test_a_store_of_other_teachers_weights_is_refused(tmp_path, other_weights_store, trainer_store, tiny_teachers,
                                                      tiny_models):
    """The trainer compares the content of the weight files its manifest names with what the store records:
    other weights are refused (trainer and probe), the same weights at another path are fine."""
    import shutil

    import yaml
    from helpers import trainer_args

    from store import StoreError
    from trainer.build import open_store
    from trainer.config import load_config
    from trainer.pt import run as trainer

    other_store, _ = other_weights_store
    rc, log = call(trainer, trainer_args(other_store, tiny_models, tiny_teachers, tmp_path / "out"))
    assert rc == 2 and "Traceback" not in log and "teacher mismatch: gen: the weight files differ" in log
    moved = tmp_path / "moved"
    shutil.copytree(tiny_teachers.parent, moved)  # the same files elsewhere: a path-only difference
    cfg = load_config([tiny_models], {"store": str(trainer_store), "output_dir": str(tmp_path / "o"),
                                      "teachers_manifest": str(moved / "teachers.yaml")})
    store, expected = open_store(cfg)
    assert not [n for n in store.notes if "weights" in n]  # the content is the same: nothing to say
    assert yaml.safe_load((trainer_store / "teachers.yaml").read_text())["teachers"]["gen"]["weights_files_sha256"] \
        == expected["teachers"]["gen"]["weights_files_sha256"]
    with pytest.raises(StoreError, match="the weight files differ"):  # the probe's eval store is checked alike
        open_store(cfg, str(other_store))


# ---- exports: one checkpoint rule, never merged, never into the run -------------------------------------------

def test_every_export_format_holds_the_same_checkpoint_and_names_it(tmp_path, trained):
    """A run killed after its step-6 checkpoint (no export/, no step 8): both formats export step 6 and say so;
    an export into a non-empty folder, or into the run itself, is refused and changes nothing."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from trainer.export import main as export

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "export")
    shutil.rmtree(run / "checkpoints" / "step-000008")
    six = load_file(run / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert call(export, [run, "--format", "llava", "--out", tmp_path / "llava"])[0] == 0
    assert call(export, [run, "--format", "ola-vlm", "--out", tmp_path / "ola"])[0] == 0
    llava = json.loads((tmp_path / "llava" / "config.json").read_text())
    ola = json.loads((tmp_path / "ola" / "config.json").read_text())["olaf"]
    assert (llava["steps"], llava["checkpoint"]) == (ola["steps"], ola["checkpoint"]) == (6, "step-000006")
    projector = torch.load(tmp_path / "llava" / "mm_projector.bin", weights_only=True)
    assert torch.equal(projector["model.mm_projector.0.weight"], six["projector.0.weight"])
    from safetensors import safe_open

    with safe_open(tmp_path / "ola" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.mm_projector.0.weight"), six["projector.0.weight"])
    config_before = (run / "config.json").read_bytes()
    for out, why in ((tmp_path / "llava", "is not empty"), (run, "inside the run"), (run / "x", "inside the run")):
        rc, log = call(export, [run, "--format", "llava", "--out", out])
        assert rc == 2 and why in log and "Traceback" not in log, log
    assert (run / "config.json").read_bytes() == config_before and not (run / "x").exists()


# ---- a bucket that cannot be reached or refuses the identity: one line that names the variable ------------------

@pytest.mark.parametrize("case, env, says", [
    ("wrong secret", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "refuses this identity"),
    ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     "no credentials"),
    ("endpoint down", {"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}, "cannot reach"),
])
def test_bucket_access_problems_are_one_line_naming_what_to_check(tmp_path, seaweedfs, trainer_store, tiny_models,
                                                                   tiny_teachers, extract_dataset, monkeypatch, capsys,
                                                                   case, env, says):
    import s3fs
    from conftest import free_port
    from helpers import extraction_args, one_error_line, trainer_args

    from pipeline import inspect
    from pipeline.extract.cli import main as extraction_main
    from trainer.pt import run as trainer

    url = f"s3://{seaweedfs.bucket}/access/store"
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v.format(port=free_port()))
    s3fs.S3FileSystem.clear_instance_cache()  # credentials and endpoints are read when a client is made
    try:
        variable = {"wrong secret": "AWS_SECRET_ACCESS_KEY", "no credentials": "AWS_ACCESS_KEY_ID",
                    "endpoint down": "AWS_ENDPOINT_URL"}[case]
        assert inspect.main([url, "summary"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert says in line and variable in line and "verify" not in line, line
        for main, argv in ((extraction_main, extraction_args(extract_dataset, url, tiny_teachers)),
                           (trainer, trainer_args(url, tiny_models, tiny_teachers, tmp_path / "out"))):
            rc, log = call(main, argv)
            assert rc == 2 and says in one_error_line(log) and variable in log, log
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---- trainer.probe: one line for a bad --layers or a model that is not one -----------------------------------

def test_probe_arguments_and_models_that_are_not_there_are_one_line(tmp_path, trained, trainer_store, tiny_models,
                                                                     tiny_teachers):
    import shutil

    import torch
    from helpers import one_error_line

    from trainer.probe import run as probe

    common = ["--store", trainer_store, "--eval-store", trainer_store, "--teachers-manifest", tiny_teachers,
              "--output-dir", tmp_path / "out", "--max-steps", "1"]
    for layers, says in (("20-18", "runs backwards"), ("abc", "is not a layer number")):
        rc, log = call(probe, [*common, "--model", trained / "export", "--layers", layers])
        assert rc == 2 and says in log and "Traceback" not in log, log
    for missing in ("config.json", "mm_projector.bin", "task_tokens.safetensors"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(trained / "export", broken)
        (broken / missing).unlink()
        rc, log = call(probe, [*common, "--model", broken])
        assert rc == 2 and f"incomplete PT export: {missing} missing" in one_error_line(log), log
    llm = Path(tiny_models).parent / "llm"
    tower = Path(tiny_models).parent / "clip_vision_tower"
    for name, content in (("wrong-shape.bin", {"model.mm_projector.0.weight": torch.zeros(3, 3)}),
                          ("not-tensors.bin", None)):
        path = tmp_path / name
        if content is None:
            path.write_bytes(b"these are not tensors")
        else:
            torch.save(content, path)
        rc, log = call(probe, [*common, "--model", llm, "--vision-tower", tower, "--mm-projector", path])
        assert rc == 2 and "is not an mlp2x_gelu projector" in one_error_line(log), log


# ---- from-images: what cannot be stored is skipped and said, never the whole dataset refused -------------------

def test_from_images_skips_and_lists_what_no_store_can_hold(tmp_path):
    import os

    from PIL import Image

    from pipeline.inputs import load_records
    from pipeline.llava import main as llava

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for name in ("a/good.jpg", "a/dup.jpg", "b/dup.jpg", "b/other.jpg", "new\nline.jpg", "trail .jpg", " lead.jpg"):
        Image.new("RGB", (8, 8)).save(root / name, format="JPEG")
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(root), b"\xffnot-utf8.jpg"), format="JPEG")
    (root / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe.jpg")
    (tmp_path / "outside.jpg").write_bytes((root / "a" / "good.jpg").read_bytes())
    (root / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    out = tmp_path / "ds.json"
    out.write_text("[]")
    rc, log = call(llava, ["from-images", root, "--out", out])
    assert rc == 0, log
    records, _ = load_records(out)  # what it wrote, extraction takes whole
    assert sorted(r.id for r in records) == ["a/dup", "a/good", "b/dup", "b/other"]
    skipped = [json.loads(x) for x in (tmp_path / "ds.json.skipped.jsonl").read_text().splitlines()]
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert len(reasons) == 7 and reasons["pipe.jpg"].startswith("not a regular file")
    assert reasons["escape.jpg"] == reasons["zero.jpg"] == "a link that leaves the image folder"
    for name in ("new\nline.jpg", "trail .jpg", " lead.jpg", "\\udcffnot-utf8.jpg"):
        assert reasons[name].startswith("its name cannot be stored"), (name, reasons)
    # COCO: entries that cannot be one sample each are skipped with their reason, the rest kept
    coco = {"images": [{"id": 1, "file_name": "good.jpg"}, {"id": 1, "file_name": "other.jpg"}, "not an entry",
                       {"file_name": "other.jpg"}, {"id": "1", "file_name": "other.jpg"},
                       {"id": 2, "file_name": "dup.jpg"}, {"id": 3, "file_name": "gone.jpg"},
                       {"id": 4, "file_name": "other.jpg"}],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 4, "caption": "four"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    rc, log = call(llava, ["from-images", root, "--coco", tmp_path / "c.json", "--out", tmp_path / "coco.json"])
    assert rc == 0, log
    records, _ = load_records(tmp_path / "coco.json")
    assert [(r.id, r.image, r.caption()) for r in records] == [("1", "a/good.jpg", "one"), ("4", "b/other.jpg", "four")]
    said = [json.loads(x)["reason"] for x in (tmp_path / "coco.json.skipped.jsonl").read_text().splitlines()]
    for what in ("repeats an earlier image's", "not an object", "no usable 'id'", "ambiguous", "not under the image"):
        assert any(what in s for s in said), (what, said)
    # a failure leaves an existing --out as it was
    out.write_text("[1]")
    assert call(llava, ["from-images", tmp_path / "nowhere", "--out", out])[0] == 2 and out.read_text() == "[1]"


def test_localray_env_without_a_head_is_one_line(tmp_path):
    from helpers import one_error_line

    from pipeline import localray

    rc, log = call(localray.main, ["env", tmp_path / "none"])
    assert rc == 2 and "describes no running head" in one_error_line(log)


# ---- a lease whose job is gone: seen, and broken on purpose ----------------------------------------------------

def test_leases_are_shown_and_broken_only_on_purpose(tmp_path, capsys):

    from helpers import one_error_line
    from test_store import create, make_result

    import store
    from pipeline import inspect

    url = str(tmp_path / "s")
    w = create(url)
    w.commit_shard(make_result(w.manifest, 0))
    gone = store.Leases(w.loc, "otherhost:123:ab", ttl=3 * 3600)  # another host's job, hours to go, gone
    assert gone.take(1)
    store.Leases(w.loc, "otherhost:124:cd", ttl=-1).take(2)  # expired
    assert inspect.main([url, "summary"]) == 0
    said = capsys.readouterr().out
    assert "shard 1: otherhost:123:ab until" in said and "(live)" in said and "unlease 1 --force" in said
    assert "shard 2: otherhost:124:cd" in said and "(expired or its owner is gone)" in said
    assert inspect.main([url, "unlease", "1"]) == 2
    assert "may still be writing it" in one_error_line(capsys.readouterr().err)
    assert store.Leases(w.loc).holder(1) is not None
    assert inspect.main([url, "unlease", "2"]) == 0 and inspect.main([url, "unlease", "1", "--force"]) == 0
    assert store.Leases(w.loc).all() == {}
    assert inspect.main([url, "unlease", "3"]) == 2 and "has no lease" in capsys.readouterr().err


# ---- store creation is race-free -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_store_is_created_once_and_a_probe_is_no_content(tmp_path, backend, request):
    """Another job's writability probe does not make a new output 'not an olaf store'; of two creations, the second
    learns that the store exists (and continues it) instead of overwriting it."""
    import time

    from test_store import LAYOUTS

    import store
    from store import layout

    url = str(tmp_path / "s") if backend == "local" else f"s3://{request.getfixturevalue('seaweedfs').bucket}/race-{time.time_ns()}"
    loc = store.Location(url)
    loc.makedirs()
    loc.write_bytes(f"{layout.WRITE_PROBE}4242-abcd", b"ok")  # what a job checking writability leaves, for an instant
    assert store.StoreWriter.existing(url) is None
    m = store.RunManifest(dataset={"json": "x", "sha256": "0" * 64}, num_samples=4, shard_size=2, formats=["wds"],
                          tasks={"gen": LAYOUTS["gen"]})
    first = store.StoreWriter.create(url, m, SYNTHETIC_TEACHERS)
    with pytest.raises(store.StoreExists):
        store.StoreWriter.create(url, store.RunManifest(dataset={"json": "y"}, num_samples=8, shard_size=2,
                                                        formats=["wds"], tasks={"gen": LAYOUTS["gen"]}), SYNTHETIC_TEACHERS)
    assert store.StoreWriter.existing(url).manifest.to_dict() == first.manifest.to_dict()
    other = store.Location(url + "-other")  # anything else in an output is still refused
    other.makedirs()
    other.write_bytes("somebody-else.txt", b"x")
    with pytest.raises(store.StoreError, match="not an olaf store"):
        store.StoreWriter.existing(other.url)


def test_sigterm_is_exit_143_even_when_a_library_re_raises_a_plain_keyboard_interrupt(tmp_path, monkeypatch,
                                                                                      extract_dataset, tiny_teachers):
    """Ray's waits catch the Terminated our handler raises and raise a KeyboardInterrupt of their own (seen as exit
    130 and 'interrupted' under load): the signal is remembered, so the job still says SIGTERM and exits 143."""
    import signal

    from helpers import extraction_args

    from pipeline.extract import cli, settings

    def stopped_inside_a_library(s):
        try:
            settings.on_sigterm(signal.SIGTERM, None)
        except settings.Terminated:
            raise KeyboardInterrupt() from None

    monkeypatch.setattr(settings, "SIGNALS_RECEIVED", [])
    monkeypatch.setattr(cli, "SIGNALS_RECEIVED", settings.SIGNALS_RECEIVED)
    monkeypatch.setattr(cli, "run", stopped_inside_a_library)
    rc, log = call(cli.main, extraction_args(extract_dataset, tmp_path / "out", tiny_teachers))
    assert rc == 143 and "SIGTERM: stopped" in log
    monkeypatch.setattr(cli, "run", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))  # a real Ctrl-C
    settings.SIGNALS_RECEIVED.clear()
    rc, log = call(cli.main, extraction_args(extract_dataset, tmp_path / "out", tiny_teachers))
    assert rc == 130 and "interrupted" in log


def test_a_micro_batch_of_a_bf16_store_stays_bf16_with_an_invalid_target(tiny_models):
    """Rows without a valid target are filled with zeros of the store's own decoded dtype: a bf16 store's batch
    is not promoted to float32 by one fp16 zero row."""
    import io

    import torch
    import yaml
    from PIL import Image
    from transformers import AutoTokenizer

    from store import TaskLayout
    from trainer.data import ImageRecipe, PTSample, collate
    from trainer.templates import PromptBuilder, get_template

    cfg = yaml.safe_load(tiny_models.read_text())
    builder = PromptBuilder(AutoTokenizer.from_pretrained(cfg["model"]["llm"]), get_template("llama_3"), max_text_tokens=32)
    image = ImageRecipe.from_pretrained(cfg["model"]["vision_tower"], "square")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    rec = {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}
    for encoding, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        sample = PTSample(builder, image, ["depth"], {"depth": TaskLayout((576, 8), encoding, (24, 24))})
        rows = [sample({"id": str(k), "position": k, "record": rec, "image": buf.getvalue(),
                        "valid": {"depth": k == 0}, "targets": {"depth": torch.ones(576, 8, dtype=dtype) if k == 0
                                                                 else None}}) for k in range(2)]
        assert collate(rows, pad_id=0)["targets"]["depth"].dtype == dtype, encoding


# ---- a damaged teachers.yaml: verify names it, and says how to repair it --------------------------------------

def test_a_damaged_teachers_yaml_is_named_by_verify_and_repaired_from_the_manifest(tmp_path, tiny_teachers, capsys):
    from test_store import create, make_result

    from pipeline import inspect
    from recipes.manifest import load_manifest
    from store import layout

    url = str(tmp_path / "s")
    identity = load_manifest(tiny_teachers).identity(["gen", "depth", "seg"])
    w = create(url, teachers=identity)
    w.commit_shard(make_result(w.manifest, 0))
    (tmp_path / "s" / layout.TEACHERS).write_text("teachers: [unclosed\n  - {")
    assert inspect.main([url, "verify"]) == 1
    said = capsys.readouterr().out
    assert "BAD store: " in said and "teachers.yaml is damaged" in said and "repair-teachers" in said
    assert inspect.main([url, "summary"]) == 2 and "verify` checks it" in capsys.readouterr().err
    assert inspect.main([url, "repair-teachers"]) == 0
    assert inspect.main([url, "verify"]) == 0
    capsys.readouterr()
    (tmp_path / "s" / layout.TEACHERS).write_text("format: olaf.teachers/1\nteachers: {}\n")  # parses, but lies
    assert inspect.main([url, "verify"]) == 1 and "differs from the identity the manifest records" in \
        capsys.readouterr().out


def test_probing_a_teacher_free_store_is_one_line_before_any_model_loads(tmp_path, trained, tiny_teachers):
    """It loaded the model, then failed with 'optimizer got an empty parameter list'."""
    from helpers import one_error_line

    import store
    from trainer.probe import run as probe

    m = store.RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=4, shard_size=4,
                          formats=["wds"], tasks={})
    store.StoreWriter.create(str(tmp_path / "free"), m, SYNTHETIC_TEACHERS)
    rc, log = call(probe, ["--store", tmp_path / "free", "--eval-store", tmp_path / "free", "--model",
                           trained / "export", "--teachers-manifest", tiny_teachers, "--output-dir", tmp_path / "out"])
    assert rc == 2 and "holds no teacher target" in one_error_line(log) and "--tasks gen,depth,seg" in log, log
    assert " probes (" not in log and not (tmp_path / "out" / "checkpoints").exists()  # no model was built


@pytest.mark.parametrize("damage", ["a flipped bit in offset.npy", "a size 1 kB short"])
def test_a_damaged_sample_index_is_one_line_in_the_trainer_never_a_wrong_sample(tmp_path, trainer_store, tiny_models,
                                                                                tiny_teachers, damage):
    """A flipped bit in index/offset.npy, or one sample's size 1 kB short, crashed the trainer with tarfile's
    ReadError from a DataLoader worker. The bytes read are checked to be exactly the expected sample: one line
    naming the index and how to rebuild it."""
    import shutil

    import numpy as np
    from helpers import one_error_line, trainer_args

    import store
    from trainer.pt import run as trainer

    st = tmp_path / "store"
    shutil.copytree(trainer_store, st)
    store.StoreWriter.open(str(st)).build_index()
    index, _ = store.load_index(store.Location(str(st)))
    name = "offset" if "offset" in damage else "size"
    path = st / "index" / f"{name}.npy"
    arr = np.load(path)
    k = len(arr) // 2
    arr[k] = arr[k] ^ 0x200 if name == "offset" else arr[k] - 1024  # a bit of the offset (a block), or 1 kB less
    raw = bytearray(path.read_bytes())
    body = arr.tobytes()
    raw[len(raw) - len(body):] = body  # the same header, one entry changed: the file keeps its size
    path.write_bytes(bytes(raw))
    steps = -(-index.meta["usable"] // 4)  # one epoch: every sample is read
    rc, log = call(trainer, trainer_args(st, tiny_models, tiny_teachers, tmp_path / "run", "--max-steps", str(steps)))
    line = one_error_line(log)
    assert rc == 2 and "index/offset.npy" in line and "inspect" in line and f"{st} index" in line, log
    assert store.load_index(store.Location(str(st)))[0] is not None  # the damage was not caught by its size
