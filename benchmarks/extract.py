"""End-to-end extraction throughput: the Ray job with 1 and 2 actors vs a naive single-process per-image loop;
with --shape-true, the data path stage by stage at real target sizes.

    python -m benchmarks.extract [--samples 96] [--size tiny|full] [--actors 1,2] [--batch-size N]
                                 [--gpus-per-actor F] [--work-dir DIR]
    python -m benchmarks.extract --shape-true [--samples 64] [--batch-size 8]

--shape-true uses the stand-ins of `teachers.tiny --shape-true` (real recipes, real output shapes 1x1024,
576x1024, 576x1536, cheap models) and prints, per sample: decode and each recipe's resizes (CPU ms), the teacher
stand-ins, Ray object-store transfer of pixels and targets, encoding, the Zarr and the tar write, hashing for
verification, bytes stored; then the Ray job end to end, and the CPU cores the CPU stages need per 250 img/s
(the rate one GPU running all three real teachers is expected to sustain).

Builds a LLaVA-format sample dataset and teachers of the chosen size (`tiny`: the random-weight stand-ins;
`full`: real-size architectures with random weights, saved as checkpoints first -- a few GB), then measures:
  * naive:  one process, one image at a time: decode, the recipe's resizes, three forwards with batch 1 (how the
            original computes targets inside every training step), no writing;
  * ray xN: `python -m pipeline.extract_teachers` with N actors on a local Ray, writing a full store; samples/s
            over the run (start-up and model loading excluded, as the job reports them), actor busy fraction
            (1.0 = the teachers never waited for decoded input) and decode CPU ms per sample.
Prints one table with the ratios: vs naive, and the scale-out from 1 to 2 actors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.inputs import load_records
from pipeline.localray import LOOPBACK_ENV
from pipeline.sample import generate
from recipes.imageops import decode_rgb, read_image_bytes
from recipes.manifest import TASKS, load_manifest
from recipes.preprocess import preprocess
from store import encodings
from teachers.registry import load_teachers

REPO = Path(__file__).resolve().parents[1]


def full_size_teachers(out: Path, dtype: torch.dtype) -> Path:
    """Real-size architectures with random weights, saved like the hub checkpoints, and a manifest."""
    import yaml
    from transformers import (
        CLIPVisionModelWithProjection,
        DepthAnythingForDepthEstimation,
        OneFormerForUniversalSegmentation,
    )

    from teachers import depth, gen, seg
    from teachers.tiny import DEFAULT_MANIFEST

    data = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    for task, cls, cfg in (("gen", CLIPVisionModelWithProjection, gen.full_config()),
                           ("depth", DepthAnythingForDepthEstimation, depth.full_config()),
                           ("seg", OneFormerForUniversalSegmentation, seg.full_config())):
        if not (out / task / "config.json").exists():
            torch.manual_seed(0)
            cls(cfg).to(dtype).save_pretrained(out / task)
        data["teachers"][task]["weights"] = {"path": task}
    data["name"] = "ola_vlm_full_size_random"
    (out / "teachers.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "teachers.yaml"


def naive(json_path: Path, images: Path, manifest_path: Path, device: str, dtype: torch.dtype, n: int) -> float:
    """The original's way: everything per image, synchronously."""
    manifest = load_manifest(manifest_path)
    teachers = load_teachers(manifest, list(TASKS), device=device, dtype=dtype)
    records, _ = load_records(json_path)
    done, t0 = 0, None
    for k, rec in enumerate(records):
        if k == 2:  # warm-up excluded
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        try:
            rgb = decode_rgb(read_image_bytes(images, rec.image)) if rec.image else None
        except Exception:
            rgb = None
        if rgb is not None:
            for t in teachers.values():
                t(torch.from_numpy(np.ascontiguousarray(preprocess(t.spec, rgb)))[None].to(device)).cpu()
        done += k >= 2
        if done >= n:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def job_command(json_path, images, out, manifest_path, batch: int) -> list[str]:
    """`python -m pipeline.extract_teachers` as a user runs it, with shards of four batches and no progress bar."""
    return [sys.executable, "-m", "pipeline.extract_teachers", "--data-path", str(json_path), "--image-folder",
            str(images), "--output", str(out), "--teachers-manifest", str(manifest_path), "--shard-size",
            str(4 * batch), "--batch-size", str(batch), "--no-progress"]


def ray_run(json_path, images, manifest_path, out, actors, batch, gpus_per_actor, extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV | {"HF_HUB_OFFLINE": "1"}
    cmd = job_command(json_path, images, out, manifest_path, batch) + ["--actors", str(actors)]
    if gpus_per_actor is not None:
        cmd += ["--gpus-per-actor", str(gpus_per_actor)]
    t = time.perf_counter()
    p = subprocess.run(cmd + extra, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"extraction failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    log = p.stdout
    get = lambda pat: float(re.search(pat, log).group(1))  # noqa: E731
    return {"samples_per_s": get(r"throughput\s+([\d.]+) samples/s"), "wall": wall,
            "busy": get(r"actors busy ([\d.]+)"), "decode_ms": get(r"decode\s+([\d.]+) CPU ms/sample"),
            "teacher_ms": get(r"teachers\s+([\d.]+) ms/sample")}


class Clock:
    """CPU (all threads of this process) and wall time of a block, per sample."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu_ms = 1e3 * (time.process_time() - self.cpu) / self.n
        self.wall_ms = 1e3 * (time.perf_counter() - self.wall) / self.n


CPU, DEV = "cpu", "device"  # --resize-on modes: a row's last field says whose CPU work it is


def shape_true(args, work: Path) -> int:
    """The data path's stages at real target sizes, one table, and the cores needed per 250 img/s, for the recipes
    resized by PIL in the decode workers (`--resize-on cpu`, what every run did before) and on the device."""
    from pipeline.extract.compute import batches_of
    from pipeline.extract.decode import decode_batch
    from teachers.registry import TeacherSet
    from teachers.tiny import build

    n, batch = args.samples, args.batch_size or 8
    json_path = generate(work / "data", n, seed=0)
    images = work / "data" / "images"
    manifest_path = build(work / "teachers", shape_true=True)
    manifest = load_manifest(manifest_path)
    specs = [manifest.teachers[t] for t in TASKS]
    records, _ = load_records(json_path, image_folder=images)
    rows = cpu_stages(specs, [read_image_bytes(images, r.image) for r in records])
    teachers = TeacherSet.load(manifest, list(TASKS))
    decoded = {mode: [decode_batch(chunk, specs, resize_on=mode) for chunk in batches_of(records, batch)]
               for mode in (CPU, DEV)}
    with Clock(n) as teacher:
        outs = [teachers.run(d.pixels)[0] for d in decoded[CPU]]
    with Clock(n) as c:
        encoded = [{k: encodings.encode(v, "fp16") for k, v in o.items()} for o in outs]
    rows.append(("encode fp16", c.cpu_ms, c.wall_ms, "torch -> numpy", {CPU, DEV}))
    rows += ray_transfers(decoded, {k: v[0] for k, v in encoded[0].items()})
    written, bytes_per = write_stages(work, json_path, images, manifest, teachers, args.shard_size, batch, n)
    rows += written
    print(f"# data path at real target sizes: {n} samples, CPU x{os.cpu_count()}, shape-true stand-ins, batch "
          f"{batch}, shards of {args.shard_size}, fp16")
    print(f"{'stage':<30} {'CPU ms/smp':>10} {'wall ms/smp':>11}  note")
    for stage, cpu, wall, note, _ in rows:
        print(f"{stage:<30} {cpu:10.2f} {wall:11.2f}  {note}")
    print(f"{'(teacher stand-ins)':<30} {teacher.cpu_ms:10.2f} {teacher.wall_ms:11.2f}  the device's work, not the "
          f"data path's")
    for mode in (CPU, DEV):
        r = ray_run(json_path, images, manifest_path, work / f"store-ray-{mode}", 1, batch, None,
                    ["--torch-threads", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5", "--resize-on", mode])
        print(f"{'end to end, --resize-on ' + mode:<30} {'':>10} {1e3 / r['samples_per_s']:11.2f}  "
              f"{r['samples_per_s']:.1f} samples/s here, stand-ins in one actor: busy {r['busy']:.2f}, "
              f"{r['teacher_ms']:.1f} ms/sample (recipes included with device); decode {r['decode_ms']:.1f} CPU ms/"
              f"sample (the job's own report)")
    print_cores(rows, bytes_per)
    return 0


def cpu_stages(specs, raws: list[bytes]) -> list[tuple]:
    """(stage, CPU ms per sample, wall ms per sample, note, the --resize-on modes whose CPU work it is): decoding,
    each recipe in PIL, the array a device recipe is shipped, the recipes in torch."""
    from recipes import pil_exact

    n, rows = len(raws), []
    with Clock(n) as c:
        rgbs = [decode_rgb(data) for data in raws]
    rows.append(("decode (JPEG -> RGB)", c.cpu_ms, c.wall_ms, "once per image, for all recipes", {CPU, DEV}))
    for spec in specs:
        with Clock(n) as c:
            for rgb in rgbs:
                preprocess(spec, rgb)
        rows.append((f"resize: {spec.task} recipe", c.cpu_ms, c.wall_ms,
                     "x".join(map(str, spec.preprocess.input_size)) + " uint8, bit-exact PIL", {CPU}))
    with Clock(n) as c:
        arrays = [np.asarray(rgb) for rgb in rgbs]
    rows.append(("decoded image -> array", c.cpu_ms, c.wall_ms, "what --resize-on device ships instead", {DEV}))
    with Clock(n) as c:
        for a in arrays:
            for spec in specs:
                pil_exact.apply_ops(torch.from_numpy(a), spec.preprocess.ops)
    rows.append(("(recipes in torch, CPU)", c.cpu_ms, c.wall_ms, "--resize-on device: device work, here on this "
                 "CPU; bit-identical", set()))
    return rows


def ray_transfers(decoded: dict, targets: dict, reps: int = 10) -> list[tuple]:
    """What shipping each payload through Ray's object store costs, put + get in a worker (median of interleaved
    rounds), on a Ray of its own on 127.0.0.1."""
    import ray

    os.environ.update(LOOPBACK_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        strided = {k: np.swapaxes(np.ascontiguousarray(np.swapaxes(v, 1, 2)), 1, 2) for k, v in targets.items()}
        k, rows = len(decoded[CPU][0].ids), []

        @ray.remote
        def touch(x):  # a worker receives the object (zero-copy numpy views from the object store)
            arrays = x["pixels"].values() if "pixels" in x else x["images"] if "images" in x else x.values()
            return sum(int(a.nbytes) for a in arrays)

        objs = (("Ray transfer: resized pixels", decoded[CPU][0].pixel_payload(), "--resize-on cpu"),
                ("Ray transfer: decoded images", decoded[DEV][0].pixel_payload(), "--resize-on device"),
                ("Ray transfer: targets, strided", strided, "before: the seg target transposed"),
                ("Ray transfer: targets", targets, "now: C-contiguous"))
        for _, obj, _ in objs:  # warm up: the object store's first pages cost a fault each on a fresh node
            for _ in range(3):
                ray.get(touch.remote(ray.put(obj)))
        times = {what: [] for what, _, _ in objs}
        for _ in range(reps):  # interleaved rounds, median: one slow moment does not land on one row
            for what, obj, _ in objs:
                with Clock(k) as c:
                    ray.get(touch.remote(ray.put(obj)))
                times[what].append((c.cpu_ms, c.wall_ms))
        for what, obj, note in objs:
            mb = ray.get(touch.remote(obj)) / k / 1e6
            cpu, wall = (float(np.median([t[j] for t in times[what]])) for j in (0, 1))
            rows.append((what, cpu, wall, f"{mb:.2f} MB/sample, put + get in a worker (median); {note}", set()))
        return rows
    finally:
        ray.shutdown()


def write_stages(work: Path, json_path, images, manifest, teachers, shard_size: int, batch: int, n: int):
    """(rows, bytes per sample by format): each format's write through the store's writer, the same bytes with
    plain write() calls, and verify's re-hash."""
    import store
    from pipeline.extract.compute import assemble_shard, compute_shard
    from pipeline.extract.plan import make_plan

    plan = make_plan(json_path, images, shard_size)
    specs = [manifest.teachers[t] for t in TASKS]
    results = [compute_shard(plan.shard_records(i), specs, teachers, dict.fromkeys(TASKS, "fp16"), batch)
               for i in range(plan.num_shards)]
    rows, bytes_per = [], {}
    for fmt in ("zarr", "wds"):
        loc = store.Location(work / f"store-{fmt}")
        m = store.RunManifest(dataset={"json": str(json_path)}, num_samples=plan.num_samples, shard_size=shard_size,
                              formats=[fmt], tasks={t: store.TaskLayout.for_shape(manifest.teachers[t].output_shape,
                                                                                   "fp16") for t in TASKS})
        w = store.StoreWriter.create(loc, m, manifest.identity(list(TASKS), teachers.weights_sha256()))
        shard_results = [assemble_shard(m, i, TASKS, metas, tgts) for i, (metas, tgts) in enumerate(results)]
        with Clock(n) as c:
            recs = [w.write(r) for r in shard_results]
        hashed = sum(f["bytes"] for r in recs for f in r.files.values() if "bytes" in f)
        bytes_per[fmt] = hashed / n
        rows.append((f"write {fmt} (local disk)", c.cpu_ms, c.wall_ms, f"{hashed / n / 1e6:.2f} MB/sample, every "
                     f"object hashed as it is written", {CPU, DEV}))
        blobs = [loc.read_bytes(name) for r in recs for name in r.files]
        with Clock(n) as c:  # the same bytes with one plain write() per object: what the kernel alone costs here
            for j, blob in enumerate(blobs):
                with open(work / f"floor-{fmt}-{j}", "wb") as f:
                    f.write(blob)
        rows.append(("  floor: write() same bytes", c.cpu_ms, c.wall_ms, "no format, no hash: this machine's "
                     "page-cache cost", set()))
        with Clock(n) as c:
            for r in recs:
                assert not store.check_files(loc, r, full=True)
        rows.append((f"verify {fmt} (sha256)", c.cpu_ms, c.wall_ms, "re-hash on resume and `inspect verify`", set()))
    return rows, bytes_per


def print_cores(rows: list[tuple], bytes_per: dict) -> None:
    """Bytes per sample at LLaVA-558K's size, and the CPU cores the data path needs per 250 img/s, by mode."""
    print(f"\nbytes per sample: zarr {bytes_per['zarr'] / 1e6:.2f} MB, wds {bytes_per['wds'] / 1e6:.2f} MB "
          f"(x 558,128 samples: {558128 * bytes_per['zarr'] / 1e12:.2f} TB + {558128 * bytes_per['wds'] / 1e12:.2f} TB)")
    total = {mode: sum(cpu for _, cpu, _, _, modes in rows if mode in modes) for mode in (CPU, DEV)}
    one_format = total[DEV] - next(cpu for stage, cpu, *_ in rows if stage.startswith("write wds"))
    print("CPU stages of the data path (decode, resizes where they run on the CPU, encode, both writes; Ray "
          "transfers not counted):")
    for label, ms in (("--resize-on cpu (PIL in the decode workers, as before)", total[CPU]),
                      ("--resize-on device (the default on GPUs)", total[DEV]),
                      ("--resize-on device, --formats zarr", one_format)):
        print(f"  {label:<52} {ms:6.1f} CPU ms/sample -> {250 * ms / 1e3:5.1f} cores per 250 img/s, "
              f"{1e3 / ms:5.0f} img/s per core ({total[CPU] / ms:.2f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--actors", default="1,2", help="comma list of actor counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 with a GPU (0.5 for 2 actors on 1)")
    p.add_argument("--naive-samples", type=int, default=None, help="images for the naive loop (default: all, 24 on CPU full)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--shape-true", action="store_true", help="the data path stage by stage at real target sizes")
    p.add_argument("--shard-size", type=int, default=16, help="--shape-true: samples per shard (default 16)")
    args = p.parse_args(argv)
    if args.shape_true:
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="olaf-bench-datapath-"))
        try:
            return shape_true(args, work)
        finally:
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch = args.batch_size or (64 if cuda else 8)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="olaf-bench-extract-"))
    json_path = generate(work / "data", args.samples, seed=0)
    images = work / "data" / "images"
    if args.size == "tiny":
        from teachers.tiny import build

        manifest_path = build(work / "teachers")
    else:
        manifest_path = full_size_teachers(work / "teachers_full", torch.bfloat16 if cuda else torch.float32)
    dev = torch.cuda.get_device_name() if cuda else f"CPU x{os.cpu_count()}"
    print(f"# extraction benchmark: {args.samples} samples, {args.size} teachers, {dev}, batch {batch}")
    n_naive = args.naive_samples or (24 if (args.size == "full" and not cuda) else args.samples - 2)
    base = naive(json_path, images, manifest_path, device, dtype, n_naive)
    print(f"{'mode':<10} {'samples/s':>10} {'vs naive':>9} {'scale-out':>10} {'actors busy':>12} "
          f"{'decode ms/smp':>14} {'teacher ms/smp':>15} {'wall s':>7}")
    print(f"{'naive':<10} {base:10.2f} {1.0:8.2f}x {'':>10} {'':>12} {'':>14} {'':>15} {'':>7}")
    first = None
    for n in [int(x) for x in args.actors.split(",")]:
        gpa = args.gpus_per_actor if args.gpus_per_actor is not None else ((1.0 / n if n > 1 else 1.0) if cuda else None)
        # on a small CPU box the actors and the decoders share the cores: reserve fractions so both can run
        cpus = os.cpu_count() or 2
        extra = [] if cuda else ["--torch-threads", str(max(1, cpus // (2 * n))), "--cpus-per-actor",
                                 str(round(cpus / (2 * n), 2)), "--decode-cpus", str(round(cpus / 4, 2))]
        r = ray_run(json_path, images, manifest_path, work / f"store{n}", n, batch, gpa, extra)
        first = first or r["samples_per_s"]
        print(f"{'ray x' + str(n):<10} {r['samples_per_s']:10.2f} {r['samples_per_s'] / base:8.2f}x "
              f"{r['samples_per_s'] / first:9.2f}x {r['busy']:12.2f} {r['decode_ms']:14.1f} {r['teacher_ms']:15.1f} "
              f"{r['wall']:7.1f}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
