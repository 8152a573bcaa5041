"""VLoRA's PT step against OLA-VLM's (and LLaVA-1.5's) on the same LLM and tower, side by side.

    python -m benchmarks.vlora_step [--size tiny|layers|both] [--repeats 3]

Each row is one PT model of trainer.model.OLAPT, built as the trainer builds it (connector, layout, template),
stepping on a synthetic micro-batch with the trainer's own step (trainer.loop.train_step: forward with the loss
inside, backward, AdamW). Per sample: the step's time (median), the activations autograd saves
for the backward pass (a count of bytes, not a timing: the same on any machine), the sequence length the LLM
runs, the trained parameters; the generator's share of the step time (its forward and backward on their own).
Weights are not activations: the counts leave out every parameter and buffer.

`tiny`: trainer.tiny's models (20 layers x 64, GQA; CLIP 24x24 grid x 32) and VLoRA at D 32. `layers`: real
widths, few layers (CPU-sized): Llama-3-8B's (4096, 32 heads, 8 KV heads, 14336, vocab 128256) with 2 layers,
CLIP-L/336's (1024, 16 heads) with 2 layers, VLoRA's generator at their finetune.sh width D 512, depth 8, rank 64
(the PT width D 1024 has 2.03 B parameters: 8 GB in fp32 without optimizer state, over this machine's budget
beside the rest), deltas in both layers (skip_layers 2). On a GPU, bf16.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import median_seconds
from recipes.manifest import TASKS
from trainer.build import sequence_layout, trainable
from trainer.config import load_config, with_values
from trainer.loop import train_step
from trainer.model import OLAPT
from trainer.towers import CLIPTower
from trainer.vlora import VLoRAGenerator

REPO = Path(__file__).resolve().parents[1]

MODES = {  # name: (connector, template, tasks)
    "LLaVA-1.5 PT (projector, NTP)": ("mlp2x_gelu", "llama_3", []),
    "OLA-VLM PT": ("mlp2x_gelu", "llama_3", list(TASKS)),
    "VLoRA PT": ("vlora", "plain", []),
    "VLoRA + OLA-VLM losses": ("vlora", "plain", list(TASKS)),
}


def models(size: str, work: Path, device, dtype):
    """(tokenizer, llm, tower, target shapes, cfg overrides) at `size`: tiny, layers or full."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from trainer.tiny import build_tokenizer

    tok = build_tokenizer(work / "tok", [])
    if size == "tiny":
        llm_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=20,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        tower_cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=3, num_attention_heads=2)
        shapes = {"gen": (1, 32), "depth": (576, 32), "seg": (576, 48)}
        over = {"vlora": {"vlora_dim": 32, "vlora_depth": 2, "vlora_rank": 4, "vlora_alpha": 8}}
    else:  # `layers`: real widths, 2 layers; `full`: Llama-3-8B and CLIP-L/336 whole, VLoRA's PT settings
        full = size == "full"
        llm_cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32 if full else 2, num_attention_heads=32, num_key_value_heads=8,
                              rope_theta=500000.0, tie_word_embeddings=False)
        tower_cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24 if full else 2, num_attention_heads=16)
        shapes = {"gen": (1, 1024), "depth": (576, 1024), "seg": (576, 1536)}
        over = {"vlora": vlora_pt_settings()} if full else {
            "vlora": {"vlora_dim": 512, "vlora_depth": 8, "vlora_rank": 64, "vlora_alpha": 64, "skip_layers": 2},
            "layers": {"gen": [2], "depth": [1, 2], "seg": [1, 2]}}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # an 8B model is built in its dtype, never in float32 first
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(llm_cfg).eval().requires_grad_(False)
            tower = CLIPTower(CLIPVisionModel(tower_cfg).eval(), -2)
    finally:
        torch.set_default_dtype(default)
    return tok, llm, tower, shapes, over


def vlora_pt_settings() -> dict:
    """VLoRA's PT generator settings, as trainer/configs/vlora_pt.yaml gives them (D 1024, depth 8, rank 64)."""
    import yaml

    return yaml.safe_load((REPO / "trainer" / "configs" / "vlora_pt.yaml").read_text())["vlora"]


def batch_for(layout, b: int, text: int, shapes: dict, tasks, device) -> dict:
    g = torch.Generator().manual_seed(1)
    out = {"pixels": torch.randint(0, 255, (b, 336, 336, 3), dtype=torch.uint8, generator=g),
           "prefix_ids": torch.randint(3, 200, (b, layout.prefix), generator=g),
           "text_ids": torch.randint(3, 200, (b, text), generator=g), "text_mask": torch.ones(b, text, dtype=torch.long),
           "targets": {t: torch.randn(b, *shapes[t], generator=g) for t in tasks},
           "valid": {t: torch.ones(b, dtype=torch.bool) for t in tasks}, "row_offset": 0}
    out["text_labels"] = out["text_ids"].clone()
    return {k: ({t: x.to(device) for t, x in v.items()} if isinstance(v, dict) else
                v.to(device) if torch.is_tensor(v) else v) for k, v in out.items()}


def saved_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the activations autograd saves for the backward pass while `fn` runs (each storage once; the
    model's own weights, which autograd also keeps a reference to, are not counted)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and key[0] not in weights:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def pt_model(mode: str, tok, llm, tower, shapes: dict, over: dict, device, **settings):
    """(model, layout, config) of one of MODES, as the trainer builds it, on the shared LLM and tower; `over` and
    `settings` replace config values (models()' sizes, gradient_checkpointing)."""
    connector, template, tasks = MODES[mode]
    cfg = load_config([], {"store": "unused", "output_dir": "unused", "connector": connector, "chat_template": template,
                           "tasks": ",".join(tasks) or "[]"})
    cfg = with_values(cfg, **over, **settings)
    layout, _ = sequence_layout(cfg, tok, tower)
    torch.manual_seed(0)
    model = OLAPT(cfg, llm, tower, {t: shapes[t] for t in tasks}, layout, (0.5,) * 3, (0.25,) * 3).to(device)
    return model, layout, cfg


def release(model) -> None:
    """Take a VLoRA connector's hooks off the LLM, which the next model shares."""
    for h in getattr(model.projector, "_hooks", []):
        h.remove()


def measure(size: str, repeats: int, device, dtype, work: Path) -> list[dict]:
    tok, llm, tower, shapes, over = models(size, work, device, dtype)
    b = 4 if size == "tiny" else 1
    rows = []
    for name, (connector, _, tasks) in MODES.items():
        model, layout, cfg = pt_model(name, tok, llm, tower, shapes, over, device, gradient_checkpointing=False)
        batch = batch_for(layout, b, 32, shapes, tasks, device)
        run = trainable(cfg, model, device, dtype, total_steps=1000)

        def step(run=run, batch=batch):
            train_step(run, [batch])

        step_s = median_seconds(step, device, repeats)
        activations = saved_bytes(lambda model=model, batch=batch: model(batch)[0], model)
        gen_s = None
        if connector == "vlora":
            feats = torch.randn(b, tower.num_tokens, tower.hidden_size, device=device, dtype=dtype)
            def generator_step(conn=model.projector, feats=feats):  # the generator alone: its factors A
                VLoRAGenerator.forward(conn, feats).float().sum().backward()

            gen_s = median_seconds(generator_step, device, repeats)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        gen_params = sum(p.numel() for p in model.projector.parameters())
        rows.append({"size": size, "mode": name, "ms_per_sample": 1000 * step_s / b,
                     "activation_mb_per_sample": activations / b / 2**20, "llm_tokens": layout.text_start + 32,
                     "trained": trained, "connector_params": gen_params,
                     "generator_share": gen_s / step_s if gen_s else None})
        release(model)
        del model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "layers", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    work = Path(tempfile.mkdtemp(prefix="olaf-bench-vlora-"))
    sizes = ["tiny", "layers"] if a.size == "both" else [a.size]
    dev = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# PT step per sample, forward + backward, {dev}, {dtype}")
    print(f"{'size':<7} {'mode':<32} {'ms/sample':>10} {'x VLoRA':>8} {'act. MB/smp':>12} {'LLM tokens':>10} "
          f"{'trained':>14} {'connector':>14} {'gen. share':>10}")
    for size in sizes:
        rows = measure(size, a.repeats, device, dtype, work)
        ref = next(r for r in rows if r["mode"] == "VLoRA PT")["ms_per_sample"]
        for r in rows:
            share = f"{r['generator_share']:.2f}" if r["generator_share"] is not None else "-"
            print(f"{r['size']:<7} {r['mode']:<32} {r['ms_per_sample']:>10.1f} {r['ms_per_sample'] / ref:>7.2f}x "
                  f"{r['activation_mb_per_sample']:>12.1f} {r['llm_tokens']:>10} {r['trained']:>14,} "
                  f"{r['connector_params']:>14,} {share:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
