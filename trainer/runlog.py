"""A run's logs, in OUT: config.json, logs/train.jsonl (every logged step, every loss term), logs/samples.jsonl
(the sample ids of each step, from the global order, without communication), logs/eval.jsonl (held-out losses),
TensorBoard and W&B (trainer.reporting), the progress bar; the
counts kept between logs, and their reduction over ranks at log time, the only place the host waits for the
device."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import saved
from trainer.reporting import close, open_reporters, report


class RunLog:
    def __init__(self, out: Path, run, step: int, rank: int, world: int, log=print):
        self.cfg, self.stream, self.device, self.world = run.cfg, run.stream, run.device, world
        self.main, self.logs = rank == 0, Path(out) / "logs"
        self.fixed_tokens = run.model.layout.text_start  # per sample, before the text
        held_out = getattr(run, "held_out", None)
        self.held_out_samples = held_out.samples if held_out else 0
        self.reporters, self.samples_file = [], None
        if self.main:
            self._open(Path(out), step, log)
        from tqdm import tqdm

        self.bar = tqdm(total=run.total_steps, initial=step, disable=not self.main, unit="step", dynamic_ncols=True)
        self._reset()

    def _open(self, out: Path, step: int, log) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "samples.jsonl", "eval.jsonl"):  # drop what a killed run logged after its last checkpoint
            if self.cfg.run.resume and (self.logs / name).exists():
                kept = [ln for ln in (self.logs / name).read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
                (self.logs / name).write_text("".join(ln + "\n" for ln in kept))
        (out / "config.json").write_text(json.dumps(saved(self.cfg), indent=1))
        self.samples_file = open(self.logs / "samples.jsonl", "a")  # noqa: SIM115  (closed in close())
        names = [n for n in self.cfg.run.report_to if n != "tensorboard" or self.cfg.run.tensorboard]
        config = {**saved(self.cfg), "stores": self.stream.mix_info}
        self.reporters = open_reporters(names, out, self.cfg.run.wandb_project, config, log)

    def _reset(self) -> None:
        self.t0 = time.perf_counter()
        self.counts = {"samples": 0, "tokens": 0, **{f"valid/{t}": 0 for t in self.cfg.tasks.names}}

    def count(self, step: int, micro: list[dict]) -> None:
        """A step's micro-batches, counted on the host from the CPU batches (no device sync); samples the trainer
        could not use are said on stderr."""
        for b in micro:
            self.counts["samples"] += len(b["ids"])
            self.counts["tokens"] += int(b["text_mask"].sum()) + self.fixed_tokens * len(b["ids"])
            for t in self.cfg.tasks.names:
                self.counts[f"valid/{t}"] += int(b["valid"][t].sum())
            for sample_id, problem in b["problems"].items():
                print(f"warning: step {step + 1}: sample {sample_id}: {problem} (masked out)", file=sys.stderr)

    def step(self, step: int, terms: dict, grad_norm: torch.Tensor, lr: float) -> None:
        """After optimizer step `step`: its sample ids; on log steps the losses and rates."""
        if self.main:
            start = (step - 1) * self.cfg.optim.global_batch_size
            stop = start + self.cfg.optim.global_batch_size
            record = {"step": step, "position": start, "ids": self.stream.ids_of(start, stop)}
            stores = self.stream.stores_of(start, stop)
            if stores is not None:  # a mix: each id's store, its place in data.stores (config.json)
                record["stores"] = stores
            self.samples_file.write(json.dumps(record) + "\n")
            self.samples_file.flush()
            self.bar.update(1)
        if step % self.cfg.run.log_every == 0 or step == self.bar.total:
            self._write(step, self._reduce(step, terms, grad_norm, lr))
            self._reset()

    def _reduce(self, step: int, terms: dict, grad_norm: torch.Tensor, lr: float) -> dict:
        keys = sorted(terms)
        losses = torch.stack([terms[k].double() for k in keys])
        totals = torch.tensor(list(self.counts.values()), dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(losses)
            losses /= self.world  # the mean over ranks; the grad norm is the same on every rank
            dist.all_reduce(totals)  # counts: summed
        secs = time.perf_counter() - self.t0
        steps = (step - 1) % self.cfg.run.log_every + 1  # steps since the last log
        total = dict(zip(self.counts, totals.tolist(), strict=True))
        return {"step": step, "lr": lr, "grad_norm": grad_norm.item(), **dict(zip(keys, losses.tolist(), strict=True)),
                "samples": total["samples"] / steps, "samples_per_s": total["samples"] / secs,
                "tokens_per_s": total["tokens"] / secs,
                **{f"valid/{t}": total[f"valid/{t}"] / steps for t in self.cfg.tasks.names}}

    def eval(self, step: int, figures: dict) -> None:
        """A held-out evaluation's figures (trainer.evaluate), the same on every rank: logs/eval.jsonl and
        TensorBoard's eval/."""
        if not self.main:
            return
        record = {"step": step, "samples": self.held_out_samples, **figures}
        with open(self.logs / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.write(f"step {step}: held-out loss {figures['loss']:.4f} ({self.held_out_samples} samples)")
        report(self.reporters, {f"eval/{k}": v for k, v in figures.items()}, step)

    def _write(self, step: int, record: dict) -> None:
        if not self.main:
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", smp_s=f"{record['samples_per_s']:.1f}", refresh=False)
        with open(self.logs / "train.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        report(self.reporters, {k: v for k, v in record.items() if k != "step"}, step)

    def close(self) -> None:
        self.bar.close()
        if self.samples_file is not None:
            self.samples_file.close()
        close(self.reporters)
