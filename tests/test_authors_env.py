"""olaf's exports read in the authors' pinned environment (tests/authors/env.py: transformers 4.41.1, tokenizers
0.19.1, a separate cached venv), compared with what olaf's own transformers computes from the source models."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from authors import env

LOADER = Path(__file__).parent / "authors" / "load_export.py"
TEXTS = ["A photo of a red car parked by the lake.", "the quick brown fox jumps over the lazy dog <pad>"]


pytestmark = pytest.mark.slow  # builds and runs the authors' pinned environment (a venv of its own)


@pytest.fixture(scope="module")
def authors_python():
    return env.ensure()


def read_in_authors_env(python: Path, items: dict, tmp_path: Path, newer: bool = False) -> dict:
    """What their environment reads from each item (tests/authors/load_export.py); `newer`: with transformers
    4.43.4 in front."""
    spec, out = tmp_path / f"spec-{newer}.json", tmp_path / f"read-{newer}.pt"
    spec.write_text(json.dumps({"items": items}))
    p = subprocess.run([str(python), str(LOADER), str(spec), str(out)], env=env.overlay_env(newer),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=False)


def source_logits(llm_folder, ids: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([x])).logits[0] for x in ids]


def assert_logits_match(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Relative 1e-5 of the logits' scale; an export may add columns (the <pad> row their PT adds)."""
    for g, w in zip(got, want, strict=True):
        g = g[:, : w.shape[1]]
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def test_the_ola_vlm_export_reads_as_meant_under_their_pinned_transformers(trained, tmp_path, authors_python):
    """LLM logits, rope theta, tokenizer (both classes their code may pick), chat template, pad id and the CLIP
    tower's tensors, as transformers 4.41.1 reads the export. A control folder with the config transformers 5
    writes (the export before this fix) must read wrong, or the test could not see the fault."""
    from transformers import AutoConfig, AutoTokenizer

    from trainer.export import main as export

    out = tmp_path / "ola"
    assert export([str(trained), "--format", "ola-vlm", "--out", str(out)]) == 0
    run = json.loads((trained / "config.json").read_text())
    source = AutoConfig.from_pretrained(run["model"]["llm"])
    theta = source.rope_parameters["rope_theta"]
    assert theta == 500000.0  # trainer.tiny's LLM has Llama-3's RoPE base
    control = tmp_path / "v5-config"
    shutil.copytree(out, control)
    (control / "config.json").write_text(json.dumps({**source.to_dict(), "model_type": "ola_llama"}))
    ids = [[1, 50, 60, 70, 80, 90, 100, 3] * 8, list(range(5, 300))]
    read = read_in_authors_env(authors_python, {
        "export": {"folder": str(out), "ids": ids, "texts": TEXTS, "tower": True},
        "control": {"folder": str(control), "ids": ids[:1]}}, tmp_path)
    assert read["transformers"] == "4.41.1"
    got = read["items"]["export"]
    assert "error" not in got, got
    assert got["rope_theta"] == theta and got["rope_scaling"] is None and got["missing"] == []
    assert_logits_match(got["logits"], source_logits(run["model"]["llm"], ids))
    tokenizer = AutoTokenizer.from_pretrained(out)
    for fast in (False, True):
        t = got[f"tokenizer_fast_{fast}"]
        assert t["encodings"] == [tokenizer(x).input_ids for x in TEXTS]
        assert (t["pad_token_id"], t["bos_token_id"], t["eos_token_id"]) == (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert t["chat_template"] == AutoTokenizer.from_pretrained(run["model"]["llm"]).chat_template and t["chat_template"]
        assert t["len"] == len(tokenizer)
    tower = got["tower"]
    assert tower["missing"] == [] and tower["unexpected"] == [] and tower["loaded"] > 0
    # the control: 4.41 silently reads the v5 config with the default base, and other logits come out
    bad = read["items"]["control"]
    assert bad["rope_theta"] == 10000.0
    with pytest.raises(AssertionError):
        assert_logits_match(bad["logits"], source_logits(run["model"]["llm"], ids[:1]))


def tiny_llama3_scaled(folder: Path, tokenizer_from: str):
    """A tiny Llama-3.1-shaped LLM: rope theta 500000 and `llama3` scaling, written by olaf's transformers."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                      rope_parameters=rope, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder / "source")
    tokenizer.save_pretrained(folder / "source")
    return model, tokenizer


def test_llama3_rope_scaling_is_kept_and_needs_transformers_4_43(tiny_models, tmp_path, authors_python):
    """Llama-3.1's `llama3` RoPE scaling: 4.41.1 cannot compute it and must refuse the folder (never read it
    without scaling); 4.43.4, the first release with it, reads the same logits; the export warns."""
    import yaml

    from trainer.formats.ola_vlm import authors_llm_config, authors_rope_warning, write_authors_folder

    llm = yaml.safe_load(tiny_models.read_text())["model"]["llm"]
    model, tokenizer = tiny_llama3_scaled(tmp_path, llm)
    config = authors_llm_config(model.config.to_dict())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
    assert "4.43" in authors_rope_warning(config)
    out = tmp_path / "export"
    out.mkdir()
    write_authors_folder(out, model.state_dict(), config, tokenizer)
    ids = [list(range(3, 200))]
    item = {"scaled": {"folder": str(out), "ids": ids, "texts": TEXTS}}
    old = read_in_authors_env(authors_python, item, tmp_path)["items"]["scaled"]
    assert "error" in old and "rope_scaling" in old["error"], old.get("error", old.keys())
    newer = read_in_authors_env(authors_python, item, tmp_path, newer=True)
    assert newer["transformers"] == "4.43.4"
    got = newer["items"]["scaled"]
    assert "error" not in got, got
    assert got["rope_scaling"]["rope_type"] == "llama3" and got["missing"] == []
    assert_logits_match(got["logits"], source_logits(tmp_path / "source", ids))
