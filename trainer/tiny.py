"""Tiny random-weight stand-ins for the PT model's frozen parts, for tests and the demo.

    python -m trainer.tiny OUT_DIR [--captions DATA_JSON --lm-steps 300] [--seed 0]

Writes OUT_DIR/llm (a Llama-architecture causal LM with 20 layers, so the paper's layer sets apply as they are,
and width 64), OUT_DIR/llm's tokenizer (byte-level BPE trained here with the `tokenizers` library on the
templates' text and the sample vocabulary, with Llama-3's and Phi-3's special tokens and a Llama-3-style chat
template), OUT_DIR/clip_vision_tower (a CLIP vision model on 336 px with patch 14: the real 24x24 grid, width 32,
and its image processor config), and OUT_DIR/pt_tiny.yaml, a trainer config pointing at them with small
batches.

With --captions, the tiny LM is first trained for a few hundred steps on the dataset's captions (text only),
so that it is a language model of them and a tiny PT run has a real grounding problem to learn; otherwise its
weights are random. Either way these are stand-ins: nothing here resembles the real models' behaviour.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from store import StoreError, refuse_inside_store
from trainer.templates import TEMPLATES

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<pad>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLM_LAYERS, LLM_WIDTH = 20, 64


def corpus(texts: list[str]) -> list[str]:
    """What the tiny tokenizer is trained on: the chat templates' text, the dataset's texts given, a pangram."""
    lines = [t.system + t.user_start + t.assistant_start for t in TEMPLATES.values()]
    lines += texts or []
    lines += ["the quick brown fox jumps over the lazy dog 0123456789 .,;:!?'\"()"]
    return lines


def build_tokenizer(out: Path, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<pad>", model_max_length=4096)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_llm(out: Path, tokenizer, captions: list[str], lm_steps: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=LLM_WIDTH, intermediate_size=4 * LLM_WIDTH,
                      num_hidden_layers=LLM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if captions and lm_steps > 0:
        _fit_captions(model, tokenizer, captions, lm_steps)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def _fit_captions(model, tokenizer, captions: list[str], steps: int) -> None:
    """A short text-only LM fit on the captions, in the Llama-3 answer format."""
    t = TEMPLATES["llama_3"]
    texts = [t.assistant_start + c + t.sep for c in captions]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = [texts[i] for i in torch.randint(len(texts), (32,), generator=g).tolist()]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_vision_tower(out: Path, seed: int):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 1)
    cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                          resample=3).save_pretrained(out)


def build_convnext_tower(out: Path, seed: int = 0) -> str:
    """A tiny CLIP-ConvNeXt image tower laid out as an open_clip checkpoint (visual.trunk.* in timm's names,
    open_clip_config.json), for `--vision-tower <returned name>` (the name carries -res768, as the real one)."""
    from safetensors.torch import save_file
    from transformers import ConvNextModel

    from trainer.towers import convnext_config, hf_to_timm

    out.mkdir(parents=True, exist_ok=True)
    geometry = {"depths": [1, 1, 2, 1], "hidden_sizes": [8, 16, 24, 32], "layer_norm_eps": 1e-5}
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "convnext_tiny_random",
                                                            "olaf_convnext": geometry, "image_size": 768}}}
    torch.manual_seed(seed + 2)
    model = ConvNextModel(convnext_config(config))
    with torch.no_grad():  # layer scales of 1e-6 would make every block a no-op: give them weight
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.fill_(0.5)
    # every kind of tensor the real checkpoint holds: the trunk (head.norm too), the CLIP projection, a text tower
    width = geometry["hidden_sizes"][-1]
    state = {f"visual.trunk.{hf_to_timm(k)}": v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("layernorm.")}
    state |= {"visual.trunk.head.norm.weight": torch.ones(width), "visual.trunk.head.norm.bias": torch.zeros(width),
              "visual.head.proj.weight": torch.randn(32, width), "logit_scale": torch.tensor(4.6052),
              "token_embedding.weight": torch.randn(16, 32), "text_projection": torch.randn(32, 32)}
    save_file(state, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return f"{out.resolve()}-res768"


def build(out_dir: str | Path, captions_json: str | Path | None = None, lm_steps: int = 300, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    turns = [t for r in json.loads(Path(captions_json).read_text()) for t in r.get("conversations") or []
             if isinstance(t, dict) and isinstance(t.get("value"), str)] if captions_json else []
    captions = [t["value"] for t in turns if t.get("from") == "gpt"]
    questions = [t["value"] for t in turns if t.get("from") == "human"]
    tokenizer = build_tokenizer(out / "llm", captions + sorted(set(questions)))
    build_llm(out / "llm", tokenizer, captions, lm_steps, seed)
    build_vision_tower(out / "clip_vision_tower", seed)
    cfg = {
        "model": {"llm": str((out / "llm").resolve()), "vision_tower": str((out / "clip_vision_tower").resolve()),
                  "chat_template": "llama_3"},
        "optim": {"micro_batch_size": 4, "global_batch_size": 8},
        "data": {"num_workers": 1},
        "run": {"log_every": 1, "save_every": 10, "note": "tiny random-weight stand-ins built by trainer.tiny"},
    }
    path = out / "pt_tiny.yaml"
    path.write_text("# Overrides for the tiny stand-ins; defaults come from trainer/configs/ola_vlm_pt.yaml\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--captions", default=None, help="a LLaVA JSON whose captions the tiny LM is first fitted on")
    p.add_argument("--lm-steps", type=int, default=300, help="steps of that fit (default 300)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        refuse_inside_store(a.out_dir, "OUT_DIR")
    except StoreError as e:
        p.error(str(e))
    path = build(a.out_dir, a.captions, a.lm_steps, a.seed)
    print(f"wrote {path}\nNOTE: random-weight stand-ins (LLM {LLM_LAYERS} layers x {LLM_WIDTH}, CLIP 24x24 grid) "
          f"for tests and demos only" + (f"; the LM was fitted on the captions of {a.captions}" if a.captions else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
