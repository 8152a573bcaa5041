"""The training loop PT (`trainer.pt`) and probing (`trainer.probe`) share, in nanoGPT's shape: it reads top to
bottom; the model returns its loss from `forward(batch, context)`, where `context = model.step_context(micro)` is
what a step needs beyond one micro-batch (PT: InfoNCE's negatives over the whole global batch; probes: nothing);
the run's parts come from `trainer.build`; checkpoints (trainer.checkpoint) hold the stream's position, the logs
(trainer.runlog) wait for the device only on log steps."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from store import loader, refuse_inside_store
from trainer.build import PTRun, Trainable
from trainer.checkpoint import Checkpointer, CheckpointError, PlainRNG, TorchRNG, latest
from trainer.config import saved
from trainer.data import die_with_parent, to_device, worker_init
from trainer.errors import USER_ERRORS, TrainerError
from trainer.runlog import RunLog
from trainer.sharding import OptimizerState, clip_sharded


def train(run: PTRun, out: Path, rank: int, world: int, log, meta: dict | None = None) -> int:
    """Resume if asked, then train `run` to its last step; returns that step. `meta`: what every checkpoint
    carries beside the config (PT: its model's description, for exports)."""
    cfg, model, stream, cuda = run.cfg, run.model, run.stream, run.device.type == "cuda"
    sharded = getattr(run, "sharded", None)
    ckpt = Checkpointer(out, model, {"optimizer": OptimizerState(run.optimizer), "scheduler": run.scheduler,
                                     "rng": TorchRNG()},
                        {"data": stream, "rng": PlainRNG()}, cfg.run.keep_checkpoints,
                        {"config": saved(cfg), **(meta or {})}, writer=rank == 0)
    step = resume(ckpt, out, log) if cfg.run.resume else 0
    runlog = RunLog(out, run, step, rank, world, log)
    data = loader(stream, num_workers=cfg.data.num_workers, pin_memory=cuda, prefetch_factor=4,
                  worker_init_fn=functools.partial(worker_init, os.getpid()))
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if cuda else None) \
        if world > 1 and not sharded else model  # an FSDP model reduces its own gradients
    with contextlib.closing(runlog):  # the bar closes whatever happens, so an error starts on its own line
        while step < run.total_steps:
            micro = [next(data) for _ in range(stream.accum)]  # this rank's part of global batch `step`
            check_usable(step, micro)
            runlog.count(step, micro)
            done = train_step(run, [to_device(b, run.device) for b in micro], net)
            step += 1
            runlog.step(step, done.terms, done.grad_norm, done.lr)
            if getattr(run, "held_out", None) and step % cfg.run.eval_every == 0:
                runlog.eval(step, run.held_out(model, run.device, autocast_of(run)))
            if (rank == 0 or sharded) and (step % cfg.run.save_every == 0 or step == run.total_steps):
                ckpt.save(step)  # sharded: every rank gathers, rank 0 writes
    return step


class StepResult(NamedTuple):
    terms: dict  # the loss terms, device tensors averaged over the micro-batches
    grad_norm: torch.Tensor
    lr: float  # the rate this step used


def train_step(run: Trainable, micro: list[dict], net: torch.nn.Module | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches of a global batch (on the device): what the step shares
    (`model.step_context`), then per micro-batch the forward (bf16 autocast on CUDA), which returns the loss, and
    its backward (under DDP, gradients sync on the last one only); clipping when set, AdamW, the schedule. The
    loop and every benchmark that times a step call this. `net`: the model wrapped for DDP, if it is; an FSDP model
    (trainer.sharding) reduce-scatters its gradients after the last micro-batch only, as DDP all-reduces them."""
    model, net = run.model, net or run.model
    autocast = autocast_of(run)
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    context = model.step_context(micro)
    terms = {}
    for j, batch in enumerate(micro):
        last = j == len(micro) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        with net.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast:
                loss, parts = net(batch, context)
            (loss / len(micro)).backward()
        terms = {k: terms.get(k, 0.0) + v / len(micro) for k, v in parts.items()}
    sharded = getattr(run, "sharded", None)
    if sharded:
        sharded.reduce_replicated()
        grad_norm = clip_sharded(run.trainable, run.cfg.optim.max_grad_norm)
    else:
        grad_norm = clip_gradients(run.trainable, run.cfg.optim.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(terms, grad_norm, lr)


def autocast_of(run: Trainable):
    """bf16 autocast on CUDA when the run computes in bf16 (the trained weights stay fp32), else nothing."""
    if run.dtype == torch.bfloat16 and run.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resume(ckpt: Checkpointer, out: Path, log) -> int:
    path = latest(out)
    if path is None:
        return 0
    step, notes = ckpt.load(path)
    stream = ckpt.json_parts["data"]
    if step < 0 or stream.position != step * stream.global_batch:
        raise CheckpointError(f"checkpoint {path}: its data position {stream.position} is not its step {step} x the "
                              f"global batch {stream.global_batch} = {step * stream.global_batch}: it was edited or "
                              f"damaged; remove it to resume from the one before, or start a new --output-dir")
    for note in notes:
        log(f"note: {note}")
    log(f"resumed from {path} at step {step} (sample position {stream.position:,})")
    return step


def check_usable(step: int, micro: list[dict]) -> None:
    """A step in which no sample of this process has an image the trainer can decode stops the run: the store's
    images decoded at extraction, so the decoder here is another."""
    unusable = sum(len(b["problems"]) for b in micro)
    if unusable == sum(len(b["ids"]) for b in micro):
        first = next(iter(micro[0]["problems"].values()))
        raise TrainerError(f"step {step + 1}: none of this process's {unusable} samples has an image the "
                           f"trainer can use ({first}), though extraction decoded them: is the image "
                           f"decoder (Pillow) of this machine another than the store's?")


def clip_gradients(params, max_norm: float | None) -> torch.Tensor:
    """The gradients' total norm (a device tensor); they are clipped to `max_norm` only when it is set (the
    released runs did not clip: SPEC section 3)."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


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


def start(cfg) -> tuple[int, int, torch.device, torch.dtype, object]:
    """(rank, world size, device, compute dtype, log) of this process; refuses to overwrite a run unasked."""
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    bf16 = cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    refuse_inside_store(cfg.run.output_dir, "--output-dir")
    if not cfg.run.resume and latest(Path(cfg.run.output_dir)) is not None:
        raise TrainerError(f"{cfg.run.output_dir} already has checkpoints: pass --resume to continue, or use a new "
                           f"--output-dir")
    log = print if rank == 0 else (lambda *a, **k: None)
    return rank, world, device, torch.bfloat16 if bf16 else torch.float32, log


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
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
