"""End-to-end extraction throughput: the Ray job with 1 and 2 actors vs a naive single-process per-image loop;
with --shape-true, the data path stage by stage at real target sizes.

    python benchmarks/extract.py [--samples 96] [--size tiny|full] [--actors 1,2] [--batch-size N]
                                 [--gpus-per-actor F] [--work-dir DIR]
    python benchmarks/extract.py --shape-true [--samples 64] [--batch-size 8]

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.imageops import decode_rgb, read_image_bytes  # noqa: E402
from pipeline.llava import load_records  # noqa: E402
from pipeline.sample import generate  # noqa: E402
from pipeline.teacher_manifest import load_manifest  # noqa: E402
from teachers.base import preprocess  # noqa: E402
from teachers.registry import load_teachers  # noqa: E402


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
    teachers = load_teachers(manifest, ["gen", "depth", "seg"], device=device, dtype=dtype)
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


def ray_run(json_path, images, manifest_path, out, actors, batch, gpus_per_actor, extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.extract_teachers", "--data-path", str(json_path), "--image-folder",
           str(images), "--output", str(out), "--teachers-manifest", str(manifest_path), "--shard-size", str(4 * batch),
           "--batch-size", str(batch), "--actors", str(actors), "--no-progress"]
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


def shape_true(args, work: Path) -> int:
    """The data path's stages at real target sizes, one table, and the cores needed per 250 img/s."""
    import ray

    from pipeline import encodings, store
    from pipeline.decode import decode_batch
    from pipeline.plan import make_plan
    from pipeline.work import assemble_shard, batches_of, compute_shard
    from teachers.registry import TeacherSet
    from teachers.tiny import build

    n, batch = args.samples, args.batch_size or 8
    json_path = generate(work / "data", n, seed=0)
    images = work / "data" / "images"
    manifest_path = build(work / "teachers", shape_true=True)
    manifest = load_manifest(manifest_path)
    tasks = ["gen", "depth", "seg"]
    specs = [manifest.teachers[t] for t in tasks]
    records, _ = load_records(json_path)
    raws = [read_image_bytes(images, r.image) for r in records]
    rows = []  # (stage, CPU ms per sample, wall ms per sample, note, a CPU stage of the data path?)

    with Clock(n) as c:
        rgbs = [decode_rgb(data) for data in raws]
    rows.append(("decode (JPEG -> RGB)", c.cpu_ms, c.wall_ms, "once per image, for all recipes", True))
    for spec in specs:
        with Clock(n) as c:
            for rgb in rgbs:
                preprocess(spec, rgb)
        rows.append((f"resize: {spec.task} recipe", c.cpu_ms, c.wall_ms,
                     "x".join(map(str, spec.preprocess.input_size)) + " uint8, bit-exact PIL", True))
    teachers = TeacherSet.load(manifest, tasks)
    decoded = [decode_batch(chunk, str(images), specs) for chunk in batches_of(records, batch)]
    with Clock(n) as c:
        outs = [teachers.run(d.pixels)[0] for d in decoded]
    teacher = c
    with Clock(n) as c:
        encoded = [{k: encodings.encode(v, "fp16") for k, v in o.items()} for o in outs]
    rows.append(("encode fp16", c.cpu_ms, c.wall_ms, "torch -> numpy", True))

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        payload = decoded[0].pixel_payload()
        targets = {k: v[0] for k, v in encoded[0].items()}
        reps, k = 10, len(decoded[0].ids)

        @ray.remote
        def touch(x):  # a worker receives the object (zero-copy numpy views from the object store)
            return sum(int(a.nbytes) for a in (x["pixels"].values() if "pixels" in x else x.values()))

        for what, obj in (("Ray transfer: pixels", payload), ("Ray transfer: targets", targets)):
            mb = ray.get(touch.remote(obj)) / k / 1e6
            with Clock(k * reps) as c:
                for _ in range(reps):
                    ray.get(touch.remote(ray.put(obj)))
            rows.append((what, c.cpu_ms, c.wall_ms, f"{mb:.2f} MB/sample, put here + get in a worker", False))
    finally:
        ray.shutdown()

    plan = make_plan(json_path, images, args.shard_size)
    results = [compute_shard(plan.shard_records(i), str(images), specs, teachers, dict.fromkeys(tasks, "fp16"), batch)
               for i in range(plan.num_shards)]
    bytes_per = {}
    for fmt in ("zarr", "wds"):
        loc = store.Location(work / f"store-{fmt}")
        m = store.RunManifest(dataset={"json": str(json_path)}, num_samples=plan.num_samples,
                              shard_size=args.shard_size, formats=[fmt],
                              tasks={t: store.TaskLayout.for_shape(manifest.teachers[t].output_shape, "fp16") for t in tasks})
        loc.makedirs()
        store.write_manifest(loc, m)
        store.ensure_zarr(loc, m)
        shard_results = [assemble_shard(m, i, tuple(tasks), metas, tgts) for i, (metas, tgts) in enumerate(results)]
        with Clock(n) as c:
            recs = [store.write_shard(loc, r) for r in shard_results]
        hashed = sum(f["bytes"] for r in recs for f in r.files.values() if "bytes" in f)
        bytes_per[fmt] = hashed / n
        how = "every object hashed as it is written"
        rows.append((f"write {fmt} (local disk)", c.cpu_ms, c.wall_ms, f"{hashed / n / 1e6:.2f} MB/sample, {how}", True))
        with Clock(n) as c:
            for r in recs:
                assert not store.check_files(loc, r, full=True)
        rows.append((f"verify {fmt} (sha256)", c.cpu_ms, c.wall_ms, "re-hash on resume and `inspect verify`", False))
        if fmt == "wds":  # the tar serialisation alone, before (webdataset's stream-mode TarWriter) and now
            import webdataset as wds

            from pipeline.store import writer

            members = [[{k: v for k, v in raw.items() if k == "__key__" or not k.startswith("_")}
                        for raw in store.Store(loc).iter_raw(i)] for i in range(plan.num_shards)]
            with Clock(n) as c:  # both hash as they write, to a local file with an fsync at the end
                for i, shard in enumerate(members):
                    with open(work / f"before-{i}.tar", "wb") as f:
                        hw = writer._HashingWriter(f)
                        with wds.TarWriter(hw, user="", group="", mode=0o444, mtime=0.0, encoder=False) as w:
                            for sample in shard:
                                w.write(sample)
                        f.flush()
                        os.fsync(f.fileno())
            before = c
            with Clock(n) as c:
                for i, shard in enumerate(members):
                    writer.write_tar(store.Location(work), f"after-{i}.tar", shard)
            same = all((work / f"before-{i}.tar").read_bytes() == (work / f"after-{i}.tar").read_bytes()
                       for i in range(plan.num_shards))
            rows.append(("  tar bytes: wds TarWriter", before.cpu_ms, before.wall_ms, "before: stream mode", False))
            rows.append(("  tar bytes: olaf write_tar", c.cpu_ms, c.wall_ms,
                         f"now: {c.cpu_ms / max(before.cpu_ms, 1e-9):.2f}x the CPU, identical bytes: {same}", False))

    print(f"# data path at real target sizes: {n} samples, CPU x{os.cpu_count()}, shape-true stand-ins, batch "
          f"{batch}, shards of {args.shard_size}, fp16")
    print(f"{'stage':<28} {'CPU ms/smp':>10} {'wall ms/smp':>11}  note")
    for stage, cpu, wall, note, _ in rows:
        print(f"{stage:<28} {cpu:10.2f} {wall:11.2f}  {note}")
    print(f"{'(teacher stand-ins)':<28} {teacher.cpu_ms:10.2f} {teacher.wall_ms:11.2f}  the device's work, not the "
          f"data path's")
    r = ray_run(json_path, images, manifest_path, work / "store-ray", 1, batch, None,
                ["--torch-threads", "1", "--cpus-per-actor", "0.5", "--decode-cpus", "0.5"])
    cpu_ms = sum(cpu for _, cpu, _, _, data_path in rows if data_path)
    print(f"{'end to end (Ray job)':<28} {'':>10} {1e3 / r['samples_per_s']:11.2f}  {r['samples_per_s']:.1f} samples/s "
          f"on this machine, stand-ins in one actor: busy {r['busy']:.2f}, {r['teacher_ms']:.1f} ms/sample; decode "
          f"{r['decode_ms']:.1f} CPU ms/sample (the job's own report)")
    print(f"\nbytes per sample: zarr {bytes_per['zarr'] / 1e6:.2f} MB, wds {bytes_per['wds'] / 1e6:.2f} MB "
          f"(x 558,128 samples: {558128 * bytes_per['zarr'] / 1e12:.2f} TB + {558128 * bytes_per['wds'] / 1e12:.2f} TB)")
    print(f"CPU stages (decode, resizes, encode, both writes): {cpu_ms:.1f} CPU ms/sample -> {250 * cpu_ms / 1e3:.1f} "
          f"cores per 250 img/s; the data path's own ceiling: {1e3 / cpu_ms:.0f} img/s per core")
    return 0


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
