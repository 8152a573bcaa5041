"""Part `pt`: one PT step per sample (trainer.loop.train_step) and its memory for each PT model at full size, OLA-VLM's
step with the teachers inside it, the task tokens' and heads' share, the stored targets' stream against the step."""

from __future__ import annotations

import os

import torch

from benchmarks import loader, vlora_step
from benchmarks.gpu_proof.runner import Proof, fits, ratio
from benchmarks.gpu_proof.setup import Setup, frozen_models, in_step_targets, jpegs, teacher_models
from benchmarks.timing import median_seconds


def part_pt(proof: Proof, s: Setup) -> None:
    """One PT step per sample (trainer.loop.train_step: forward with the loss inside, backward, AdamW) for each PT
    model, as the trainer builds it; OLA-VLM's step again with the teachers inside it; the memory each took."""
    proof.check("building the models")
    tok, llm, tower, _, over = frozen_models(s)
    teachers = teacher_models(s)
    shapes = {t: tuple(teacher.spec.output_shape) for t, teacher in teachers.items()}  # what the heads predict
    rows = {}
    for name in vlora_step.MODES:
        proof.check(name)
        rows[name] = pt_row(s, tok, llm, tower, shapes, over, name)
        proof.put("modes", rows)
    ola, llava = rows["OLA-VLM PT"], rows["LLaVA-1.5 PT (projector, NTP)"]
    share = ratio(llava.get("ms_per_sample"), ola.get("ms_per_sample"), 4)
    proof.put("task_tokens_and_heads_share", round(1 - share, 3) if share else None)
    proof.check("VLoRA PT with its trained state under FSDP2 (model.sharding: fsdp)")
    proof.put("vlora_fsdp", pt_row(s, tok, llm, tower, shapes, over, "VLoRA PT", fsdp=True))
    proof.check("OLA-VLM's step with the teachers inside it")
    inline = pt_row(s, tok, llm, tower, shapes, over, "OLA-VLM PT", teachers)
    proof.put("teachers_in_step", {**inline, "stored_vs_in_step": ratio(inline.get("ms_per_sample"),
                                                                        ola.get("ms_per_sample"))})
    loader_feed(proof, s, ola)


def loader_feed(proof: Proof, s: Setup, ola: dict) -> None:
    """The stream of stored targets the trainer reads (one rank, DataLoader workers, full-shape fp16 targets from a
    WebDataset store; benchmarks/loader.py) against what OLA-VLM's step consumes: whether the data keep up."""
    proof.check("the stream of stored targets")
    n, shard, workers = (16, 8, 1) if s.tiny else (512, 32, min(8, os.cpu_count() or 1))
    url = str(s.work / "loader-store")
    loader.build(url, n, shard)
    rate = loader.stream_rate(url, s.pt_batch, workers)
    consumed = 1e3 / ola["ms_per_sample"] if ola.get("ms_per_sample") else None
    proof.put("loader", {"samples": n, "workers": workers, "samples_per_s": round(rate, 1),
                         "step_consumes_per_s": round(consumed, 2) if consumed else None,
                         "headroom": ratio(rate, consumed)})


def config(paths: list, **over):
    """The trainer's config from `paths` over its defaults, for a model built here (no store, no run folder)."""
    from trainer.config import load_config

    return load_config(paths, {"store": "unused", "output_dir": "unused", **over})


def one_rank_group(device: torch.device) -> None:
    """A process group of this process alone (FSDP2 needs one), unless there is one."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def pt_row(s: Setup, tok, llm, tower, shapes, over, mode: str, teachers=None, fsdp: bool = False) -> dict:
    """One of vlora_step.MODES, its gradient checkpointing as configured; with `teachers`, their targets computed
    inside the step; `fsdp`: its trained state under FSDP2 on a one-rank group (the code path of
    `model.sharding: fsdp`, its memory and time on one GPU; the saving itself needs several)."""
    from trainer.build import PTRun, enable_checkpointing, trainable
    from trainer.loop import train_step
    from trainer.sharding import shard_trained, trained_state_bytes

    model, layout, cfg = vlora_step.pt_model(mode, tok, llm, tower, shapes, over, s.device)
    sharded = None
    if fsdp:
        one_rank_group(s.device)
        sharded = shard_trained(model, 1, s.device, always=True)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(llm)
        llm.train()
    else:
        llm.gradient_checkpointing_disable()
    batch = vlora_step.batch_for(layout, s.pt_batch, 32, shapes, cfg.tasks.names, s.device)
    raw = jpegs(s.pt_batch) if teachers else None
    run = trainable(cfg, model, s.device, s.dtype, total_steps=1000)
    if sharded:
        run = PTRun(**vars(run), sharded=sharded)

    def step():
        if teachers:  # the original's way: per image, the PIL recipe and a batch-1 forward, inside the step
            with torch.no_grad():
                batch["targets"] = in_step_targets(teachers, raw, s)
        train_step(run, [batch])

    row = {"batch": s.pt_batch, "llm_tokens": layout.text_start + 32,
           "gradient_checkpointing": cfg.model.gradient_checkpointing,
           "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "trained_state_bytes": trained_state_bytes(model)["total"], "sharding": "fsdp" if fsdp else "none"}
    s.reset_memory()
    try:
        secs = fits(lambda: median_seconds(step, s.device, min_calls=s.steps))
    finally:
        vlora_step.release(model)  # the LLM is shared by the next rows
    if secs is None:
        return {**row, "out_of_memory": True}
    return {**row, "ms_per_sample": round(1e3 * secs / s.pt_batch, 2), "peak_mem_gib": s.peak_memory_gib()}
