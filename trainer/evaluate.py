"""Held-out losses while training (`--eval-store S --eval-every N [--eval-samples K]`): every N steps, the PT
objective's terms (NTP, and each task's smooth-L1 and InfoNCE per layer) on the same K held-out samples, the first
K positions of the eval store's global order under the run's seed. The targets are stored, so no teacher loads.

The K samples are cut into micro-batches of the run's size, in position order; each micro-batch's terms are those
of a training micro-batch whose InfoNCE columns are its own targets, and a figure is the mean over the micro-batches.
The ranks take micro-batches in turn and sum, so every number of ranks, DDP or fsdp, gives the same figure; under
fsdp every rank runs as many forwards (the gathers are collective), repeating one whose terms it does not count.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from store import TargetStream
from trainer.data import to_device
from trainer.loss import step_negatives


class HeldOut:
    def __init__(self, stream: TargetStream, samples: int, micro_batch: int, rank: int, world: int):
        self.stream, self.samples = stream, min(samples, stream.num_samples)
        self.parts = [(a, min(a + micro_batch, self.samples)) for a in range(0, self.samples, micro_batch)]
        self.mine, self.world = self.parts[rank::world], world
        self.rounds = math.ceil(len(self.parts) / world)

    def note(self, asked: int) -> str | None:
        if asked > self.samples:
            return (f"the eval store has {self.samples} usable samples, fewer than the {asked} asked "
                    f"(run.eval_samples): each evaluation reads them all")
        return None

    def ids(self) -> list[str]:
        return self.stream.ids_of(0, self.samples)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """{term: mean over the held-out micro-batches} (every rank gets the same figures)."""
        sums: dict[str, torch.Tensor] = {}
        for i in range(self.rounds):
            counted = i < len(self.mine)
            a, b = self.mine[i] if counted else self.parts[0]
            batch = to_device({**self.stream.batch_of(a, b), "row_offset": 0}, device)
            with autocast or contextlib.nullcontext():
                _, terms = model(batch, step_negatives([batch], model.tasks, gather=False))
            if counted:
                sums = {k: sums.get(k, 0.0) + v.double() for k, v in terms.items()}
        keys = sorted(sums) if sums else None
        if self.world > 1:  # a rank with no micro-batch of its own has no keys: rank 0 always has one
            holder = [keys]
            dist.broadcast_object_list(holder, src=0)
            keys = holder[0]
        values = torch.stack([sums[k] if k in sums else torch.zeros((), dtype=torch.float64, device=device)
                              for k in keys])
        if self.world > 1:
            dist.all_reduce(values)
        return dict(zip(keys, (values / len(self.parts)).tolist(), strict=True))
