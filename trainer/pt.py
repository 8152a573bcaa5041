"""OLA-VLM's PT stage (or LLaVA-1.5's, or VLoRA's), trained from a store: the teachers are never loaded.

    python -m trainer.pt --store STORE --llm meta-llama/Meta-Llama-3-8B-Instruct \\
        --vision-tower openai/clip-vit-large-patch14-336 --output-dir OUT \\
        [--config trainer/configs/ola_vlm_pt.yaml] [--max-steps N] [--resume] [--set key=value ...]
    torchrun --nproc_per_node 8 -m trainer.pt ...       # the same on several GPUs (nccl) or CPU processes (gloo)
    python -m trainer.pt ... --set tasks=[]             # LLaVA-1.5's PT: next-token prediction only (the baseline)
    python -m trainer.pt --config trainer/configs/vlora_pt.yaml ...   # VLoRA's PT (docs/vlora.md)

Frozen: the base encoder (CLIP-ViT or CLIP-ConvNeXT) and the LLM. Trained: the mlp2x_gelu projector, the task
tokens, the embedding predictors and the logit scales (AdamW, cosine with warm-up). The data come in the store's
global order (store.order), whatever the number of processes. Outputs in OUT: logs/train.jsonl (every
logged step, every loss term), logs/samples.jsonl (each step's sample ids), tensorboard/, checkpoints/step-NNNNNN
(--resume continues with the same samples and losses, also on another number of processes), and export/
(mm_projector.bin with LLaVA's key names, task tokens, predictors, config.json: trainer.export; `python -m
trainer.export` writes the folder OLA-VLM's IFT loads). Plot the losses with `python -m trainer.plot OUT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.build import build
from trainer.config import PTConfig, load_config
from trainer.formats.common import model_info, write_export
from trainer.formats.run_export import export_llava
from trainer.loop import run_cli, start, teardown, train
from trainer.sharding import trained_state_bytes


def parse_args(argv=None) -> PTConfig:
    p = argparse.ArgumentParser(prog="python -m trainer.pt", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", help="store written by pipeline.extract_teachers: a folder or a URL "
                                                     "(s3://bucket/prefix); its WebDataset shards are read. Repeat it "
                                                     "to mix several stores in one global order")
    p.add_argument("--mix", help="with several --store: each one's share of the samples drawn, e.g. 3,1 (default: "
                                 "proportional to their sizes); a share above a store's size repeats its samples, "
                                 "below it takes a subset chosen by the seed")
    p.add_argument("--eval-store", help="a store of held-out samples: every --eval-every steps, the NTP loss and "
                                        "each task's embedding losses per layer on them (logs/eval.jsonl)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (with --eval-store)")
    p.add_argument("--eval-samples", type=int, help="held-out samples each evaluation reads (default 256), the "
                                                    "same ones every time: the first of the eval store's order")
    p.add_argument("--llm", help="HF id or folder of the causal LM (default: Meta-Llama-3-8B-Instruct)")
    p.add_argument("--vision-tower", help="HF id or folder of the base encoder: CLIP-ViT (default: "
                                          "openai/clip-vit-large-patch14-336) or an open_clip ConvNeXt "
                                          "(laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768)")
    p.add_argument("--output-dir", help="where logs, checkpoints and the export go")
    p.add_argument("--config", action="append", default=[], help="YAML overriding the defaults (repeatable)")
    p.add_argument("--teachers-manifest", help="teacher manifest the store must match (default: recipes' ola_vlm.yaml)")
    p.add_argument("--fidelity", choices=["original", "corrected"], help="fidelity the store must have")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: epochs x samples / global batch)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    a = p.parse_args(argv)
    try:
        stores = {"store": a.store[0]} if a.store and len(a.store) == 1 else {"data.stores": a.store}
        return load_config(a.config, {**stores, "data.mix": a.mix, "data.eval_store": a.eval_store,
                                      "run.eval_every": a.eval_every, "run.eval_samples": a.eval_samples, "llm": a.llm, "vision_tower": a.vision_tower,
                                      "output_dir": a.output_dir, "teachers_manifest": a.teachers_manifest,
                                      "fidelity": a.fidelity, "max_steps": a.max_steps, "resume": a.resume or None},
                           a.set)
    except (ValueError, OSError) as e:
        p.error(str(e))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    rank, world, device, dtype, log = start(cfg)
    run = build(cfg, device, dtype, rank, world)  # the store is checked before any model loads
    model, stream = run.model, run.stream
    for note in stream.notes:
        log(f"note: {note}")
    log(f"model: {cfg.model.llm} ({model.config.num_hidden_layers} layers, width {model.config.hidden_size}, {run.attn}), "
        f"{cfg.model.vision_tower}; image offset {model.layout.prefix}; "
        f"{sum(p.numel() for p in run.trainable):,} trainable parameters; {dtype} on {device}"
        + (f" x {world}" if world > 1 else ""))
    state = trained_state_bytes(model)
    log(f"trained state per rank: {state['total']:,} bytes (parameters {state['parameters']:,} + gradients "
        f"{state['gradients']:,} + AdamW {state['optimizer']:,}), sharding {cfg.model.sharding}"
        + (f" over {world} ranks" if run.sharded else " (whole on every rank)" if world > 1 else
           " (one process: nothing to split)" if cfg.model.sharding == "fsdp" else ""))
    log(f"data: {stream.num_samples:,} usable samples per epoch, global batch {cfg.optim.global_batch_size} = "
        f"{stream.accum} x {cfg.optim.micro_batch_size} x {world} processes, {run.total_steps} steps")
    if run.held_out:
        note = run.held_out.note(cfg.run.eval_samples)
        log(f"held-out: {run.held_out.samples} samples of {cfg.data.eval_store} every {cfg.run.eval_every} steps "
            f"(logs/eval.jsonl)" + (f"; note: {note}" if note else ""))
    out = Path(cfg.run.output_dir)
    train(run, out, rank, world, log, meta={"model": model_info(run)})
    if rank == 0:  # the last checkpoint, exported as every later `trainer.export` of it would be
        log(f"exported to {write_export(export_llava, out, out / 'export')}")
    teardown(world)
    return 0


def run(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
