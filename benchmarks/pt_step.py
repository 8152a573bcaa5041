"""PT step throughput: targets read from the store vs teachers run inside the step (the original's way).

    python -m benchmarks.pt_step [--size tiny|full] [--steps 10] [--micro-batch N] [--workers 2]

Same model, same data, side by side:
  * stored:   the trainer's step (frozen CLIP + projector + frozen LLM + predictors, loss, AdamW) on batches
              from the store's WebDataset stream (DataLoader workers decode images and targets);
  * teachers: the same step, but the three targets of every image computed inside the step, one image at a
              time, with the CPU preprocessing in the training process -- as OLA-VLM does;
  * loader:   the DataLoader alone (no model), to compare what the input pipeline delivers with what the
              step consumes.
`tiny`: the tiny stand-ins (trainer.tiny, teachers.tiny) on a store extracted here. `full`: Llama-3-8B, CLIP
ViT-L/14-336 and the three full-size teachers with random weights, on a store of random full-shape targets
(bf16 on CUDA; needs a large GPU). This script may import `teachers`; the trainer never does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import store
from benchmarks.timing import median_seconds
from pipeline.sample import generate
from recipes.imageops import decode_rgb
from recipes.manifest import TASKS, load_manifest
from recipes.preprocess import preprocess
from store import encodings
from teachers import depth, gen, seg
from teachers.registry import ADAPTERS, load_teachers
from trainer.build import build
from trainer.config import load_config, with_values
from trainer.loop import to_device, train_step


def tiny_setup(work: Path, samples: int):
    from teachers.tiny import build as build_teachers
    from trainer.tiny import build as build_models

    json_path = generate(work / "data", samples, seed=0)
    teachers_yaml = build_teachers(work / "teachers")
    models_cfg = build_models(work / "models", lm_steps=0)
    from support.reference import reference_store

    path = reference_store(work / "store", (json_path, work / "data" / "images"), teachers_yaml, shard=16,
                           teachers_yaml=True)
    cfg = load_config([models_cfg], {"store": str(path), "output_dir": str(work / "out"),
                                     "teachers_manifest": str(teachers_yaml)})
    teachers = load_teachers(load_manifest(teachers_yaml), cfg.tasks.names)
    return cfg, teachers


def full_setup(work: Path, samples: int, device, dtype):
    """Random full-size models saved to disk (LLM, tower) and a store of random full-shape targets."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from trainer.tiny import build_tokenizer

    json_path = generate(work / "data", samples, seed=0)
    tok = build_tokenizer(work / "llm", [])
    llm_cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device(device):
        LlamaForCausalLM(llm_cfg).to(dtype).save_pretrained(work / "llm")
    AutoTokenizer.from_pretrained(work / "llm").save_pretrained(work / "llm")
    vcfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    CLIPVisionModel(vcfg).to(dtype).save_pretrained(work / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3
                          ).save_pretrained(work / "vision")
    manifest = load_manifest()
    shapes = {t: manifest.teachers[t].output_shape for t in TASKS}
    layouts = {t: store.TaskLayout.for_shape(s, "fp16") for t, s in shapes.items()}
    from pipeline.inputs import load_records

    records, _ = load_records(json_path)
    m = store.RunManifest(dataset={"json": str(json_path)}, num_samples=len(records), shard_size=16,
                          formats=["wds"], tasks=layouts)
    path = work / "store"
    w = store.StoreWriter.create(path, m, manifest.identity(list(shapes)))
    for i in range(m.num_shards):
        a, b = m.shard_range(i)
        samples = [store.SampleResult(r.index, r.id, r.raw, r.image, (work / "data" / "images" / r.image).read_bytes())
                   for r in records[a:b]]
        vals = {t: encodings.encode(torch.randn(b - a, *s) * 0.5, "fp16")[0] for t, s in shapes.items()}
        w.commit_shard(store.ShardResult(i, tuple(shapes), samples, vals, dict.fromkeys(shapes),
                                         {t: np.ones(b - a, bool) for t in shapes}))
    cfg = load_config([], {"store": str(path), "output_dir": str(work / "out"), "llm": str(work / "llm"),
                           "vision_tower": str(work / "vision")})
    teachers = {}
    for t, mod in (("gen", gen), ("depth", depth), ("seg", seg)):
        spec = manifest.teachers[t]
        teachers[t] = ADAPTERS[spec.architecture].random(spec, mod.full_config(), device=device, dtype=dtype)
    return cfg, teachers


def loader_for(run, workers):
    """The trainer's loader from the start of the order (the run's stream, rewound)."""
    run.stream.position = 0
    return store.loader(run.stream, num_workers=workers, prefetch_factor=4)


def teacher_targets(teachers, batch_ids, raw_images: dict, device):
    """The original's way: per image, PIL preprocessing in this process, a batch-1 forward per teacher."""
    out = {t: [] for t in teachers}
    for key in batch_ids:
        rgb = decode_rgb(raw_images[key])
        for t, teacher in teachers.items():
            out[t].append(teacher(torch.from_numpy(preprocess(teacher.spec, rgb))[None].to(device))[0])
    return {t: torch.stack(v) for t, v in out.items()}


def timed_steps(run, loader, steps, teachers=None, raw_images=None):
    """Median samples/s of the trainer's step (trainer.loop.train_step: forward with the loss inside, backward,
    AdamW) over `steps`; with `teachers`, their targets computed inside the step first (the original's way)."""
    it = iter(loader)
    last = {}

    def step(batch):
        last["batch"] = batch
        on_device = to_device(batch, run.device)
        if teachers is not None:
            with torch.no_grad():
                on_device["targets"] = teacher_targets(teachers, batch["ids"], raw_images, run.device)
        train_step(run, [on_device])

    seconds = median_seconds(step, run.device, min_calls=steps, max_calls=steps, warmup=2, prepare=lambda: next(it))
    return last["batch"]["pixels"].shape[0] / seconds


def depth_head_cost(device, dtype, batch: int, repeats: int = 3) -> list[tuple[str, int, float]]:
    """(name, parameters, ms per forward+backward) of one depth predictor at Llama-3-8B's size: the released
    head (inner width 4096, the LLM's) vs the earlier olaf head (inner width 1024), on the keys of a PT
    sequence (~650 positions) and 576 latents."""
    from trainer.heads import Predictor

    H, keys_len = 4096, 650
    out = []
    for name, width in (("released: inner 4096", H), ("before: inner 1024", 1024)):
        torch.manual_seed(0)
        head = Predictor(H, 1024, 4, 32, 1, 1, width=width).to(device, dtype)
        keys = torch.randn(batch, keys_len, H, device=device, dtype=dtype, requires_grad=True)
        latents = torch.randn(batch, 576, H, device=device, dtype=dtype)
        mask = torch.ones(batch, keys_len, dtype=torch.bool, device=device)
        seconds = median_seconds(lambda h=head, k=keys, m=mask, z=latents: h(k, m, z).float().square().mean().backward(),
                                 device, min_calls=repeats, max_calls=repeats)
        out.append((name, sum(p.numel() for p in head.parameters()), 1000 * seconds))
    return out


def loader_rate(loader, batches):
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(next(it)["pixels"].shape[0] for _ in range(batches))
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=None, help="default 32 on CUDA, 4 on CPU")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=None, help="dataset size (default 96, 256 for full)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--head-batch", type=int, default=None, help="batch of the depth-head timing (default 32 CUDA, 1 CPU)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = a.micro_batch or (32 if cuda else 4)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="olaf-bench-pt-"))
    samples = a.samples or (256 if a.size == "full" else 96)
    cfg, teachers = tiny_setup(work, samples) if a.size == "tiny" else full_setup(work, samples, device, dtype)
    cfg = with_values(cfg, micro_batch_size=batch, global_batch_size=batch)
    run = build(cfg, device, dtype)
    raw = {}
    s = store.Store(cfg.data.store)
    for shard in s.done_shards():
        for d in s.iter_decoded(shard, []):
            if d["image"] is not None:
                raw[d["id"]] = d["image"]
    stored = timed_steps(run, loader_for(run, a.workers), a.steps)
    inline = timed_steps(run, loader_for(run, a.workers), a.steps, teachers=teachers, raw_images=raw)
    feed = loader_rate(loader_for(run, a.workers), a.steps * 2)
    dev = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# PT step benchmark: {a.size} models, {dev}, {dtype}, micro-batch {batch}, {a.workers} loader workers")
    print(f"{'mode':<28} {'samples/s':>10} {'ratio':>8}")
    print(f"{'teachers inside the step':<28} {inline:10.2f} {1.0:7.2f}x")
    print(f"{'targets from the store':<28} {stored:10.2f} {stored / inline:7.2f}x   (stored / in-step)")
    print(f"{'loader alone':<28} {feed:10.2f} {feed / stored:7.2f}x   (loader / step consumption)")
    head_batch = a.head_batch or (32 if cuda else 1)
    costs = depth_head_cost(device, dtype, head_batch)
    print(f"\n# one depth predictor at full size (LLM width 4096 -> 1024), batch {head_batch}, forward + backward; "
          f"the model has one per depth layer (2)")
    print(f"{'depth head':<24} {'parameters':>12} {'ms':>10} {'ratio':>7}")
    for name, n, ms in costs:
        print(f"{name:<24} {n:>12,} {ms:>10.1f} {ms / costs[-1][2]:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
