"""The cluster the job runs on, and how it is divided: teacher actors (one per GPU by default), the CPUs left for
decoding, the batch size, the queues' bounds, the compute dtypes and where the recipes' resizes run."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.extract.settings import ClusterAsk, UsageError
from pipeline.localray import LOOPBACK_ENV
from recipes.manifest import TeacherManifest, compute_dtypes


def init_ray(address: str | None, num_cpus: int | None):
    """Join the cluster given (--address, or RAY_ADDRESS as `ray job submit` sets it), else start a local Ray on
    loopback (of `num_cpus`) that this process owns and stops. Returns (ray, whether this process started it)."""
    if address or os.environ.get("RAY_ADDRESS"):
        import ray

        ray.init(address=address, log_to_driver=True)
        return ray, False
    for k, v in LOOPBACK_ENV.items():  # read by Ray at import time, and inherited by its workers
        os.environ.setdefault(k, v)
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True)
    return ray, True


@dataclass(frozen=True)
class Resources:
    actors: int
    gpus_per_actor: float
    device: str  # "cuda" or "cpu"
    dtype: dict  # task -> compute dtype name
    batch: int
    threads: int
    prefetch: int  # decoded batches queued per actor
    max_writers: int  # shards awaiting their commit
    resize_on: str  # "cpu" or "device"


def plan_resources(cluster: dict, s: ClusterAsk, manifest: TeacherManifest) -> Resources:
    """`cluster`: Ray's cluster_resources(); `s`: what the run asks. Refuses a division that cannot work, in one
    line."""
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    gpa = s.gpus_per_actor if s.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    n_actors = s.actors or (max(1, int(gpus // gpa)) if gpa > 0 else 1)
    if not s.tasks:  # images, captions and ids only: no teacher actor starts, none takes a CPU or a GPU
        n_actors, gpa = 0, 0.0
    device = "cuda" if gpa > 0 else "cpu"
    spare = cpus - n_actors * s.cpus_per_actor
    if gpa > 0 and gpus < n_actors * gpa:
        raise UsageError(f"{n_actors} actors x {gpa} GPUs need {n_actors * gpa:g} GPUs; the cluster has {gpus:g}")
    if spare < s.decode_cpus:  # the actors would hold every CPU and no image would ever be decoded
        raise UsageError(f"{n_actors} actors x {s.cpus_per_actor:g} CPUs leave {max(spare, 0):g} of the cluster's "
                         f"{cpus:g} CPUs, less than one decode task's {s.decode_cpus:g}: lower --actors or "
                         f"--cpus-per-actor (fractions are fine), or --decode-cpus")
    resize_on = s.resize_on if s.resize_on != "auto" else ("device" if device == "cuda" else "cpu")
    if resize_on == "device":
        from recipes import pil_exact

        odd = [t for t in s.tasks if not pil_exact.supports(manifest.teachers[t].preprocess.ops)]
        if odd:
            raise UsageError(f"--resize-on device: the recipes of {', '.join(odd)} use an op or filter that only PIL "
                             f"computes ({', '.join(pil_exact.FILTERS)} are reproduced); use --resize-on cpu")
    return Resources(
        actors=n_actors, gpus_per_actor=gpa, device=device,
        dtype=compute_dtypes(manifest, list(manifest.teachers), device, s.dtype),
        batch=s.batch_size or (64 if device == "cuda" else 8), threads=s.torch_threads or max(1, int(s.cpus_per_actor)),
        prefetch=s.prefetch or max(2, int(spare // s.decode_cpus // max(n_actors, 1))),
        max_writers=s.max_writers or 2 * max(n_actors, 1) + 1, resize_on=resize_on)
