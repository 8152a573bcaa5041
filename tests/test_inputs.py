"""Inputs that stream (pipeline/inputs.py): WebDataset tars (local and on S3), a JSONL listing, each planned into
the store's shards without holding the listing; bad members recorded, never fatal; a changed input refused on
resume in one line."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
from helpers import call, one_error_line

import store
from pipeline.extract.plan import make_plan
from pipeline.inputs import DatasetError, list_tar, load_records, read_blob
from recipes.manifest import load_manifest


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tars(dataset, out: Path, per_tar: int = 8, caption: str = "txt") -> tuple[list[Path], list[dict]]:
    """The sample dataset as img2dataset's tars: <id>.jpg (when the record's image exists) and its caption as
    <id>.txt or inside <id>.json; the records in order, for the expected values."""
    json_path, images = dataset
    records = json.loads(Path(json_path).read_text())
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(records), per_tar):
        path = out / f"{k // per_tar:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for r in records[k:k + per_tar]:
                img = Path(images) / r["image"] if r.get("image") else None
                if img is not None and img.is_file():
                    _add(tf, f"{r['id']}.jpg", img.read_bytes())
                text = r["conversations"][-1]["value"]
                if caption == "txt":
                    _add(tf, f"{r['id']}.txt", text.encode())
                else:
                    _add(tf, f"{r['id']}.json", json.dumps({"caption": text, "key": r["id"]}).encode())
        paths.append(path)
    return paths, records


def test_webdataset_tars_are_listed_into_records_with_their_image_bytes(tmp_path, sample_dataset):
    paths, records = write_tars(sample_dataset, tmp_path / "wds")
    plan = make_plan(str(tmp_path / "wds" / f"{{00000..{len(paths) - 1:05d}}}.tar"), None, 5)
    assert plan.num_samples == len(records) and plan.num_shards == -(-len(records) // 5)
    got = [r for i in range(plan.num_shards) for r in plan.shard_records(i)]
    assert [r.id for r in got] == [r["id"] for r in records] and [r.index for r in got] == list(range(len(records)))
    images = Path(sample_dataset[1])
    for r, want in zip(got, records, strict=True):
        assert r.raw["conversations"][-1]["value"] == want["conversations"][-1]["value"]
        path = images / want["image"] if want.get("image") else None
        if path is not None and path.is_file():
            assert r.problem is None and read_blob(r.at) == path.read_bytes(), r.id
        else:
            assert r.at is None and "no image member" in r.problem, r.id
    info = plan.source.dataset_info()
    assert info["kind"] == "webdataset" and len(info["shards"]) == len(paths)
    assert all(s["bytes"] == p.stat().st_size for s, p in zip(info["shards"], paths, strict=True))
    # a caption inside the json member
    json_paths, _ = write_tars(sample_dataset, tmp_path / "wdsj", caption="json")
    other = make_plan(str(json_paths[0]), None, 5, caption_key="json:caption")
    assert [r.raw["conversations"][-1]["value"] for r in other.shard_records(0)] == \
        [r["conversations"][-1]["value"] for r in records[:5]]


@pytest.mark.parametrize("cut", ["inside a member", "between members"])
def test_a_damaged_tar_keeps_its_readable_samples_and_says_why(tmp_path, sample_dataset, cut):
    """A tar cut short (inside a member's data, or cleanly between two members, so that only its missing end
    blocks tell) keeps the samples read before the cut, and says so; the rest of the input is all there; a member
    cut short reads as a bad image, never as other bytes."""
    from recipes.imageops import BadImage

    paths, records = write_tars(sample_dataset, tmp_path / "wds")
    data = paths[0].read_bytes()
    with tarfile.open(paths[0]) as tf:
        members = tf.getmembers()
    m = members[len(members) // 2]
    at = m.offset_data + m.size // 2 if cut == "inside a member" else m.offset
    paths[0].write_bytes(data[:at])
    listing = list_tar(str(paths[0]))
    assert listing["problem"] and 0 < len(listing["samples"]) < 8
    plan = make_plan(str(tmp_path / "wds" / f"{{00000..{len(paths) - 1:05d}}}.tar"), None, 4)
    (warning,) = plan.source.warnings()
    assert paths[0].name in warning and ("cut short" in warning or "cannot be read past" in warning), warning
    assert plan.num_samples == len(records) - 8 + len(listing["samples"])
    for r in (r for i in range(plan.num_shards) for r in plan.shard_records(i) if r.at is not None):
        try:
            assert len(read_blob(r.at)) == r.at[3]
        except BadImage as e:
            assert "could be read" in str(e) and r.at[1] == str(paths[0])


def test_a_changed_input_tar_is_refused_on_resume_in_one_line(tmp_path, sample_dataset, tiny_teachers):
    from helpers import extraction_args

    from pipeline.extract.cli import main as extraction_main

    paths, _ = write_tars(sample_dataset, tmp_path / "wds")
    pattern = str(tmp_path / "wds" / f"{{00000..{len(paths) - 1:05d}}}.tar")
    plan = make_plan(pattern, None, 5)
    m = store.RunManifest(dataset=plan.source.dataset_info(), num_samples=plan.num_samples, shard_size=5,
                          formats=["zarr", "wds"], tasks={})
    store.StoreWriter.create(str(tmp_path / "store"), m, load_manifest(tiny_teachers).identity([]))
    argv = extraction_args(("unused", "unused"), tmp_path / "store", tiny_teachers, "--tasks", "none",
                           "--plan-only")
    argv[argv.index("--data-path") + 1] = pattern
    del argv[argv.index("--image-folder"):argv.index("--image-folder") + 2]
    argv[argv.index("--shard-size") + 1] = "5"
    rc, log = call(extraction_main, argv)
    assert rc == 0 and "plan OK" in log, log
    with tarfile.open(paths[1], "a") as tf:  # one more sample in the second tar
        _add(tf, "extra.txt", b"a new caption")
    rc, log = call(extraction_main, argv)
    assert rc == 2 and f"{paths[1].name} changed" in log and "the dataset differs" in log, log


def test_webdataset_tars_on_s3(tmp_path, sample_dataset, seaweedfs):
    paths, records = write_tars(sample_dataset, tmp_path / "wds")
    loc = store.Location(f"s3://{seaweedfs.bucket}/inputs-{uuid.uuid4().hex[:8]}")
    for p in paths:
        loc.write_bytes(p.name, p.read_bytes())
    plan = make_plan(f"{loc.url}/{{00000..{len(paths) - 1:05d}}}.tar", None, 8)
    local = make_plan(str(tmp_path / "wds" / f"{{00000..{len(paths) - 1:05d}}}.tar"), None, 8)
    assert plan.num_samples == local.num_samples == len(records)
    s3, here = plan.shard_records(1), local.shard_records(1)
    assert [r.id for r in s3] == [r.id for r in here]
    for a, b in zip(s3, here, strict=True):
        assert (a.at is None) == (b.at is None)
        if a.at is not None:
            assert read_blob(a.at) == read_blob(b.at)
    assert [s["sha256"] for s in plan.source.dataset_info()["shards"]] == [s["sha256"] for s in local.source.dataset_info()["shards"]]


def write_listing(dataset, path: Path) -> tuple[Path, list]:
    """The sample dataset as a JSONL listing (a LLaVA record per line); (its path, the records)."""
    records, _ = load_records(dataset[0])
    path.write_text("".join(json.dumps(r.raw) + "\n" for r in records))
    return path, records


def test_a_jsonl_listing_is_read_shard_by_shard(tmp_path, sample_dataset):
    images = sample_dataset[1]
    listing, records = write_listing(sample_dataset, tmp_path / "listing.jsonl")
    plan = make_plan(str(listing), images, 6)
    assert not hasattr(plan.source, "_records")  # nothing but shard offsets is held
    got = [r for i in range(plan.num_shards) for r in plan.shard_records(i)]
    assert [(r.index, r.id, r.image, r.raw) for r in got] == [(r.index, r.id, r.image, r.raw) for r in records]
    assert len(plan.source.starts) == plan.num_shards
    assert make_plan(str(listing), images, 6, limit=7).num_samples == 7
    # {"id", "image", "caption"} lines are LLaVA records of that caption
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"id": "a", "image": records[0].image, "caption": "a cat"}) + "\n")
    (one,) = make_plan(str(short), images, 6).shard_records(0)
    assert one.raw["conversations"][-1] == {"from": "gpt", "value": "a cat"} and one.image == records[0].image
    # every structural problem at once, duplicates included
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0].raw) + "\n" + "{not json\n" + json.dumps(records[0].raw) + "\n" + "[1]\n")
    with pytest.raises(DatasetError) as e:
        make_plan(str(bad), images, 6)
    said = str(e.value)
    assert "line 2: not JSON" in said and "duplicate id" in said and "line 4" in said


def test_an_input_that_is_not_there_is_one_line(tmp_path, tiny_teachers):
    from helpers import extraction_args

    from pipeline.extract.cli import main as extraction_main

    argv = extraction_args((tmp_path / "none-{000..002}.tar", tmp_path), tmp_path / "out", tiny_teachers, "--plan-only")
    rc, log = call(extraction_main, argv)
    assert rc == 2 and "none-000.tar" in one_error_line(log), log


@pytest.mark.slow
def test_vlora_trains_from_a_teacher_free_store_of_tars_that_later_gains_the_teachers(tmp_path, trainer_dataset,
                                                                                      tiny_models, tiny_teachers,
                                                                                      ray_head):
    """img2dataset-style tars -> a store without teachers (images, captions, ids) -> VLoRA's PT trains from it;
    the same store then gains the three teachers' targets (`--tasks gen,depth,seg`) and OLA-VLM's PT trains."""
    from helpers import extract, trainer_args
    from test_vlora import vlora_args

    from pipeline import inspect
    from trainer.pt import run as trainer

    paths, records = write_tars(trainer_dataset, tmp_path / "wds", per_tar=10)
    out = tmp_path / "store"
    argv = ["--data-path", str(tmp_path / "wds" / f"{{00000..{len(paths) - 1:05d}}}.tar"), "--output", str(out),
            "--teachers-manifest", str(tiny_teachers), "--shard-size", "8", "--batch-size", "4", "--torch-threads",
            "1", "--no-progress", "--address", ray_head]
    rc, log = extract(argv + ["--tasks", "none"])
    assert rc == 0 and "tasks none" in log, log
    s = store.Store(str(out))
    assert s.tasks == [] and s.num_samples == len(records) and s.done_shards([]) == list(range(s.num_shards))
    rc, log = call(trainer, vlora_args(out, tiny_models, tiny_teachers, tmp_path / "vlora", "--max-steps", "2"))
    assert rc == 0, log
    rc, log = extract(argv + ["--tasks", "gen,depth,seg"])
    assert rc == 0, log
    s = store.Store(str(out))
    assert s.tasks == ["gen", "depth", "seg"] and s.done_shards(["gen", "depth", "seg"]) == list(range(s.num_shards))
    assert call(inspect.main, [out, "verify", "--full"])[0] == 0
    rc, log = call(trainer, trainer_args(out, tiny_models, tiny_teachers, tmp_path / "ola", "--max-steps", "2"))
    assert rc == 0, log
    rows = [json.loads(x) for x in (tmp_path / "ola" / "logs" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > r["ntp"] for r in rows)  # the embedding losses are in


# ---- reliability, round five: what the new inputs could store wrongly -------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w", fmt=tarfile.PAX_FORMAT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            _add(tf, name, data)
    return path


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20 + seed, 16), (seed * 40 % 256, 90, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_duplicate_keys_across_tars_are_refused_and_id_prefix_makes_them_unique(tmp_path, tiny_teachers):
    """Two img2dataset outputs read together, both with keys 000000000..3: 8 samples under 4 ids before. Refused in
    one line naming both tars and the first key; --id-prefix tar gives every sample an id of its own."""
    from helpers import extraction_args

    from pipeline.extract.cli import main as extraction_main

    for name in ("cc", "laion"):
        _tar(tmp_path / name / "00000.tar", [m for j in range(4) for m in
                                             ((f"{j:09d}.jpg", _jpeg(j)), (f"{j:09d}.txt", f"{name} {j}".encode()))])
    pattern = str(tmp_path / "{cc,laion}" / "00000.tar")
    with pytest.raises(DatasetError) as e:
        make_plan(pattern, None, 4)
    said = str(e.value)
    assert "'000000000'" in said and str(tmp_path / "cc" / "00000.tar") in said and \
        str(tmp_path / "laion" / "00000.tar") in said and "--id-prefix tar" in said, said
    plan = make_plan(pattern, None, 4, id_prefix="tar")
    got = [r for i in range(plan.num_shards) for r in plan.shard_records(i)]
    assert [r.id for r in got] == [f"{d}/00000/{j:09d}" for d in ("cc", "laion") for j in range(4)]
    assert [r.caption() for r in got] == [f"{d} {j}" for d in ("cc", "laion") for j in range(4)]
    assert plan.source.dataset_info()["sha256"] != make_plan(str(tmp_path / "cc" / "00000.tar"), None, 4).source.dataset_info()["sha256"]
    # the command: one line, and the refusal names the way out
    argv = extraction_args((pattern, tmp_path), tmp_path / "out", tiny_teachers, "--tasks", "none", "--plan-only")
    del argv[argv.index("--image-folder"):argv.index("--image-folder") + 2]
    rc, log = call(extraction_main, argv)
    assert rc == 2 and "--id-prefix tar" in one_error_line(log), log
    rc, log = call(extraction_main, argv + ["--id-prefix", "tar"])
    assert rc == 0 and "plan OK" in log, log
    # duplicates inside one tar too (a key that comes back after another)
    one = _tar(tmp_path / "one.tar", [("a.jpg", _jpeg(1)), ("a.txt", b"x"), ("b.jpg", _jpeg(2)), ("b.txt", b"y"),
                                      ("a.jpg", _jpeg(3)), ("a.txt", b"z")])
    with pytest.raises(DatasetError, match="'a'"):
        make_plan(str(one), None, 4)


def test_member_suffixes_match_whatever_their_case(tmp_path):
    """IMG_000.JPG + IMG_000.TXT: every caption was missed and each sample stored bad as 'no caption'."""
    img = [_jpeg(k) for k in range(3)]
    txt = _tar(tmp_path / "txt.tar", [("IMG_000.JPG", img[0]), ("IMG_000.TXT", b"upper"),
                                      ("IMG_001.Jpg", img[1]), ("IMG_001.Txt", b"mixed"),
                                      ("IMG_002.jpeg", img[2]), ("IMG_002.txt", b"lower")])
    got = make_plan(str(txt), None, 8).shard_records(0)
    assert [(r.problem, r.caption(), read_blob(r.at)) for r in got] == \
        [(None, c, i) for c, i in zip(("upper", "mixed", "lower"), img, strict=True)]
    js = _tar(tmp_path / "json.tar", [("IMG_000.PNG", img[0]), ("IMG_000.JSON", json.dumps({"caption": "c0"}).encode())])
    (r,) = make_plan(str(js), None, 8, caption_key="json:caption").shard_records(0)
    assert r.problem is None and r.caption() == "c0" and read_blob(r.at) == img[0]
    (r,) = make_plan(str(js), None, 8, caption_key="JSON:caption", image_keys=("PNG",)).shard_records(0)
    assert r.problem is None and r.caption() == "c0"


def test_compressed_tars_are_read_and_a_tar_with_nothing_readable_is_an_error(tmp_path):
    """A .tar.gz among the inputs was read as a damaged tar: a store 'finished' with half its samples. It is read
    whole (its images from the decompressed stream); an input from which nothing can be read is an error."""
    import gzip

    images = {f"s{j}": _jpeg(j) for j in range(16)}
    members = [[(f"s{j}.jpg", images[f"s{j}"]), (f"s{j}.txt", f"caption {j}".encode())] for j in range(16)]
    _tar(tmp_path / "in" / "00000.tar", [m for s in members[:8] for m in s])
    _tar(tmp_path / "in" / "00001.tar.gz", [m for s in members[8:] for m in s], mode="w:gz")
    plan = make_plan(str(tmp_path / "in" / "{00000.tar,00001.tar.gz}"), None, 5)
    assert plan.num_samples == 16 and not any("cannot be read" in w for w in plan.source.warnings())
    got = [r for i in range(plan.num_shards) for r in plan.shard_records(i)]
    assert [r.problem for r in got] == [None] * 16
    from pipeline.inputs import read_blobs

    assert read_blobs([r.at for r in reversed(got)]) == [images[r.id] for r in reversed(got)]
    # a tar cut short keeps its readable samples (as before); a file with nothing readable is refused, named
    (tmp_path / "in" / "00002.tar.gz").write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(DatasetError) as e:
        make_plan(str(tmp_path / "in" / "{00000.tar,00002.tar.gz}"), None, 5)
    assert "00002.tar.gz: nothing in it can be read" in str(e.value), e.value


def test_a_member_name_that_is_not_utf8_is_one_bad_sample_and_its_neighbours_are_stored(tmp_path):
    """A Latin-1 byte in one member name made its whole shard fail on every retry. That sample is bad (its name
    escaped in the reason), the others of its shard are stored."""
    from pipeline.extract.decode import decode_batch

    latin = b"caf\xe9".decode("utf-8", "surrogateescape")
    path = _tar(tmp_path / "in.tar", [("a.jpg", _jpeg(1)), ("a.txt", b"first"), (f"{latin}.jpg", _jpeg(2)),
                                      (f"{latin}.txt", b"second"), ("c.jpg", _jpeg(3)), ("c.txt", b"third")],
                fmt=tarfile.GNU_FORMAT)
    plan = make_plan(str(path), None, 8)
    records = plan.shard_records(0)
    assert [r.id for r in records] == ["a", "caf\\xe9", "c"]
    assert records[1].problem and "not UTF-8" in records[1].problem and "caf\\\\xe9" in records[1].problem
    decoded = decode_batch(records, [])
    assert [s.error is None for s in decoded.samples] == [True, False, True]
    m = store.RunManifest(dataset=plan.source.dataset_info(), num_samples=3, shard_size=8, formats=["zarr", "wds"], tasks={})
    w = store.StoreWriter.create(str(tmp_path / "store"), m, {"format": 1, "name": "none", "teachers": {}})
    from pipeline.extract.compute import assemble_shard

    rec = w.commit_shard(assemble_shard(m, 0, (), [decoded], []))
    assert rec.ids == ["a", "caf\\xe9", "c"] and rec.bad_images == 1
    assert "not UTF-8" in rec.errors[0]["reason"]


def test_a_caption_too_large_is_said_so_not_called_missing(tmp_path):
    path = _tar(tmp_path / "in.tar", [("a.jpg", _jpeg(1)), ("a.txt", b"x" * (2 << 20)), ("b.jpg", _jpeg(2)),
                                      ("b.txt", b"fine")])
    a, b = make_plan(str(path), None, 8).shard_records(0)
    assert "2,097,152 bytes, over the 1,048,576" in a.problem and "no caption" not in a.problem, a.problem
    assert b.problem is None and b.caption() == "fine"
    # the message for a sample without an image names the user's --image-keys, not the defaults
    (c,) = make_plan(str(_tar(tmp_path / "c.tar", [("c.gif", b"GIF89a"), ("c.txt", b"c")])), None, 8,
                     image_keys=("png", "tif")).shard_records(0)
    assert "no image member (c.{png/tif})" in c.problem, c.problem
