"""Run by the authors' pinned environment's python (tests/authors/env.py), never by olaf's: load folders olaf
exported the way their code does and write down what was read, for the tests to compare under olaf's own
transformers. Imports nothing of olaf.

    python load_export.py SPEC.json OUT.pt

SPEC: {"items": {name: {"folder": F, "ids": [[...], ...], "texts": [...], "tower": true|false}}}. For each item:
LlamaForCausalLM.from_pretrained (their OlaLlavaLlamaForCausalLM is a LlamaForCausalLM subclass: this is how the
LLM part is read) -> fp32 logits of `ids`; AutoTokenizer.from_pretrained with use_fast False (as their builder
calls it) and True -> encodings of `texts`, special ids, chat template; with `tower`, the CLIPVisionModel their
CLIPVisionTower holds loads the folder's model.vision_tower.vision_tower.* tensors. A failure is recorded as the
item's error.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open


def tower_report(folder: str, config: dict) -> dict:
    from transformers import CLIPVisionModel

    prefix = "model.vision_tower.vision_tower."
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    tower = CLIPVisionModel.from_pretrained(config["mm_vision_tower"], torch_dtype=torch.float32)
    missing, unexpected = tower.load_state_dict(tensors, strict=False)
    return {"missing": list(missing), "unexpected": list(unexpected), "loaded": len(tensors)}


def load_item(item: dict) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = item["folder"]
    config = json.loads(Path(folder, "config.json").read_text())
    out: dict = {}
    model, info = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    out["missing"] = list(info["missing_keys"])
    out["rope_theta"] = float(model.config.rope_theta)
    out["rope_scaling"] = model.config.rope_scaling
    out["logits"] = [model(torch.tensor([ids])).logits[0].float() for ids in item["ids"]]
    for fast in (False, True):
        tok = AutoTokenizer.from_pretrained(folder, use_fast=fast)
        out[f"tokenizer_fast_{fast}"] = {
            "class": type(tok).__name__, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "chat_template": tok.chat_template, "len": len(tok),
            "encodings": [tok(t).input_ids for t in item.get("texts", [])]}
    if item.get("tower"):
        out["tower"] = tower_report(folder, config)
    return out


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    results = {"transformers": transformers.__version__, "torch": torch.__version__, "items": {}}
    with torch.no_grad():
        for name, item in spec["items"].items():
            try:
                results["items"][name] = load_item(item)
            except Exception as e:  # recorded: a test may expect this version to refuse a folder
                results["items"][name] = {"error": f"{type(e).__name__}: {e}"}
    torch.save(results, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
