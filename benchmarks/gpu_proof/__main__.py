"""python -m benchmarks.gpu_proof --out DIR [--minutes 8] [--parts ...] [--tiny]: the command (see the package)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import benchmarks.gpu_proof as package
from benchmarks.gpu_proof import part_pipeline, part_probe, part_pt, part_recipes, part_teachers
from benchmarks.gpu_proof.machine import environment
from benchmarks.gpu_proof.runner import Proof, now, result_path
from benchmarks.gpu_proof.setup import make_setup
from benchmarks.gpu_proof.table import table
from store.fs import StoreError

PARTS = {"teachers": part_teachers.part_teachers, "recipes": part_recipes.part_recipes,
         "pipeline": part_pipeline.part_pipeline, "pt": part_pt.part_pt, "probe": part_probe.part_probe}
WEIGHTS = {"teachers": 0.30, "recipes": 0.05, "pipeline": 0.25, "pt": 0.25, "probe": 0.15}  # shares of --minutes


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_proof", description=package.__doc__.split("\n\n")[0],
                                epilog=package.__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_proof.json (created; an earlier gpu_proof.json there "
                                                "is kept: this run writes gpu_proof-<UTC time>.json beside it)")
    p.add_argument("--minutes", type=_positive, default=8.0, help="the whole run's time (default 8)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: every code path, no figure to quote")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default 790 on H100/H200)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny eager)")
    p.add_argument("--job-images", type=int, default=3000, help="images of the Ray job's dataset (default 3000)")
    p.add_argument("--batches", default=None, help="the teachers' batch sweep, e.g. 1,8,64 (default 1,8,32,64,128,256)")
    p.add_argument("--ray-address", default=None,
                   help="the pipeline part's job joins this Ray cluster (default: it starts a Ray on this node)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default a temporary one, removed)")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    try:
        path = result_path(Path(a.out))
    except (OSError, ValueError, StoreError) as e:
        p.error(str(e))
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="olaf-gpu-proof-"))
    s = make_setup(a, work)
    if a.batches:
        s = replace(s, batches=tuple(int(b) for b in a.batches.split(",")))
    proof = Proof(path, a.minutes, s.size)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, proof.interrupted)
    try:
        proof.data["env"] = environment(s)
        proof.save()
        proof.run({n: (lambda pr, f=PARTS[n]: f(pr, s)) for n in parts}, WEIGHTS)
        proof.data["finished"] = now()
        proof.save()
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(proof.data))
    print(f"\nwritten: {proof.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
