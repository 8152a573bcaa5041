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
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.store import Store, StoreError, TargetStream
from pipeline.teacher_manifest import REPO_ROOT, ManifestError, load_manifest
from trainer import checkpoint
from trainer.config import PTConfig, load_config
from trainer.data import ImageRecipe, PTSample, collate, worker_init
from trainer.loss import pt_loss
from trainer.model import OLAPT
from trainer.templates import PromptBuilder, get_template


def parse_args(argv=None) -> PTConfig:
    p = argparse.ArgumentParser(prog="python -m trainer.pt", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="store written by pipeline.extract_teachers: a folder or a URL (s3://bucket/prefix); "
                                   "its WebDataset shards are read")
    p.add_argument("--llm", help="HF id or folder of the causal LM (default: Meta-Llama-3-8B-Instruct)")
    p.add_argument("--vision-tower", help="HF id or folder of the CLIP vision tower (default: clip-vit-large-patch14-336)")
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
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resolve_manifest(path: str) -> Path:
    p = Path(path)
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p


class TrainerError(Exception):
    """Something the user can fix; the message says what (exit status 2)."""


def _from_pretrained(what: str, load, name: str, **kw):
    """One message instead of transformers' chained tracebacks for a model that is not there."""
    try:
        return load(name, **kw)
    except (OSError, ValueError) as e:
        if Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).exists():
            hint = f"the folder {name} does not exist" if not Path(name).exists() else "that folder is not a model"
        elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            hint = "HF_HUB_OFFLINE is set and it is not in the HF cache (HF_HOME): download it once online or pass a local folder"
        else:
            hint = "not found on the Hub or in the cache: check the id, your token (HF_TOKEN) and the network"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TrainerError(f"cannot load the {what} {name!r}: {hint} ({first})") from None


def load_frozen(cfg: PTConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "sdpa"
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401

                attn = "flash_attention_2"
            except ImportError:
                pass
    tokenizer = _from_pretrained("LLM tokenizer", AutoTokenizer.from_pretrained, cfg.llm)
    llm = _from_pretrained("LLM", AutoModelForCausalLM.from_pretrained, cfg.llm, dtype=dtype,
                           attn_implementation=attn).to(device)
    vision = _from_pretrained("vision tower", CLIPVisionModel.from_pretrained, cfg.vision_tower, dtype=dtype).to(device)
    if cfg.gradient_checkpointing:
        # the LLM is frozen but gradients flow through it to the projector and task tokens
        kw = {"use_reentrant": False}
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    llm.train()  # no dropout in these LMs; train mode is what switches checkpointing on
    return tokenizer, llm, vision, attn


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

    # ---- the store, checked before any model is loaded --------------------------------------------------------
    expected = load_manifest(resolve_manifest(cfg.teachers_manifest), fidelity=cfg.fidelity).identity(cfg.tasks)
    store = Store(cfg.store)
    store.require(cfg.tasks, expected_teachers=expected, allow_partial=cfg.allow_partial_store, formats=["wds"])
    for note in store.notes:
        log(f"note: {note}")
    usable = sum(store.records[i].count - store.records[i].bad_images for i in store.done_shards(cfg.tasks))
    if usable == 0:
        raise StoreError(f"store {store.url}: none of its {store.samples_done(cfg.tasks)} samples in done shards has "
                         f"a usable image (errors.jsonl says why): nothing to train on")
    target_shapes = {t: tuple(store.manifest.tasks[t].shape) for t in cfg.tasks}
    if not cfg.resume and checkpoint.latest(out) is not None:
        raise SystemExit(f"error: {out} already has checkpoints: pass --resume to continue, or use a new --output-dir")

    # ---- model -----------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initialisation on every rank
    tokenizer, llm, vision, attn = load_frozen(cfg, device, dtype)
    builder = PromptBuilder(tokenizer, get_template(cfg.chat_template), max_text_tokens=1)
    image = ImageRecipe.from_pretrained(cfg.vision_tower, cfg.image_aspect)
    model = OLAPT(cfg, llm, vision, target_shapes, builder.image_offset, image.mean, image.std).to(device)
    builder.max_text_tokens = cfg.max_length - model.layout.text_start
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"model: {cfg.llm} ({llm.config.num_hidden_layers} layers, width {llm.config.hidden_size}, {attn}), "
        f"{cfg.vision_tower}; image offset {builder.image_offset}; {sum(p.numel() for p in trainable):,} trainable "
        f"parameters; {dtype} on {device}" + (f" x {world}" if world > 1 else ""))

    # ---- optimisation ---------------------------------------------------------------------------------------
    from transformers import get_cosine_schedule_with_warmup

    accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    if accum < 1 or accum * cfg.micro_batch_size * world != cfg.global_batch_size:
        raise SystemExit(f"error: global batch {cfg.global_batch_size} is not micro batch {cfg.micro_batch_size} x "
                         f"{world} processes x an integer")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * store.num_samples / cfg.global_batch_size))
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    # ---- resume: parameters, optimizer, scheduler, RNG, data position ----------------------------------------
    step, micro_batches, positions = 0, 0, {}
    if cfg.resume and (ckpt := checkpoint.latest(out)) is not None:
        state = checkpoint.load(ckpt, model, optimizer, scheduler)
        step, micro_batches = state["step"], state["micro_batches"]
        positions = {int(w): p for w, p in state["positions"].get(str(rank), {}).items()}
        log(f"resumed from {ckpt} at step {step}")
    workers = max(cfg.num_workers, 1)
    stream = TargetStream(store, cfg.tasks, expected_teachers=expected, shuffle_buffer=cfg.shuffle_buffer,
                          seed=cfg.seed, rank=rank, world_size=world, allow_partial=cfg.allow_partial_store,
                          skip=[positions.get(w, 0) for w in range(workers)], worker_offset=micro_batches % workers,
                          map_fn=PTSample(builder, image, cfg.tasks, target_shapes, cfg.skip_bad_images))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.micro_batch_size, num_workers=cfg.num_workers,
                                         collate_fn=partial(collate, pad_id=pad_id), pin_memory=cuda,
                                         worker_init_fn=worker_init,
                                         persistent_workers=cfg.num_workers > 0,
                                         prefetch_factor=4 if cfg.num_workers > 0 else None)
    ddp = world > 1
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if ddp else model

    # ---- logging ---------------------------------------------------------------------------------------------
    logs = out / "logs"
    tb = None
    if is_main:
        logs.mkdir(parents=True, exist_ok=True)
        jsonl = logs / "train.jsonl"
        if cfg.resume and jsonl.exists():  # drop what a killed run logged after its last checkpoint
            kept = [ln for ln in jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            jsonl.write_text("".join(ln + "\n" for ln in kept))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(out / "tensorboard")
            except ImportError:
                log("note: tensorboard is not installed: no TensorBoard events (logs/train.jsonl has everything)")
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)

    # ---- the loop --------------------------------------------------------------------------------------------
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and cuda else contextlib.nullcontext()
    try:  # the bar is closed whatever happens, so an error starts on its own line
        data = iter(loader)
        while step < total_steps:
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            tokens = samples = 0
            valid_counts = {t: 0 for t in cfg.tasks}
            for micro in range(accum):
                batch = next(data)
                worker, pos = batch["stream"]
                positions[worker] = pos + 1
                micro_batches += 1
                sync = net.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext()
                with sync, autocast:
                    ntp, preds = net(batch["pixels"].to(device, non_blocking=True),
                                     batch["prefix_ids"].to(device), batch["text_ids"].to(device),
                                     batch["text_mask"].to(device), batch["text_labels"].to(device))
                    targets = {t: x.to(device, non_blocking=True) for t, x in batch["targets"].items()}
                    valid = {t: v.to(device) for t, v in batch["valid"].items()}
                    loss, terms = pt_loss(ntp, preds, targets, valid, model.logit_scales, cfg)
                    (loss / accum).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / accum
                samples += batch["pixels"].shape[0]
                tokens += int(batch["text_mask"].sum()) + model.layout.text_start * batch["pixels"].shape[0]
                for t in cfg.tasks:
                    valid_counts[t] += int(batch["valid"][t].sum())
            if cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # metrics: averaged (losses) or summed (counts) over ranks
            keys = sorted(sums)
            vec = torch.tensor([sums[k] for k in keys] + [samples, tokens] + [valid_counts[t] for t in cfg.tasks],
                               dtype=torch.float64, device=device)
            if ddp:
                dist.all_reduce(vec)
                vec[: len(keys)] /= world
            secs = time.perf_counter() - t0
            record = {"step": step, "lr": lr, "grad_norm": grad_norm, **{k: float(v) for k, v in zip(keys, vec[: len(keys)], strict=True)},
                      "samples": int(vec[len(keys)]), "samples_per_s": float(vec[len(keys)]) / secs,
                      "tokens_per_s": float(vec[len(keys) + 1]) / secs,
                      **{f"valid/{t}": int(vec[len(keys) + 2 + i]) for i, t in enumerate(cfg.tasks)}}
            if is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", smp_s=f"{record['samples_per_s']:.1f}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                if step % cfg.log_every == 0 or step == total_steps:
                    with open(logs / "train.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if tb is not None:
                        for k, v in record.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
            if step % cfg.save_every == 0 or step == total_steps:
                everyone = [None] * world
                mine = {str(w): p for w, p in positions.items()}
                if ddp:
                    dist.all_gather_object(everyone, mine)
                else:
                    everyone = [mine]
                if is_main:
                    state = {"micro_batches": micro_batches, "positions": {str(r): p for r, p in enumerate(everyone)},
                             "config": dataclasses.asdict(cfg)}
                    checkpoint.save(out, step, model, optimizer, scheduler, state, cfg.keep_checkpoints)
    finally:
        bar.close()

    # ---- export ----------------------------------------------------------------------------------------------
    if is_main:
        info = {"llm": cfg.llm, "vision_tower": cfg.vision_tower, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": cfg.vision_select_layer, "mm_hidden_size": vision.config.hidden_size,
                "hidden_size": llm.config.hidden_size, "chat_template": cfg.chat_template,
                "image_offset": builder.image_offset, "num_image_tokens": model.num_image_tokens,
                "tasks": cfg.tasks, "token_order": ["gen", "depth", "seg"], "layers": cfg.layers,
                "task_tokens": cfg.task_tokens, "special_tokens": cfg.special_tokens, "predictor": cfg.predictor,
                "target_shapes": {t: list(s) for t, s in target_shapes.items()},
                "target_token_order": "row-major: token index = row * 24 + col",
                "teachers": store.teachers(), "store": store.url, "steps": step,
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
