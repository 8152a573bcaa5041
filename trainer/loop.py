"""The training loop shared by PT (`trainer.pt`) and probing (`trainer.probe`): nanoGPT's shape, a run's parts
from `trainer.build`. The model returns its loss from `forward(batch, context)`, where `context =
model.step_context(micro_batches)` is what a step needs beyond one micro-batch (PT: the InfoNCE negatives of the
whole global batch; probes: nothing). The host waits for the device only on log steps; checkpoints hold the
stream's position."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.store import loader
from trainer import checkpoint
from trainer.build import TrainerError
from trainer.data import die_with_parent, worker_init


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's env -> (rank, world size, device); nccl on CUDA, gloo on CPU; nothing without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # a rank whose torchrun agent is gone (node failure, kill -9) must not train on beside its restarted job
        die_with_parent()
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def to_device(batch: dict, device: torch.device) -> dict:
    """The tensors the model reads, on the device (non-blocking from pinned memory), plus where the micro-batch
    sits in its global batch."""
    out = {k: batch[k].to(device, non_blocking=True) for k in ("pixels", "prefix_ids", "text_ids", "text_mask", "text_labels")}
    out["targets"] = {t: x.to(device, non_blocking=True) for t, x in batch["targets"].items()}
    out["valid"] = {t: v.to(device, non_blocking=True) for t, v in batch["valid"].items()}
    out["row_offset"] = batch["row_offset"]
    return out


def clip_gradients(params, max_norm: float | None) -> torch.Tensor:
    """The gradients' total norm (a device tensor); they are clipped to `max_norm` only when it is set (the
    released runs did not clip: SPEC section 3)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm(grads)




def start(cfg) -> tuple[int, int, torch.device, torch.dtype, object]:
    """(rank, world size, device, compute dtype, log) of this process; refuses to overwrite a run unasked."""
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.output_dir)
    if not cfg.resume and checkpoint.latest(out) is not None:
        raise SystemExit(f"error: {out} already has checkpoints: pass --resume to continue, or use a new --output-dir")
    log = print if rank == 0 else (lambda *a, **k: None)
    return rank, world, device, torch.bfloat16 if bf16 else torch.float32, log


def fit(run, out: Path, rank: int, world: int, device: torch.device, log) -> int:
    """Resume if asked, then train `run` (a `trainer.build.PTRun`) to its last step; returns that step."""
    cfg, model, stream, optimizer, scheduler = run.cfg, run.model, run.stream, run.optimizer, run.scheduler
    is_main, cuda = rank == 0, device.type == "cuda"
    bf16 = run.dtype == torch.bfloat16
    trainable = run.trainable
    # ---- resume: parameters, optimizer, scheduler, RNG, data position ----------------------------------------
    step = 0
    if cfg.resume and (ckpt := checkpoint.latest(out)) is not None:
        state = checkpoint.load(ckpt, model, optimizer, scheduler)
        if "data" not in state:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt} has no global data position (written by an older "
                                             f"olaf): start a new --output-dir")
        for note in stream.load_state_dict(state["data"]):
            log(f"note: {note}")
        step = state["step"]
        log(f"resumed from {ckpt} at step {step} (sample position {stream.position:,})")
    data = loader(stream, num_workers=cfg.num_workers, pin_memory=cuda, worker_init_fn=worker_init,
                  prefetch_factor=4)
    ddp = world > 1
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if ddp else model

    # ---- logging ---------------------------------------------------------------------------------------------
    logs = out / "logs"
    tb = None
    if is_main:
        logs.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "samples.jsonl"):  # drop what a killed run logged after its last checkpoint
            if cfg.resume and (logs / name).exists():
                kept = [ln for ln in (logs / name).read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
                (logs / name).write_text("".join(ln + "\n" for ln in kept))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(out / "tensorboard")
            except ImportError:
                log("note: tensorboard is not installed: no TensorBoard events (logs/train.jsonl has everything)")
    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)

    # ---- the loop --------------------------------------------------------------------------------------------
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and cuda else contextlib.nullcontext()
    try:  # the bar is closed whatever happens, so an error starts on its own line
        t0 = time.perf_counter()
        counts = {"samples": 0, "tokens": 0, **{f"valid/{t}": 0 for t in cfg.tasks}}
        while step < run.total_steps:
            micro = [next(data) for _ in range(stream.accum)]  # this rank's part of global batch `step`
            unusable = sum(len(b["problems"]) for b in micro)
            if unusable == sum(len(b["ids"]) for b in micro):
                first = next(iter(micro[0]["problems"].values()))
                raise TrainerError(f"step {step + 1}: none of this process's {unusable} samples has an image the "
                                   f"trainer can use ({first}), though extraction decoded them: is the image "
                                   f"decoder (Pillow) of this machine another than the store's?")
            for b in micro:  # counted on the host, from the CPU batch: no device sync
                counts["samples"] += len(b["ids"])
                counts["tokens"] += int(b["text_mask"].sum()) + model.layout.text_start * len(b["ids"])
                for t in cfg.tasks:
                    counts[f"valid/{t}"] += int(b["valid"][t].sum())
                for sample_id, problem in b["problems"].items():
                    print(f"warning: step {step + 1}: sample {sample_id}: {problem} (masked out)", file=sys.stderr)
            micro = [to_device(b, device) for b in micro]
            context = model.step_context(micro)  # what the step needs beyond a micro-batch (PT: InfoNCE's columns)
            terms = {}
            for j, batch in enumerate(micro):
                sync = net.no_sync() if ddp and j < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss, parts = net(batch, context)
                    (loss / len(micro)).backward()
                for k, v in parts.items():
                    terms[k] = terms.get(k, 0.0) + v / len(micro)
            grad_norm = clip_gradients(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if is_main:
                start = (step - 1) * cfg.global_batch_size
                with open(logs / "samples.jsonl", "a") as f:  # which samples made this step (from the order, no sync)
                    f.write(json.dumps({"step": step, "position": start,
                                        "ids": stream.ids_of(start, start + cfg.global_batch_size)}) + "\n")
                bar.update(1)

            if step % cfg.log_every == 0 or step == run.total_steps:  # the only place the host waits for the device
                keys = sorted(terms)
                losses = torch.stack([terms[k].double() for k in keys])
                totals = torch.tensor(list(counts.values()), dtype=torch.float64, device=device)
                if ddp:
                    dist.all_reduce(losses)
                    losses /= world  # the mean over ranks; the grad norm is the same on every rank
                    dist.all_reduce(totals)  # counts: summed
                secs = time.perf_counter() - t0
                steps = (step - 1) % cfg.log_every + 1  # steps since the last log
                total = dict(zip(counts, totals.tolist(), strict=True))
                record = {"step": step, "lr": lr, "grad_norm": grad_norm.item(),
                          **dict(zip(keys, losses.tolist(), strict=True)),
                          "samples": total["samples"] / steps, "samples_per_s": total["samples"] / secs,
                          "tokens_per_s": total["tokens"] / secs,
                          **{f"valid/{t}": total[f"valid/{t}"] / steps for t in cfg.tasks}}
                if is_main:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", smp_s=f"{record['samples_per_s']:.1f}", refresh=False)
                    with open(logs / "train.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if tb is not None:
                        for k, v in record.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                t0 = time.perf_counter()
                counts = dict.fromkeys(counts, 0)
            if is_main and (step % cfg.save_every == 0 or step == run.total_steps):
                checkpoint.save(out, step, model, optimizer, scheduler,
                                {"data": stream.state_dict(), "config": dataclasses.asdict(cfg)}, cfg.keep_checkpoints)
    finally:
        bar.close()
    return step


def teardown(world: int) -> None:
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _one_line(e: Exception) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, without the worker's traceback."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def run_cli(main, argv=None) -> int:
    """`main(argv)`, with the errors a user can fix printed as one line (exit status 2)."""
    from pipeline.store import StoreError
    from pipeline.teacher_manifest import ManifestError

    try:
        return main(argv)
    except (StoreError, ManifestError, TrainerError, checkpoint.CheckpointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
