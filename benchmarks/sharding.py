"""The trained state per rank under `model.sharding: none` (DDP) and `fsdp` (FSDP2), measured, then the arithmetic at
VLoRA's released width.

    python -m benchmarks.sharding [--vlora-dim 512] [--vlora-depth 8] [--vlora-rank 32]

Measured: VLoRA's PT model (trainer.model.OLAPT with the VLoRA connector, built as the trainer builds it) on
trainer.tiny's LLM and tower, its generator at a width that fits this machine; 1 and 2 gloo processes on this
machine, each taking one real step (`trainer.loop.train_step`: forward, backward, AdamW) so gradients and both
moments exist; then each rank counts the bytes its own tensors hold: the trained modules' parameters (its shard
under fsdp), their gradients and AdamW's state. "start-up line" is what `trainer.pt` prints for the same model
(`trainer.sharding.trained_state_bytes`).

Arithmetic: the released generator (docs/vlora.md: 2,027,531,264 parameters at D 1024, depth 8, rank 64, on
Llama-3-8B's 32 x 4096 and CLIP-L/336) in fp32 with AdamW: 16 bytes a parameter, whole on every GPU under DDP,
1/N of it under fsdp; the frozen LLM and tower, activations and FSDP's gathered unit (one weight generator at a
time) come on top.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

GPUS = (1, 8, 64)


def _rank_main(rank: int, world: int, port: int, sharding: str, over: dict, work: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from benchmarks import vlora_step
    from trainer.build import PTRun, trainable
    from trainer.loop import train_step
    from trainer.sharding import local, shard_trained, trained_state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device("cpu")
    tok, llm, tower, shapes, _ = vlora_step.models("tiny", Path(work), device, torch.float32)
    model, layout, cfg = vlora_step.pt_model("VLoRA PT", tok, llm, tower, shapes, over, device,
                                             gradient_checkpointing=False)
    sharded = shard_trained(model, world, device) if sharding == "fsdp" else None
    run = trainable(cfg, model, device, torch.float32, total_steps=10)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not sharded else model
    if sharded:
        run = PTRun(**vars(run), sharded=sharded)
    batch = vlora_step.batch_for(layout, 1, 8, shapes, [], device)
    train_step(run, [batch], net)  # AdamW's moments exist after a step
    net(batch)[0].backward()  # and the gradients after a backward (the step sets them to None)
    params = [p for n, p in model.named_parameters() if p.requires_grad or n.startswith("predictors.")]
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    measured = {"parameters": sum(size(p) for p in params),
                "gradients": sum(size(p.grad) for p in params if p.grad is not None),
                "optimizer": sum(size(v) for s in run.optimizer.state.values() for v in s.values()
                                 if torch.is_tensor(v) and v.dim() > 0)}
    if rank == 0:
        Path(out).write_text(json.dumps({**measured, "startup": trained_state_bytes(model)["total"],
                                         "trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(sharding: str, world: int, over: dict, work: Path) -> dict:
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / f"{sharding}-{world}.json"
    torch.multiprocessing.spawn(_rank_main, args=(world, port, sharding, over, str(work), str(out)), nprocs=world,
                                join=True)
    return json.loads(out.read_text())


def released_parameters() -> int:
    import dataclasses

    from benchmarks import vlora_step
    from trainer.vlora import VLoRASettings, parameter_count

    s = dataclasses.asdict(VLoRASettings.of(vlora_step.vlora_pt_settings()))
    s.update(vlora_visual_dim=1024, vlora_pos_num=576, vlora_llm_dim=4096, vlora_llm_depth=32)
    return parameter_count(s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlora-dim", type=int, default=512)
    p.add_argument("--vlora-depth", type=int, default=8)
    p.add_argument("--vlora-rank", type=int, default=32)
    a = p.parse_args(argv)
    over = {"vlora": {"vlora_dim": a.vlora_dim, "vlora_depth": a.vlora_depth, "vlora_rank": a.vlora_rank,
                      "vlora_alpha": 2 * a.vlora_rank}}
    work = Path(tempfile.mkdtemp(prefix="olaf-bench-sharding-"))
    rows = [("none", 1), ("none", 2), ("fsdp", 2)]
    got = {r: measure(*r, over, work) for r in rows}
    trained = got[rows[0]]["trained"]
    print(f"# trained state per rank, measured: VLoRA PT, generator D {a.vlora_dim}, depth {a.vlora_depth}, rank "
          f"{a.vlora_rank} on trainer.tiny's LLM ({trained:,} trained parameters), fp32 + AdamW, after one step, CPU "
          f"gloo ranks")
    print(f"{'sharding':<22} {'ranks':>5} {'parameters':>14} {'gradients':>14} {'AdamW':>14} {'total':>14} "
          f"{'start-up line':>14} {'x DDP':>6}")
    whole = sum(got[rows[0]][k] for k in ("parameters", "gradients", "optimizer"))
    for (sharding, world), m in got.items():
        total = m["parameters"] + m["gradients"] + m["optimizer"]
        print(f"{sharding + (' (DDP)' if sharding == 'none' else ' (FSDP2)'):<22} {world:>5} {m['parameters']:>14,} "
              f"{m['gradients']:>14,} {m['optimizer']:>14,} {total:>14,} {m['startup']:>14,} {total / whole:>6.2f}")
    n = released_parameters()
    print(f"\n# arithmetic at the released width: {n:,} trained parameters x 16 bytes (fp32 weight, gradient, "
          f"two AdamW moments)")
    print(f"{'GPUs':>5} {'DDP GB/GPU':>12} {'fsdp GB/GPU':>12}")
    for g in GPUS:
        print(f"{g:>5} {16 * n / 1e9:>12.2f} {16 * n / g / 1e9:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
