"""OLA-VLM's PT stage, trained from a store's targets: the teachers are never loaded.

    python -m trainer.pt --store STORE --llm meta-llama/Meta-Llama-3-8B-Instruct \\
        --vision-tower openai/clip-vit-large-patch14-336 --output-dir OUT \\
        [--config trainer/configs/ola_vlm_pt.yaml] [--max-steps N] [--resume] [--set key=value ...]
    torchrun --nproc_per_node 8 -m trainer.pt ...       # the same on several GPUs (nccl) or CPU processes (gloo)

Frozen: the CLIP tower and the LLM. Trained: the mlp2x_gelu projector, the task tokens, the embedding predictors
and the logit scales (AdamW, cosine with warm-up). Outputs in OUT: logs/train.jsonl (every logged step, every
loss term), tensorboard/, checkpoints/step-NNNNNN (resume with --resume: same data order, same losses), and
export/ (mm_projector.bin with LLaVA's key names, task tokens, predictors, config.json). Plot the losses with
`python -m trainer.plot OUT`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.store import StoreError, loader
from pipeline.teacher_manifest import ManifestError
from trainer import checkpoint
from trainer.build import TrainerError, build
from trainer.config import PTConfig, load_config
from trainer.data import die_with_parent, worker_init
from trainer.loss import step_negatives


def parse_args(argv=None) -> PTConfig:
    p = argparse.ArgumentParser(prog="python -m trainer.pt", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="store written by pipeline.extract_teachers: a folder or a URL (s3://bucket/prefix); "
                                   "its WebDataset shards are read")
    p.add_argument("--llm", help="HF id or folder of the causal LM (default: Meta-Llama-3-8B-Instruct)")
    p.add_argument("--vision-tower", help="HF id or folder of the base encoder: CLIP-ViT (default: "
                                          "openai/clip-vit-large-patch14-336) or an open_clip ConvNeXt "
                                          "(laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768)")
    p.add_argument("--output-dir", help="where logs, checkpoints and the export go")
    p.add_argument("--config", action="append", default=[], help="YAML overriding the defaults (repeatable)")
    p.add_argument("--teachers-manifest", help="teacher manifest the store must match (default: ola_vlm.yaml)")
    p.add_argument("--fidelity", choices=["original", "corrected"], help="fidelity the store must have")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: epochs x samples / global batch)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    a = p.parse_args(argv)
    try:
        return load_config(a.config, {"store": a.store, "llm": a.llm, "vision_tower": a.vision_tower,
                                      "output_dir": a.output_dir, "teachers_manifest": a.teachers_manifest,
                                      "fidelity": a.fidelity, "max_steps": a.max_steps, "resume": a.resume or None},
                           a.set)
    except (ValueError, OSError) as e:
        p.error(str(e))


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


def main(argv=None) -> int:
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    out = Path(cfg.output_dir)
    log = print if is_main else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.resume and checkpoint.latest(out) is not None:
        raise SystemExit(f"error: {out} already has checkpoints: pass --resume to continue, or use a new --output-dir")

    run = build(cfg, device, dtype, rank, world)  # the store is checked before any model loads
    model, stream, optimizer, scheduler = run.model, run.stream, run.optimizer, run.scheduler
    for note in stream.notes:
        log(f"note: {note}")
    trainable = run.trainable
    log(f"model: {cfg.llm} ({model.llm.config.num_hidden_layers} layers, width {model.llm.config.hidden_size}, "
        f"{run.attn}), {cfg.vision_tower}; image offset {model.layout.prefix}; "
        f"{sum(p.numel() for p in trainable):,} trainable parameters; {dtype} on {device}"
        + (f" x {world}" if world > 1 else ""))
    log(f"data: {stream.num_samples:,} usable samples per epoch, global batch {cfg.global_batch_size} = "
        f"{stream.accum} x {cfg.micro_batch_size} x {world} processes, {run.total_steps} steps")

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
            negatives = step_negatives(micro, cfg.tasks)  # InfoNCE's columns: the whole global batch
            terms = {}
            for j, batch in enumerate(micro):
                sync = net.no_sync() if ddp and j < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss, parts = net(batch, negatives)
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

    # ---- export ----------------------------------------------------------------------------------------------
    if is_main:
        target_shapes = {t: list(run.store.manifest.tasks[t].shape) for t in cfg.tasks}
        info = {"llm": cfg.llm, "vision_tower": cfg.vision_tower, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": cfg.vision_select_layer, "mm_hidden_size": model.vision.hidden_size,
                "hidden_size": model.llm.config.hidden_size, "chat_template": cfg.chat_template,
                "image_offset": model.layout.prefix, "num_image_tokens": model.num_image_tokens,
                "tasks": cfg.tasks, "token_order": ["gen", "depth", "seg"], "layers": cfg.layers,
                "task_tokens": cfg.task_tokens, "special_tokens": cfg.special_tokens, "predictor": cfg.predictor,
                "target_shapes": target_shapes,
                "target_token_order": "row-major: token index = row * 24 + col",
                "teachers": run.store.teachers(), "store": run.store.url, "steps": step,
                "global_batch_size": cfg.global_batch_size}
        exp = checkpoint.export(out, model, info)
        log(f"exported to {exp}")
        if tb is not None:
            tb.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _one_line(e: Exception) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, without the worker's traceback."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def run(argv=None) -> int:
    try:
        return main(argv)
    except (StoreError, ManifestError, TrainerError, checkpoint.CheckpointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
