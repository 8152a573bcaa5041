"""Parquet inputs (pipeline/parquet.py): img2dataset's parquet output (image bytes in `jpg`, `key`, `caption`) and
HF datasets' exports (an Image struct {bytes, path}, `text`, no id column), local and on S3; every good row stored
once, every bad row a recorded bad sample, duplicate ids refused, the dataset's identity its files' content."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import extract, extraction_args
from PIL import Image

import store
from pipeline.extract.plan import open_source
from pipeline.inputs import DatasetError
from support.reference import reference_store

BROKEN = set(range(5, 1000, 37))  # bytes that are no image
NO_CAPTION = {11, 500}
NO_IMAGE = {23}


def jpeg(j: int) -> bytes:
    img = Image.new("RGB", (24 + j % 7, 20 + j % 5), ((j * 37) % 256, (j * 91) % 256, (j * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def img2dataset_parquet(folder, n: int = 1000, files: int = 2, row_group: int = 128) -> list:
    """n rows in `files` files: key, caption, jpg (bytes), url, as img2dataset's parquet output writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // files)
    for f in range(files):
        rows = range(f * per, min(n, (f + 1) * per))
        table = pa.table({
            "key": [f"{j:09d}" for j in rows],
            "caption": [None if j in NO_CAPTION else f"a photo number {j}" for j in rows],
            "jpg": [None if j in NO_IMAGE else (b"\x00not a jpeg" if j in BROKEN else jpeg(j)) for j in rows],
            "url": [f"http://example.com/{j}.jpg" for j in rows]})
        pq.write_table(table, folder / f"{f:05d}.parquet", row_group_size=row_group)
    return sorted(folder.glob("*.parquet"))


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    img2dataset_parquet(root / "in")
    return root


def test_a_thousand_rows_with_broken_ones_become_a_store(thousand):
    out = reference_store(thousand / "store", (str(thousand / "in" / "*.parquet"), None), None, tasks=(), shard=100)
    s = store.Store(out)
    assert s.num_samples == 1000 and s.manifest.dataset["kind"] == "parquet"
    bad = BROKEN | NO_CAPTION | NO_IMAGE
    ids = [i for shard in sorted(s.records) for i in s.records[shard].ids]
    assert ids == [f"{j:09d}" for j in range(1000)]  # every row once, in order
    assert list(s.sample_table([]).ids) == [f"{j:09d}" for j in range(1000) if j not in bad]  # the good ones trained
    errors = {e["id"]: e["reason"] for r in s.records.values() for e in r.errors}
    assert set(errors) == {f"{j:09d}" for j in bad}
    assert all("caption" in errors[f"{j:09d}"] for j in NO_CAPTION)
    assert all("no image bytes" in errors[f"{j:09d}"] for j in NO_IMAGE)
    assert all("decode" in errors[f"{j:09d}"].lower() or "image" in errors[f"{j:09d}"].lower() for j in BROKEN)
    assert s.usable_samples([]) == 1000 - len(bad)
    shard, raw = s.find(f"{999:09d}")  # a good row's image bytes and caption, stored as given
    decoded = s.decode(raw, [])
    assert decoded["image"] == jpeg(999) or np.asarray(decoded["image"]).size > 0


def test_the_identity_is_the_files_content_and_a_change_is_another_dataset(tmp_path):
    files = img2dataset_parquet(tmp_path / "in", n=40, files=2, row_group=8)
    a = open_source(str(tmp_path / "in" / "*.parquet"), None, 16).dataset_info()
    assert a["kind"] == "parquet" and [f["rows"] for f in a["files"]] == [20, 20]
    table = pq.read_table(files[1])
    pq.write_table(table.set_column(1, "caption", pa.array(["changed"] * 20)), files[1], row_group_size=8)
    assert open_source(str(tmp_path / "in" / "*.parquet"), None, 16).dataset_info()["sha256"] != a["sha256"]


def test_hf_image_structs_text_and_no_id_column(tmp_path):
    """HF datasets' export: image {bytes, path}, text, no id: ids are <file stem>/<row>; a struct with a path and
    no bytes is read under --image-folder."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.jpg").write_bytes(jpeg(3))
    images = [{"bytes": jpeg(j), "path": None} for j in range(5)] + [{"bytes": None, "path": "x.jpg"}]
    table = pa.table({"image": images, "text": [f"t{j}" for j in range(6)]})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "train-00000.parquet")
    src = open_source(str(tmp_path / "in" / "*.parquet"), str(tmp_path / "imgs"), 4)
    recs = src.records(0, 6)
    assert [r.id for r in recs] == [f"train-00000/{j:09d}" for j in range(6)]
    assert [r.at[0] for r in recs] == ["parquet"] * 5 + ["folder"] and recs[5].at[2] == "x.jpg"
    assert recs[0].caption() == "t0" and all(r.problem is None for r in recs)
    from pipeline.parquet import read_images

    assert read_images([r.at for r in recs[:2]]) == [jpeg(0), jpeg(1)]


def test_named_columns_duplicates_and_a_missing_column(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"uid": ["a", "b", "a"], "img": [jpeg(1)] * 3, "alt": ["x", "y", "z"]}),
                   tmp_path / "in" / "d.parquet")
    with pytest.raises(DatasetError, match="no caption column.*--caption-column"):
        open_source(str(tmp_path / "in" / "d.parquet"), None, 4, columns=(None, None, None))
    with pytest.raises(DatasetError, match="'a' in"):
        open_source(str(tmp_path / "in" / "d.parquet"), None, 4, columns=("img", "alt", "uid"))
    with pytest.raises(DatasetError, match="no column 'pic'"):
        open_source(str(tmp_path / "in" / "d.parquet"), None, 4, columns=("pic", "alt", "uid"))


def test_parquet_on_s3_is_listed_and_read_by_row_group(tmp_path, seaweedfs):
    import fsspec

    from pipeline.parquet import read_images

    files = img2dataset_parquet(tmp_path / "in", n=20, files=2, row_group=4)
    prefix = f"s3://{seaweedfs.bucket}/{tmp_path.name}"
    fs, _ = fsspec.core.url_to_fs(prefix)
    for f in files:
        fs.put(str(f), f"{prefix}/{f.name}")
    src = open_source(f"{prefix}/*.parquet", None, 8)
    assert src.num_samples == 20 and [f["url"] for f in src.dataset_info()["files"]] == \
        [f"{prefix}/{f.name}" for f in files]
    recs = src.records(8, 14)  # across the two files and their row groups
    assert [r.id for r in recs] == [f"{j:09d}" for j in range(8, 14)]
    got = read_images([r.at for r in recs])
    assert [g for g in got if isinstance(g, bytes)] == [jpeg(j) for j in range(8, 14) if j not in BROKEN]


@pytest.mark.slow
def test_the_extraction_job_reads_parquet_on_s3(tmp_path, seaweedfs, tiny_teachers, ray_head):
    import fsspec

    files = img2dataset_parquet(tmp_path / "in", n=24, files=2, row_group=5)
    prefix = f"s3://{seaweedfs.bucket}/{tmp_path.name}"
    fs, _ = fsspec.core.url_to_fs(prefix)
    for f in files:
        fs.put(str(f), f"{prefix}/{f.name}")
    out = tmp_path / "store"
    argv = extraction_args((f"{prefix}/*.parquet", tmp_path), out, tiny_teachers, "--address", ray_head)
    rc, log = extract([*argv, "--tasks", "gen"])
    assert rc == 0, log
    s = store.Store(out)
    valid = [s.get(f"{j:09d}")["valid"].get("gen", False) for j in range(24)]
    assert valid == [j not in (BROKEN | NO_CAPTION | NO_IMAGE) for j in range(24)]
    assert np.isfinite(np.asarray(s.get(f"{0:09d}")["targets"]["gen"])).all()
