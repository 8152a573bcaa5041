"""The store format: round trips, exactly-once commits, verification, teacher checks, the inspection CLI -- on a
local folder and on a real S3-compatible server (SeaweedFS on loopback) alike."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNTHETIC_TEACHERS
from PIL import Image

import store
from pipeline import inspect
from recipes.manifest import load_manifest
from store import Location, SampleResult, ShardResult, Store, StoreError, StoreWriter, TaskLayout, encodings, layout
from store.fs import temp_name

N, S = 10, 4
LAYOUTS = {"gen": TaskLayout((1, 16), "fp16"), "depth": TaskLayout((576, 32), "fp16", (24, 24)),
           "seg": TaskLayout((576, 24), "fp16", (24, 24))}


def truth(task: str, index: int) -> torch.Tensor:
    """The float32 target of sample `index`, reproducible anywhere (other processes too)."""
    g = torch.Generator().manual_seed(1000 * index + len(task))
    t, w = LAYOUTS[task].shape
    base = torch.randn(t, w, generator=g)
    if task == "depth":  # give the depth grid spatial structure, as real features have
        rows = torch.arange(t) // 24
        base[:, 0] += rows.float() * 3
    return base


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + i, 30), (10 * i % 255, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def make_result(manifest: store.RunManifest, shard: int, tasks=("gen", "depth", "seg"), bad=(5,)) -> ShardResult:
    start, stop = manifest.shard_range(shard)
    samples = [SampleResult(index=j, id=f"{j:09d}", record={"id": f"{j:09d}", "conversations": [{"from": "gpt",
               "value": f"caption {j}"}]}, image=f"{j:09d}"[:5] + f"/{j:09d}.jpg",
               image_bytes=None if j in bad else jpeg(j), error="image file not found" if j in bad else None)
               for j in range(start, stop)]
    values, scales, valid = {}, {}, {}
    for t in tasks:
        enc = manifest.tasks[t].encoding
        x = torch.stack([truth(t, j) if j not in bad else torch.zeros(LAYOUTS[t].shape) for j in range(start, stop)])
        values[t], scales[t] = encodings.encode(x, enc)
        valid[t] = np.array([j not in bad for j in range(start, stop)])
    return ShardResult(shard, tuple(tasks), samples, values, scales, valid)


def create(url, encoding="fp16", formats=("zarr", "wds"), tasks=("gen", "depth", "seg"), compression="none",
           teachers=SYNTHETIC_TEACHERS) -> StoreWriter:
    layouts = {t: TaskLayout(LAYOUTS[t].shape, encoding, LAYOUTS[t].grid) for t in tasks}
    m = store.RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=N, shard_size=S,
                          formats=list(formats), tasks=layouts, zarr_compression=compression)
    return StoreWriter.create(url, m, teachers)


def flip(loc: Location, name: str, at: int, mask: int = 0x01) -> None:
    b = bytearray(loc.read_bytes(name))
    b[at] ^= mask
    loc.write_bytes(name, bytes(b))


@pytest.fixture
def identity(tiny_teachers):
    return load_manifest(tiny_teachers).identity(["gen", "depth", "seg"], {"gen": "a" * 64, "depth": "b" * 64,
                                                                         "seg": "c" * 64})


@pytest.fixture
def full_store(store_root, identity):
    """A 3-shard store, on a local folder or on S3 (the test runs for both): its URL."""
    url = store_root("store")
    w = create(url, teachers=identity)
    for i in range(w.manifest.num_shards):
        w.commit_shard(make_result(w.manifest, i))
    w.rebuild_errors()
    return url


@pytest.mark.parametrize("encoding", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_both_formats(tmp_path, encoding, compression):
    path = tmp_path / "s"
    w = create(path, encoding=encoding, compression=compression)
    for i in range(w.manifest.num_shards):
        w.commit_shard(make_result(w.manifest, i))
    s = Store(path)
    assert s.done_shards() == [0, 1, 2] and s.pending_shards() == []
    assert len(s.tar_urls(check="sha256")) == 3
    tol = {"fp16": 1e-3, "bf16": 8e-3, "fp8": 4e-2}[encoding]
    seen = 0
    for shard in s.done_shards():
        for d in s.iter_decoded(shard, ["gen", "depth", "seg"]):
            z = s.get(d["id"])
            j = d["index"]
            assert d["id"] == f"{j:09d}" and d["record"]["conversations"][0]["value"] == f"caption {j}"
            if j == 5:
                assert d["valid"] == {"gen": False, "depth": False, "seg": False} and d["image"] is None
                assert z["targets"] == {}
                continue
            assert d["image"] == jpeg(j)
            for t in ("gen", "depth", "seg"):
                x = truth(t, j)
                err = float((d["targets"][t] - x).norm() / x.norm())
                assert err < tol, (encoding, t, err)
                assert torch.equal(d["targets"][t], z["targets"][t])  # both formats hold the same bytes
            seen += 1
    assert seen == N - 1


def test_lossless_encodings_are_exact():
    x = torch.randn(2, 576, 64)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        v, sc = encodings.encode(x.to(dtype), name)
        assert torch.equal(encodings.decode(v, sc, name, dtype), x.to(dtype))
    with pytest.raises(ValueError, match="unknown encoding"):
        encodings.get("int8")  # measured candidate, not a store option


@pytest.mark.parametrize("encoding", ["fp16", "fp8"])
def test_shard_objects_are_the_bytes_zarr_itself_writes(tmp_path, encoding):
    """write_shard builds the target arrays' shard objects itself (one buffer, one copy); zarr-python writing the
    same rows into a twin store gives the same bytes, the last, shorter shard (2 of 4 rows) included; rows of
    failed samples are all zero (the fill): left out of the shard, and a shard of only such rows is no object."""
    from store import zarr_io

    w = create(tmp_path / "ours", encoding=encoding, formats=("zarr",))
    m = w.manifest
    create(tmp_path / "zarrs", encoding=encoding, formats=("zarr",))
    ours, theirs = Location(tmp_path / "ours"), Location(tmp_path / "zarrs")
    g = zarr_io.open_group(theirs, "r+")
    for i in range(m.num_shards):
        r = make_result(m, i, bad=(5, 8, 9))
        rec = w.write(r)
        start, stop = m.shard_range(i)
        for t in r.tasks:
            assert zarr_io.plain_sharding(g[t])
            g[t][start:stop] = r.values[t]
            if m.tasks[t].scaled:
                g[layout.scale_array(t)][start:stop] = r.scales[t]
        targets = [n for n in rec.files if n.split("/")[1] in (*r.tasks, *(layout.scale_array(t) for t in r.tasks))]
        assert len(targets) == (6 if encoding == "fp8" else 3)
        for name in targets:
            assert ours.size(name) == theirs.size(name), name
            if i == m.num_shards - 1 and name.split("/")[1] in r.tasks:  # (a failed row's fp8 scale is 1)
                assert ours.size(name) is None and rec.files[name] == {"absent": True}, name
            else:
                assert ours.read_bytes(name) == theirs.read_bytes(name), name
    assert m.shard_range(m.num_shards - 1) == (8, 10)


def test_encoded_arrays_are_contiguous_for_transposed_teacher_outputs():
    """A (B, C, tokens) feature map transposed to (B, tokens, C), as the seg teacher returns it: the encoded
    arrays are C-contiguous (else Ray pickles them in-band and np.save copies them), with the same values."""
    x = torch.randn(2, 96, 49).transpose(1, 2)
    for name in ("fp16", "bf16", "fp8", "int8"):
        values, scale = encodings.encode(x, name)
        assert values.flags["C_CONTIGUOUS"] and (scale is None or scale.flags["C_CONTIGUOUS"]), name
        assert torch.equal(encodings.decode(values, scale, name), encodings.decode(*encodings.encode(x.contiguous(), name), name))


def _commit_in_child(url, shard):
    w = StoreWriter.open(url)
    w.commit_shard(make_result(w.manifest, shard))


def test_concurrent_writers_in_separate_processes(store_root, full_store):
    url = store_root("conc")
    m = create(url).manifest
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_commit_in_child, args=(url, i)) for i in range(m.num_shards)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert Store(url).done_shards() == [0, 1, 2]
    assert store.verify_store(Store(url), full=True, progress=False)["ok"]
    # the same content as a store written one shard after another, file for file
    for rel, info in Store(full_store).records[1].files.items():
        assert Store(url).records[1].files[rel]["sha256"] == info["sha256"], rel
    # a second writer of a committed shard is refused at the commit point (conditional create)
    rec = Store(url).records[1]
    with pytest.raises(StoreError, match="already has a record"):
        StoreWriter.open(url).commit(rec)


def test_flipped_bytes_are_caught_and_named(full_store, capsys):
    assert inspect.main([full_store, "verify"]) == 0
    loc = Location(full_store)
    flip(loc, layout.tar_name(1), loc.size(layout.tar_name(1)) // 2)
    flip(loc, "targets.zarr/seg/c/2/0/0", 100, 0x80)  # written out here, as a reader in another language would
    capsys.readouterr()
    assert inspect.main([full_store, "verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD shard 1: wds/shard-000001.tar: sha256 mismatch" in out
    assert "BAD shard 2: targets.zarr/seg/c/2/0/0: sha256 mismatch" in out
    assert "BAD shard 0" not in out
    # zarr's own per-chunk crc32c refuses the flipped chunk too
    with pytest.raises(Exception, match="checksum"):
        Store(full_store).get(f"{8:09d}", ["seg"])
    # and the trainer's reader refuses the damaged tar before streaming it
    with pytest.raises(StoreError, match="shard 1 is damaged"):
        Store(full_store).tar_urls(check="sha256")


def test_truncated_or_missing_shard_files(full_store, tmp_path, capsys):
    loc = Location(full_store)
    loc.write_bytes(layout.tar_name(0), loc.read_bytes(layout.tar_name(0))[:1000])
    loc.remove(layout.tar_name(2))
    with pytest.raises(StoreError, match="shard 0 is damaged.*truncated"):
        Store(full_store).tar_urls()
    assert inspect.main([full_store, "verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD shard 0" in out and "BAD shard 2: wds/shard-000002.tar: missing" in out
    for cmd in (["show", f"{1:09d}"], ["render", f"{1:09d}", "--out", str(tmp_path / "x.png")]):
        assert inspect.main([full_store, *cmd]) == 2  # one message, no traceback
    err = capsys.readouterr().err
    assert "cannot read" in err and "verify" in err and "Traceback" not in err


class Crash(BaseException):
    pass


@pytest.mark.parametrize("crash_after", ["zarr", "tar"])
def test_half_written_shard_is_never_read(store_root, monkeypatch, crash_after):
    """A crash at each point of a commit: before the record exists the shard is not done and nothing of it is
    read; verify names what is left over; a redo gives the bytes of an uninterrupted commit."""
    url = store_root("half")
    loc = Location(url)
    w = create(url)
    m = w.manifest
    w.commit_shard(make_result(m, 0))
    from store import tar, zarr_io

    module, name = (tar, "write_tar") if crash_after == "tar" else (zarr_io, "shard_objects")
    real = getattr(module, name)

    def crash(*a, **k):
        real(*a, **k)
        raise Crash(f"killed after the {crash_after} data")

    monkeypatch.setattr(module, name, crash)
    with pytest.raises(Crash):
        w.commit_shard(make_result(m, 1))
    monkeypatch.undo()
    s = Store(url)
    assert s.done_shards() == [0] and 1 in s.pending_shards()
    assert s.tar_urls() == [loc.url_of(layout.tar_name(0))]
    with pytest.raises(KeyError):
        s.get(f"{4:09d}")
    v = store.verify_store(s, progress=False)
    assert v["ok"] and v["orphans"] == ([layout.tar_name(1)] if crash_after == "tar" else [])
    assert w.recover() == ([f"{layout.tar_name(1)}: removed (left by an interrupted write)"]
                           if crash_after == "tar" else [])
    if loc.local:  # a writer killed mid-object leaves a temporary file in the Zarr tree (ours or zarr-python's)
        for temp in (temp_name(layout.ZARR + "/seg/c/1/0/0"), layout.ZARR + "/seg/c/1/0/0.0123abcd.partial"):
            Path(loc.path(temp)).parent.mkdir(parents=True, exist_ok=True)
            Path(loc.path(temp)).write_bytes(b"half")
        elsewhere = store.Leases(loc, "elsewhere:1:x")
        assert elsewhere.take(1)  # while another job holds the shard, they are its
        assert store.orphans(loc) == []
        elsewhere.release(1)
        assert len(w.recover()) == 2 and store.orphans(loc) == []
        assert not any(".tmp-" in f or f.endswith(".partial") for f in os.listdir(loc.path(layout.ZARR + "/seg/c/1/0")))
    # the redo: the same bytes as a shard committed in one go elsewhere
    w.commit_shard(make_result(m, 1))
    ref = store_root("half-ref")
    create(ref).commit_shard(make_result(m, 1))
    got, want = Store(url).records[1].files, Store(ref).records[1].files
    assert got.keys() == want.keys() and all(got[k]["sha256"] == want[k]["sha256"] for k in got)


def test_a_redo_takes_the_record_away_first(full_store):
    """A shard being rewritten is not done: its old record never vouches for new, half-written data."""
    loc = Location(full_store)
    prev = StoreWriter.open(full_store).redo(1)
    assert prev.tasks == ["gen", "depth", "seg"] and not loc.exists(layout.record_name(1))
    assert Store(full_store).done_shards() == [0, 2]


def test_damaged_records_are_no_commit(full_store, capsys):
    loc = Location(full_store)
    loc.write_bytes(layout.record_name(0), b"[1, 2]")
    d = json.loads(loc.read_bytes(layout.record_name(1)))
    del d["files"]
    loc.write_bytes(layout.record_name(1), json.dumps(d).encode())
    s = Store(full_store)
    assert s.done_shards() == [2]
    assert "not a JSON object" in s.damaged_records[0] and "missing fields ['files']" in s.damaged_records[1]
    assert inspect.main([full_store, "verify", "--json"]) == 1
    v = json.loads(capsys.readouterr().out)
    assert set(v["bad_shards"]) == {"0", "1"}


def test_adding_a_task_keeps_what_is_there(store_root):
    one, two = store_root("one"), store_root("two")
    w1 = create(one)
    for i in range(3):
        w1.commit_shard(make_result(w1.manifest, i))
    w2 = create(two)
    for i in range(3):
        w2.commit_shard(make_result(w2.manifest, i, tasks=("gen", "depth")))
    assert Store(two).done_shards(["seg"]) == [] and Store(two).done_shards(["gen"]) == [0, 1, 2]
    for i in range(3):
        w2.commit_shard(make_result(w2.manifest, i, tasks=("seg",)))
    a, b = Store(one), Store(two)
    for i in range(3):  # byte-identical data files to a one-pass store
        fa, fb = a.records[i].files, b.records[i].files
        assert fa.keys() == fb.keys()
        for rel in fa:
            assert fa[rel]["sha256"] == fb[rel]["sha256"], rel
        assert a.records[i].tasks == b.records[i].tasks == ["gen", "depth", "seg"]


def test_reader_refuses_what_does_not_match(full_store, identity, tiny_teachers):
    s = Store(full_store)
    s.require(["gen", "depth", "seg"], expected_teachers=identity, formats=["wds"])
    corrected = load_manifest(tiny_teachers, fidelity="corrected").identity(["depth"])
    with pytest.raises(StoreError, match=r"teacher mismatch: depth: recipe differs \(fields: preprocess, quirks_applied\)"):
        s.require(["depth"], expected_teachers=corrected)
    other = json.loads(json.dumps(identity))
    other["teachers"]["gen"]["weights_sha256"] = "d" * 64
    with pytest.raises(StoreError, match="gen: weights sha256 differs"):
        s.require(["gen"], expected_teachers=other)
    with pytest.raises(StoreError, match="teacher mismatch: depth"):  # the random-access reader checks too
        Store(full_store, expected_teachers=corrected, tasks=["depth"]).get(f"{0:09d}")
    assert Store(full_store, expected_teachers=identity).get(f"{0:09d}")["valid"]["seg"]
    with pytest.raises(StoreError, match=r"tasks \['normals'\] are not in the store"):
        s.require(["normals"])
    Location(full_store).remove(layout.record_name(2))
    with pytest.raises(StoreError, match="1 of 3 shards are not done"):
        Store(full_store).require(["gen"])
    Store(full_store).require(["gen"], allow_partial=True)


def test_bad_paths_and_versions_give_one_message(tmp_path, full_store, capsys):
    assert inspect.main([str(tmp_path / "absent"), "summary"]) == 2
    (tmp_path / "empty").mkdir()
    assert inspect.main([str(tmp_path / "empty"), "summary"]) == 2
    loc = Location(full_store)
    m = json.loads(loc.read_bytes(layout.MANIFEST))
    m["format"] = "olaf.store/0"
    loc.write_bytes(layout.MANIFEST, json.dumps(m).encode())
    assert inspect.main([full_store, "summary"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not an olaf store" in err and "olaf.store/0" in err
    assert "Traceback" not in err
    loc.write_bytes(layout.MANIFEST, b"{not json")
    assert inspect.main([full_store, "stats"]) == 2


def test_cli_summary_stats_show_render(full_store, tmp_path, capsys):
    assert inspect.main([full_store, "--json", "summary"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert inspect.main([full_store, "summary", "--json"]) == 0  # the flag after the command works too
    assert json.loads(capsys.readouterr().out)["samples"] == N
    assert d["samples"] == N and d["shards"] == {"total": 3, "done": 3, "pending": 0, "started": 3}
    assert d["bad_images"] == 1 and d["tasks"]["depth"]["valid"] == N - 1
    assert d["teachers"]["name"] == "ola_vlm_tiny_random" and d["bytes"]["total"] > 0
    assert inspect.main([full_store, "summary"]) == 0
    assert "RANDOM-WEIGHT" in capsys.readouterr().out
    assert inspect.main([full_store, "--json", "stats", "--per-shard"]) == 0
    st = json.loads(capsys.readouterr().out)
    want = torch.cat([truth("gen", j).reshape(-1) for j in range(N) if j != 5]).to(torch.float16).double()
    assert st["overall"]["gen"]["values"] == want.numel()
    assert abs(st["overall"]["gen"]["mean"] - want.mean().item()) < 1e-9
    assert abs(st["overall"]["gen"]["max"] - want.max().item()) < 1e-9 and st["overall"]["gen"]["nan"] == 0
    assert set(st["per_shard"]) == {"0", "1", "2"}
    assert inspect.main([full_store, "show", f"{3:09d}"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["zarr_equals_wds"] is True and d["targets"]["depth"]["shape"] == [576, 32]
    assert d["record"]["conversations"][0]["value"] == "caption 3"
    png = tmp_path / "r.png"
    assert inspect.main([full_store, "render", f"{3:09d}", "--out", str(png)]) == 0
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[1] >= 3 * 256 and img.shape[0] > 256
    depth_panel = img[60:60 + 256, 8 + 264:8 + 264 + 256].astype(float)  # 2-line title, label; 2nd panel
    # the depth truth varies with the grid row: the first principal component (red) must follow the rows
    red_by_row = depth_panel[..., 0].mean(axis=1)
    corr = np.corrcoef(red_by_row, np.arange(256))[0, 1]
    assert abs(corr) > 0.9, corr
    assert inspect.main([full_store, "show", "nope"]) == 2


def test_stream_yields_what_training_needs(full_store, identity):
    s = store.TargetStream(full_store, ["gen", "depth", "seg"], expected_teachers=identity, global_batch=3,
                           micro_batch=3, stop_step=3)
    rows = [r for b in s for r in b["rows"]]
    assert len(rows) == 9 and sorted(r["index"] for r in rows) == [j for j in range(N) if j != 5]  # 5: a bad image
    for d in rows:
        j = d["index"]
        assert d["id"] == f"{j:09d}" and d["image"] == jpeg(j) and d["record"]["conversations"][0]["value"] == f"caption {j}"
        assert d["valid"] == {"gen": True, "depth": True, "seg": True}
        assert d["targets"]["depth"].dtype == torch.float16 and d["targets"]["depth"].shape == (576, 32)
        torch.testing.assert_close(d["targets"]["depth"].float(), truth("depth", j), atol=2e-3, rtol=1e-3)
    with pytest.raises(StoreError, match="teacher mismatch"):
        other = json.loads(json.dumps(identity))
        other["teachers"]["seg"]["weights"] = {"repo_id": "someone/else"}
        other["teachers"]["seg"]["weights_sha256"] = None  # as the trainer's side, which never loads teachers
        store.TargetStream(full_store, ["seg"], expected_teachers=other, global_batch=1, micro_batch=1)


def test_weights_that_only_moved_are_accepted_with_a_note(full_store, identity):
    """A teacher manifest copied elsewhere resolves its `path:` weights elsewhere: not a mismatch, a note."""
    moved = json.loads(json.dumps(identity))
    for t in moved["teachers"].values():
        t["weights"] = {**t["weights"], "path": "/somewhere/else/" + t["weights"]["path"].rsplit("/", 1)[-1]}
        t["weights_sha256"] = None
    stream = store.TargetStream(full_store, ["gen", "seg"], expected_teachers=moved, global_batch=1, micro_batch=1)
    assert len(stream.notes) == 2 and all("only the location differs" in n for n in stream.notes)
    assert "/somewhere/else/gen" in stream.notes[0] and identity["teachers"]["gen"]["weights_sha256"][:16] in stream.notes[0]
    # an HF reference that differs is still a mismatch, and so is another sha256 when both sides know it
    hf = json.loads(json.dumps(moved))
    hf["teachers"]["gen"]["weights"] = {"repo_id": "someone/else"}
    with pytest.raises(StoreError, match="gen: weights differ"):
        Store(full_store).require(["gen"], expected_teachers=hf)
    sha = json.loads(json.dumps(moved))
    sha["teachers"]["gen"]["weights_sha256"] = "e" * 64
    with pytest.raises(StoreError, match="gen: weights sha256 differs"):
        Store(full_store).require(["gen"], expected_teachers=sha)


def test_any_sample_is_one_range_read_away(full_store):
    """The record says where each sample lies in its tar: reading one by position fetches exactly its bytes, on
    a local path (a seek) and on S3 (one ranged GET), and gives what streaming the whole tar gives."""
    s = Store(full_store)
    for shard in s.done_shards():
        streamed = list(s.iter_raw(shard))
        ranges = s.records[shard].files[layout.tar_name(shard)]["samples"]
        assert len(ranges) == len(streamed) == s.records[shard].count
        assert ranges[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        for pos in reversed(range(len(streamed))):  # any order
            before = s.bytes_read
            got = s.read_sample(shard, pos)
            assert s.bytes_read - before == ranges[pos][1] < Location(full_store).size(layout.tar_name(shard))
            assert {k: v for k, v in got.items() if not k.startswith("__")} == \
                {k: v for k, v in streamed[pos].items() if not k.startswith("__")}
            assert got["__key__"] == streamed[pos]["__key__"]


def test_the_tar_writer_gives_webdataset_tarwriters_bytes(tmp_path):
    """olaf writes tars with tarfile's plain mode (linear in member size); the bytes must be exactly those of
    webdataset's TarWriter with the same settings, the writer the format was defined with."""
    import webdataset as wds

    from store import tar

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{j:09d}", "json": json.dumps({"id": j}).encode(), "jpg": rng.bytes(1000 + 37 * j),
                "seg.npy": rng.bytes(200_000 + j), "gen.npy": b""} for j in range(5)]
    got = tar.write_tar(Location(tmp_path), "ours.tar", samples)
    with open(tmp_path / "ref.tar", "wb") as f, wds.TarWriter(f, user="", group="", mode=0o444, mtime=0.0,
                                                               encoder=False) as w:
        for s in samples:
            w.write(s)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert got["bytes"] == (tmp_path / "ref.tar").stat().st_size and len(got["samples"]) == 5


def test_a_shard_gaining_tasks_keeps_its_committed_images_and_refuses_other_bytes(tmp_path):
    """What a shard gaining tasks is computed from is the image its tar holds: the decode reads it from the store
    (by its record's byte range), and the writer refuses a pass whose image is not that one, never replacing it."""
    from pipeline.extract.decode import decode_batch
    from pipeline.inputs import Record

    m = store.RunManifest(dataset={"json": "synthetic", "sha256": "0" * 64}, num_samples=3, shard_size=3,
                          formats=["wds"], tasks={})
    w = store.StoreWriter.create(str(tmp_path / "store"), m, SYNTHETIC_TEACHERS)
    images = [_png(k) for k in range(3)]
    first = [store.SampleResult(j, f"s{j}", {"id": f"s{j}"}, f"{j}.png", images[j]) for j in range(3)]
    rec = w.commit_shard(store.ShardResult(0, (), first, {}, {}, {}))
    records = [Record(j, f"s{j}", f"{j}.png", {"id": f"s{j}"}, at=("store", w.loc.url, 0, *rec.sample_ranges()[j]))
               for j in range(3)]
    decoded = decode_batch(records, [])
    assert [s.image_bytes for s in decoded.samples] == images and not any(s.error for s in decoded.samples)
    w.manifest.tasks["gen"] = store.TaskLayout((1, 4), "fp16")
    result = store.ShardResult(0, ("gen",), [dataclasses.replace(s, image_bytes=_png(9) if s.index == 1 else
                                                                 s.image_bytes) for s in first],
                               {"gen": np.zeros((3, 1, 4), np.float16)}, {"gen": None}, {"gen": np.ones(3, bool)})
    with pytest.raises(store.StoreError, match="computed from other bytes than the image the store holds"):
        w.write(result, w.redo(0), keep_images=True)
    ok = store.ShardResult(0, ("gen",), first, {"gen": np.zeros((3, 1, 4), np.float16)}, {"gen": None},
                           {"gen": np.ones(3, bool)})
    w.commit(w.write(ok, rec, keep_images=True))
    st = store.Store(str(tmp_path / "store"))
    assert [st.decode(st.find(f"s{j}")[1], [])["image"] for j in range(3)] == images
    # ranges that are not the sample's (another sample's; the tar rewritten since): found by the sample's id
    lying = [dataclasses.replace(records[0], at=("store", w.loc.url, 0, *rec.sample_ranges()[1]))]
    assert decode_batch(lying, []).samples[0].image_bytes == images[0]


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8 + seed, 8), (seed * 30 % 256, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_a_stale_index_is_called_stale_and_a_sound_shard_sound(tmp_path):
    """A shard rewritten under its record by a writer that did not know the index (the listing unchanged): the
    refusal called the sound shard damaged."""
    from test_order import make_store

    url = make_store(str(tmp_path / "store"))
    w = store.StoreWriter.open(url)
    w.build_index()
    old = w.record(0)
    samples = [store.SampleResult(j, f"s{j:05d}", {"id": f"s{j:05d}"}, f"{j}.jpg", b"\xff\xd8" * 300)
               for j in range(old.start, old.stop)]
    rec = w.write(store.ShardResult(0, ("gen",), samples, {"gen": np.zeros((len(samples), 1, 16), np.float16)},
                                    {"gen": None}, {"gen": np.ones(len(samples), bool)}))
    w.loc.write_bytes(store.layout.record_name(0), json.dumps(rec.to_dict()).encode())  # under the index's nose
    assert store.load_index(w.loc)[0] is not None  # the listing of shards/ did not change
    with pytest.raises(store.StoreError) as e:
        store.Store(url, use_index=True).tar_urls(["gen"])
    assert "sample index is stale" in str(e.value) and "the shard is sound" in str(e.value), e.value
    w.build_index()
    assert len(store.Store(url, use_index=True).tar_urls(["gen"])) == w.manifest.num_shards
