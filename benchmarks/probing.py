"""Probing throughput: olaf's one pass (stored targets, one frozen-MLLM forward feeds every probe of every task)
vs the authors' design (one job per task, the teacher run online per image inside each step), side by side.

    python -m benchmarks.probing [--samples 64] [--batches 6] [--micro-batch 4]

Same tiny models (trainer.tiny, teachers.tiny), same store, same probes (every layer of the tiny LLM): the
table gives, per design, the seconds to train all (task, layer) probes on the same samples, the MLLM forwards
that took, and probe updates per second (probes x samples / s). This script may import `teachers`; the
trainer never does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.pt_step import teacher_targets, tiny_setup
from benchmarks.timing import median_seconds
from recipes.manifest import TASKS
from trainer.config import with_values
from trainer.loop import to_device, train_step
from trainer.probe import build_probe


def setup(work: Path, samples: int):
    """pt_step's tiny setup (data, tiny teachers and models, a store), and a random mm_projector.bin."""
    from trainer.sequence import Projector

    cfg, teachers = tiny_setup(work, samples)
    torch.save({f"model.mm_projector.{k}": v for k, v in Projector(32, 64).state_dict().items()}, work / "proj.bin")
    return cfg, teachers, work / "proj.bin"


def timed(run, batches: int, device, teachers=None, raw: dict | None = None) -> tuple[float, int]:
    """(median seconds per step, MLLM forwards) over `batches` steps after one warm-up."""
    it = iter(run.stream)
    before = run.model.forwards

    def step(batch):
        b = to_device(batch, device)
        if teachers is not None:  # the authors' way: the teacher per image, inside the step
            with torch.no_grad():
                b["targets"] = teacher_targets(teachers, batch["ids"], raw, device)
        train_step(run, [b])

    seconds = median_seconds(step, device, min_calls=batches, max_calls=batches, prepare=lambda: next(it))
    return seconds * batches, run.model.forwards - before - 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="olaf-bench-probe-"))
    cfg, teachers, proj = setup(work, a.samples)
    device, dtype = torch.device("cpu"), torch.float32
    base = with_values(cfg, global_batch_size=a.micro_batch, micro_batch_size=a.micro_batch)
    store = cfg.data.store
    raw = {}
    from store import Store

    s = Store(store)
    for shard in s.done_shards():
        for d in s.iter_decoded(shard, []):
            if d["image"] is not None:
                raw[d["id"]] = d["image"]

    ours = build_probe(base, base.model.llm, str(proj), None, device, dtype, 0, 1).run
    n_probes = len(ours.model.probes)
    secs, forwards = timed(ours, a.batches, device)
    rows = [("olaf: stored targets, all tasks, one pass", secs, forwards, n_probes)]
    total, total_fwd = 0.0, 0
    for t in TASKS:
        cfg = with_values(base, tasks=[t])
        run = build_probe(cfg, cfg.model.llm, str(proj), None, device, dtype, 0, 1).run
        secs_t, fwd_t = timed(run, a.batches, device, teachers={t: teachers[t]}, raw=raw)
        rows.append((f"authors: job '{t}', teacher online", secs_t, fwd_t, len(run.model.probes)))
        total, total_fwd = total + secs_t, total_fwd + fwd_t
    rows.append(("authors: the three jobs", total, total_fwd, n_probes))
    samples = a.batches * a.micro_batch
    print(f"# probing benchmark: tiny models on CPU ({torch.get_num_threads()} threads), {samples} samples "
          f"({a.batches} batches of {a.micro_batch}), {ours.model.mllm.config.num_hidden_layers} layers x 3 tasks = {n_probes} probes")
    print(f"{'design':<44} {'seconds':>8} {'MLLM fwd':>9} {'probe-updates/s':>16} {'ratio':>7}")
    for name, sec, fwd, probes in rows:
        print(f"{name:<44} {sec:>8.2f} {fwd:>9} {probes * samples / sec:>16.1f} {total / sec:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
