"""VLoRA's PT in olaf's trainer (trainer/vlora.py, ../shared/VLORA_SPEC.md): exactness against a reference written
here from the spec (not from olaf's module, not from their code), the released parameter count, the trainer's
run, resume, export, and VLoRA with OLA-VLM's embedding losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, call, export_on_a_full_disk, kill_trainer_after, one_error_line, trainer_args

from trainer.pt import run as trainer

VLORA_CONFIG = REPO / "trainer" / "configs" / "vlora_pt.yaml"
TINY_VLORA = "{vlora_dim: 32, vlora_depth: 2, vlora_rank: 4, vlora_alpha: 8}"


# ---- a reference written from VLORA_SPEC.md ----------------------------------------------------------------------

def ref_mha(x, kv, p, prefix, heads=16):
    """nn.MultiheadAttention(D, 16, batch_first) as the spec says: packed in_proj with bias, out_proj, no mask."""
    D = x.shape[-1]
    w, b = p[f"{prefix}.in_proj_weight"], p[f"{prefix}.in_proj_bias"]
    q, k, v = F.linear(x, w[:D], b[:D]), F.linear(kv, w[D:2 * D], b[D:2 * D]), F.linear(kv, w[2 * D:], b[2 * D:])
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads), -1) @ split(v)
    return F.linear(a.transpose(1, 2).reshape(x.shape), p[f"{prefix}.out_proj.weight"], p[f"{prefix}.out_proj.bias"])


def ref_factors(p: dict, feats: torch.Tensor, s: dict) -> torch.Tensor:
    """Section 1: M = visual_proj(F) + pos_embed; per generator, queries -> N pre-LN blocks -> LayerNorm -> head;
    concatenated type-major and viewed (B, T, L/s, d, r). Their names: gen.0 .. gen.{T-1} with weights_sep, one
    generator `gen` without (WG:72-73)."""
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], p[f"{n}.weight"], p[f"{n}.bias"], 1e-5)  # noqa: E731
    M = F.linear(feats, p["visual_proj.weight"], p["visual_proj.bias"]) + p["pos_embed"]
    outs = []
    gens = [f"gen.{g}" for g in range(len(s["vlora_type"]))] if s["weights_sep"] else ["gen"]
    for g in gens:
        q = p[f"{g}.queries"].expand(feats.shape[0], -1, -1)
        for l in range(s["vlora_depth"]):  # noqa: E741
            b = f"{g}.decoders.{l}"
            h = ln(q, f"{b}.norm1")
            q = q + ref_mha(h, h, p, f"{b}.self_attn")
            q = q + ref_mha(ln(q, f"{b}.norm2"), M, p, f"{b}.multihead_attn")
            h = F.linear(ln(q, f"{b}.norm3"), p[f"{b}.linear1.weight"], p[f"{b}.linear1.bias"])
            q = q + F.linear(F.gelu(h), p[f"{b}.linear2.weight"], p[f"{b}.linear2.bias"])
        outs.append(F.linear(ln(q, f"{g}.norm"), p[f"{g}.weights_head.weight"], p[f"{g}.weights_head.bias"]))
    out = torch.cat(outs, 1)
    T, n = len(s["vlora_type"]), s["vlora_llm_depth"] // s["skip_layers"]
    return out.view(feats.shape[0], T, n, s["vlora_llm_dim"], s["vlora_rank"])


def ref_llm(llm, p, factors, s, ids, attn_mask, labels):
    """Section 2 on a Llama written out: RMSNorm, RoPE (positions 0..L-1 over the whole row), GQA attention with
    causal and key masks, gated MLP; in 0-based layer i with (i+1) % s == 0, slot j = i // s, each site t adds
    (alpha/r) x A B^T, B the (width x r) row-major head of Bs row (t, j). Returns (logits, token-mean CE)."""
    c, w = llm.config, dict(llm.named_parameters())
    H, nh, nkv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd, eps, r = H // nh, c.rms_norm_eps, s["vlora_rank"]
    n_slots, types = s["vlora_llm_depth"] // s["skip_layers"], s["vlora_type"]
    rms = lambda x, name: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]  # noqa: E731
    Bs = p["Bs"].view(len(types) * n_slots, -1)

    def plus(t, i, x, y):
        if (i + 1) % s["skip_layers"] or t not in types:
            return y
        ti, j = types.index(t), i // s["skip_layers"]
        B = Bs[ti * n_slots + j][: y.shape[-1] * r].view(y.shape[-1], r) * (s["vlora_alpha"] / r)
        return y + x @ factors[:, ti, j] @ B.T

    B_, L = ids.shape
    theta = c.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([torch.arange(L).float()[:, None] * inv] * 2, -1)
    cos, sin = ang.cos(), ang.sin()
    rot = lambda x: x * cos + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * sin  # noqa: E731
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & attn_mask.bool()[:, None, :]
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        a = f"model.layers.{i}"
        h = rms(x, f"{a}.input_layernorm.weight")
        q, k, v = (plus(t, i, h, F.linear(h, w[f"{a}.self_attn.{t}_proj.weight"])) for t in "qkv")
        q = rot(q.view(B_, L, nh, hd).transpose(1, 2))
        k = rot(k.view(B_, L, nkv, hd).transpose(1, 2)).repeat_interleave(nh // nkv, 1)
        v = v.view(B_, L, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed[:, None], float("-inf"))
        att = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B_, L, H)
        x = x + plus("o", i, att, F.linear(att, w[f"{a}.self_attn.o_proj.weight"]))
        h = rms(x, f"{a}.post_attention_layernorm.weight")
        mlp = F.linear(F.silu(F.linear(h, w[f"{a}.mlp.gate_proj.weight"])) * F.linear(h, w[f"{a}.mlp.up_proj.weight"]),
                       w[f"{a}.mlp.down_proj.weight"])
        x = x + plus("m", i, h, mlp)
    logits = F.linear(rms(x, "model.norm.weight"), w["lm_head.weight"])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return logits, loss


def tiny_llama(kv_heads: int, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=10000.0,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


class Tower:  # what the generator reads from a tower: its width and token count
    hidden_size, num_tokens = 16, 9


@pytest.mark.parametrize("kv_heads,weights_sep", [(4, True), (2, True), (4, False)])
def test_deltas_logits_loss_and_generator_gradients_match_the_spec(kv_heads, weights_sep):
    """Tiny settings with alpha/r = 2 and non-zero Bs: an MHA LLM (their behaviour exactly), a GQA one (olaf's
    kv_deltas: kv_width), one generator for all types (weights_sep false). Rows: two with the masked placeholder,
    one padded. Loss, logits and every generator gradient to 1e-5 (fp32)."""
    from trainer.vlora import VLoRAConnector, settings

    llm = tiny_llama(kv_heads)
    s = settings({"vlora_dim": 32, "vlora_depth": 2, "vlora_rank": 4, "vlora_alpha": 8, "skip_layers": 2,
                  "weights_sep": weights_sep}, llm.config, Tower)
    torch.manual_seed(2)
    conn = VLoRAConnector(s, llm.get_decoder())
    with torch.no_grad():
        conn.Bs.normal_(0, 0.05)
    feats = torch.randn(3, 9, 16)
    ids = torch.randint(1, 128, (3, 12))
    ids[:, 0], ids[:, 1] = 1, 0  # [BOS, placeholder]
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[:, 1] = 0  # the placeholder: no token attends to it
    mask[2, 9:] = 0  # padding
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    conn(feats)
    out = llm(input_ids=ids, attention_mask=mask, position_ids=torch.arange(12).expand(3, -1), labels=labels)
    out.loss.backward()
    got = {n: q.grad.clone() for n, q in conn.named_parameters()}
    params = {n: q.detach().clone().requires_grad_(True) for n, q in conn.named_parameters()}
    logits, loss = ref_llm(llm, params, ref_factors(params, feats, s), s, ids, mask, labels)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    keep = mask.bool()  # padded positions' logits are no one's concern
    torch.testing.assert_close(out.logits[keep], logits[keep], rtol=1e-5, atol=1e-5)
    for name, g in got.items():
        want = params[name].grad
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert float(got["Bs"].abs().sum()) > 0 and float(got["gen.0.queries" if weights_sep else "gen.queries"].abs().sum()) > 0


def _connected(kv_heads=4, **extra):
    from trainer.vlora import VLoRAConnector, settings

    llm = tiny_llama(kv_heads)
    s = settings({"vlora_dim": 32, "vlora_depth": 2, "vlora_rank": 4, "vlora_alpha": 8, "skip_layers": 2, **extra},
                 llm.config, Tower)
    torch.manual_seed(2)
    conn = VLoRAConnector(s, llm.get_decoder())
    with torch.no_grad():
        conn.Bs.normal_(0, 0.05)
    return llm, conn


def test_a_call_without_a_fresh_connector_forward_gets_no_stale_deltas():
    """The hooks kept the last batch's factors: a text-only call after them got stale deltas, or a shape error at
    another batch size. The factors now belong to the next LLM call only, and are dropped once it is done."""
    llm, conn = _connected()
    ids = torch.randint(1, 128, (3, 10))
    with torch.no_grad():
        plain = llm(input_ids=ids).logits  # the frozen LLM, no factors yet
        conn(torch.randn(3, 9, 16))
        with_deltas = llm(input_ids=ids).logits
        assert conn.factors is None  # dropped after the call (no autograd)
        assert not torch.allclose(with_deltas, plain)
        again = llm(input_ids=ids).logits  # no fresh connector forward: no deltas
        other_batch = llm(input_ids=ids[:2]).logits  # another batch size: no shape error
    torch.testing.assert_close(again, plain)
    torch.testing.assert_close(other_batch, plain[:2])
    # with autograd: kept through the backward pass, then dropped
    conn(torch.randn(3, 9, 16))
    loss = llm(input_ids=ids, labels=ids).loss
    assert conn.factors is not None
    loss.backward()
    assert conn.factors is None and conn.Bs.grad.abs().sum() > 0


def test_rows_without_an_image_get_no_deltas_and_checkpointing_recomputes_the_same():
    """Theirs multiplies A by 0 for a row with no image (LLV:66-73); olaf's rows say whether their image was
    usable (`has_image`), whatever the placeholder switch. Non-reentrant activation checkpointing recomputes
    the same deltas in the backward pass: the generator's gradients equal those without it."""
    from trainer.build import enable_checkpointing

    llm, conn = _connected()
    ids = torch.randint(1, 128, (3, 10))
    feats = torch.randn(3, 9, 16)
    with torch.no_grad():
        plain = llm(input_ids=ids).logits
        conn(feats, torch.tensor([True, False, True]))
        mixed = llm(input_ids=ids).logits
        conn(feats)
        every = llm(input_ids=ids).logits
    torch.testing.assert_close(mixed[1], plain[1])  # the text-only row: the frozen LLM's
    torch.testing.assert_close(mixed[[0, 2]], every[[0, 2]])  # the others: unchanged by their neighbour
    grads = []
    for checkpointing in (False, True):
        llm, conn = _connected()
        if checkpointing:
            enable_checkpointing(llm)
            llm.train()
        conn(feats, torch.tensor([True, False, True]))
        llm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: q.grad.clone() for n, q in conn.named_parameters()})
        assert conn.factors is None
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_the_released_generator_has_their_parameter_count_and_names():
    """Their pretrain.sh on Vicuna-7B and CLIP-L/336 (meta device): 2,027,531,264 parameters; finetune.sh's
    D=512: 851,891,712 (VLORA_SPEC.md section 1), under the keys of their mm_projector.bin."""
    from types import SimpleNamespace

    from trainer.vlora import VLoRAGenerator, parameter_count, settings

    llm = SimpleNamespace(hidden_size=4096, num_hidden_layers=32)
    tower = SimpleNamespace(hidden_size=1024, num_tokens=576)
    for dim, want in ((1024, 2_027_531_264), (512, 851_891_712)):
        with torch.device("meta"):
            s = settings({"vlora_dim": dim}, llm, tower)
            g = VLoRAGenerator(s)
        assert sum(q.numel() for q in g.parameters()) == want == parameter_count(s)
    keys = set(g.state_dict())
    want_keys = {"visual_proj.weight", "visual_proj.bias", "pos_embed", "Bs"}
    for t in range(5):
        want_keys |= {f"gen.{t}.queries", f"gen.{t}.norm.weight", f"gen.{t}.norm.bias", f"gen.{t}.weights_head.weight",
                      f"gen.{t}.weights_head.bias"}
        for b in range(8):
            for a in ("self_attn", "multihead_attn"):
                want_keys |= {f"gen.{t}.decoders.{b}.{a}.{k}" for k in ("in_proj_weight", "in_proj_bias",
                                                                         "out_proj.weight", "out_proj.bias")}
            want_keys |= {f"gen.{t}.decoders.{b}.{m}.{k}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3")
                          for k in ("weight", "bias")}
    assert keys == want_keys
    assert tuple(g.state_dict()["Bs"].shape) == (1, 40, 4096 * 64)


def test_one_generator_has_their_single_generator_s_names():
    """weights_sep: false is one WeightsGenerater under `gen.` (WG:72-73), not a list of one: olaf wrote
    gen.0.decoders..., which their strict=False load silently skipped (41 of 45 tensors left at random init)."""
    from types import SimpleNamespace

    from trainer.vlora import VLoRAGenerator, parameter_count, settings

    llm, tower = SimpleNamespace(hidden_size=4096, num_hidden_layers=32), SimpleNamespace(hidden_size=1024, num_tokens=576)
    with torch.device("meta"):
        s = settings({"weights_sep": False}, llm, tower)
        g = VLoRAGenerator(s)
    want = {"visual_proj.weight", "visual_proj.bias", "pos_embed", "Bs", "gen.queries", "gen.norm.weight",
            "gen.norm.bias", "gen.weights_head.weight", "gen.weights_head.bias"}
    for b in range(8):
        for a in ("self_attn", "multihead_attn"):
            want |= {f"gen.decoders.{b}.{a}.{k}" for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                           "out_proj.bias")}
        want |= {f"gen.decoders.{b}.{m}.{k}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3")
                 for k in ("weight", "bias")}
    assert set(g.state_dict()) == want and len(want) == 4 + 5 + 8 * (2 * 4 + 5 * 2)
    assert tuple(g.state_dict()["gen.queries"].shape) == (1, 40, 1024)  # all 5 types x 8 slots, type-major
    per_generator = 403_081_216 - 8 * 1024  # one type's, less its 8 queries (VLORA_SPEC.md section 1)
    assert sum(q.numel() for q in g.parameters()) == parameter_count(s) == \
        per_generator + 40 * 1024 + 1_049_600 + 589_824 + 10_485_760


def test_their_init(tmp_path):
    """Linears trunc_normal 0.02 within +-2 with zero bias, LayerNorm 1/0, Bs zero (so every delta starts at 0),
    queries and pos_embed N(0, 1) as theirs, N(0, 0.02) under queries_init: trunc_normal."""
    from types import SimpleNamespace

    from trainer.vlora import VLoRAGenerator, settings

    llm, tower = SimpleNamespace(hidden_size=256, num_hidden_layers=8), SimpleNamespace(hidden_size=64, num_tokens=64)
    torch.manual_seed(0)
    g = VLoRAGenerator(settings({"vlora_dim": 128, "vlora_depth": 1, "vlora_rank": 8}, llm, tower))
    head = g.gen[0].weights_head.weight.detach()
    assert abs(float(head.std()) - 0.02) < 0.002 and float(head.abs().max()) <= 2 and not g.gen[0].weights_head.bias.any()
    assert not g.Bs.any() and abs(float(g.pos_embed.std()) - 1) < 0.05 and abs(float(g.gen[0].queries.std()) - 1) < 0.3
    assert torch.equal(g.gen[0].norm.weight, torch.ones(128))
    g2 = VLoRAGenerator(settings({"vlora_dim": 128, "vlora_depth": 1, "vlora_rank": 8, "queries_init": "trunc_normal"},
                                 llm, tower))
    assert abs(float(g2.pos_embed.std()) - 0.02) < 0.002


# ---- the trainer ------------------------------------------------------------------------------------------------

def vlora_args(store, models, teachers, out, *extra):
    return [*trainer_args(store, models, teachers, out), "--config", str(VLORA_CONFIG), "--config", str(models),
            "--set", "chat_template=plain", "--set", f"vlora={TINY_VLORA}", "--set", "global_batch_size=4",
            "--set", "micro_batch_size=2", "--set", "num_workers=0", "--set", "learning_rate=1e-3",
            "--set", "save_every=2", "--set", "log_every=1", "--set", "tensorboard=false", *extra]


def test_the_trainer_s_vlora_loss_is_the_spec_s_on_a_stored_batch(tmp_path, trainer_store, tiny_models, tiny_teachers):
    """Through trainer.build on a store: [BOS, masked placeholder] + caption + "\\n" labelled, no image tokens, the
    deltas of the tower's features; equal to the reference on the same batch."""
    from trainer.build import build
    from trainer.config import load_config

    cfg = load_config([VLORA_CONFIG, tiny_models], {"store": str(trainer_store), "output_dir": str(tmp_path / "o"),
                                                    "teachers_manifest": str(tiny_teachers)},
                      ["chat_template=plain", f"vlora={TINY_VLORA}", "num_workers=0"])
    run = build(cfg, torch.device("cpu"), torch.float32)
    m = run.model
    with torch.no_grad():
        m.projector.Bs.normal_(0, 0.05)
    batch = next(iter(run.stream))
    assert batch["prefix_ids"][0].tolist() == [run.tokenizer.bos_token_id, 0] and m.layout.image == 0
    caption = batch["text_ids"][0][batch["text_mask"][0].bool()]
    assert run.tokenizer.decode(caption).endswith("\n")
    loss, _ = m(batch)
    ids = torch.cat([batch["prefix_ids"], batch["text_ids"]], 1)
    mask = m.layout.attention_mask(batch["text_mask"])
    assert mask[:, 1].eq(0).all()
    labels = torch.cat([torch.full((ids.shape[0], 2), -100), batch["text_labels"]], 1)
    x = (batch["pixels"].permute(0, 3, 1, 2).float() / 255 - m.image_mean) / m.image_std
    params = {n: q.detach() for n, q in m.projector.named_parameters()}
    with torch.no_grad():
        feats = m.vision.features(x)
        llm = torch.nn.Module()
        llm.config = m.decoder.config
        llm.named_parameters = lambda: [(f"model.{n}", q) for n, q in m.decoder.named_parameters()] + \
            [("lm_head.weight", m.lm_head.weight)]
        _, want = ref_llm(llm, params, ref_factors(params, feats, m.projector.s), m.projector.s, ids, mask, labels)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vlora_trains_resumes_after_kill_9_and_exports_their_folder(tmp_path, trainer_store, tiny_models,
                                                                   tiny_teachers):
    from trainer.export import main as export

    steps = 6
    whole = tmp_path / "whole"
    rc, log = call(trainer, vlora_args(trainer_store, tiny_models, tiny_teachers, whole, "--max-steps", str(steps)))
    assert rc == 0, log
    out = tmp_path / "killed"
    argv = vlora_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", str(steps))
    kill_trainer_after(argv, out, 4)
    rc, log = call(trainer, argv + ["--resume"])
    assert rc == 0 and "resumed from" in log, log
    lines = lambda d: [json.loads(x) for x in (d / "logs" / "train.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = lines(whole), lines(out)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    assert a[-1]["loss"] < a[0]["loss"] or any(r["loss"] != a[0]["loss"] for r in a)
    # --format vlora, read back by a loader written from the spec (section 4)
    folder = tmp_path / "export"
    p = export_on_a_full_disk(out, "vlora", folder, 1024)  # a disk that refuses the write: one line, nothing left
    assert p.returncode == 2 and "nothing of it was left" in one_error_line(p.stderr), p.stderr
    assert not folder.exists()
    assert export([str(out), "--format", "vlora", "--out", str(folder)]) == 0
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["mm_projector_type"]) == ("llava_vlora", "vlora")
    D, d, L, r, s = cfg["vlora_dim"], cfg["vlora_llm_dim"], cfg["vlora_llm_depth"], cfg["vlora_rank"], cfg["skip_layers"]
    T, n = len(cfg["vlora_type"]), L // s
    assert (D, r, cfg["vlora_depth"], cfg["vlora_alpha"], cfg["vlora_type"]) == (32, 4, 2, 8, "qkvom")
    assert (d, L, cfg["vlora_visual_dim"], cfg["vlora_pos_num"]) == (64, 20, 32, 576)
    state = torch.load(folder / "mm_projector.bin", weights_only=True)
    want = {"visual_proj.weight": (D, 32), "visual_proj.bias": (D,), "pos_embed": (1, 576, D), "Bs": (1, T * n, d * r)}
    for t in range(T):
        want |= {f"gen.{t}.queries": (1, n, D), f"gen.{t}.norm.weight": (D,), f"gen.{t}.norm.bias": (D,),
                 f"gen.{t}.weights_head.weight": (d * r, D), f"gen.{t}.weights_head.bias": (d * r,)}
        for b in range(cfg["vlora_depth"]):
            for a in ("self_attn", "multihead_attn"):
                want |= {f"gen.{t}.decoders.{b}.{a}.in_proj_weight": (3 * D, D),
                         f"gen.{t}.decoders.{b}.{a}.in_proj_bias": (3 * D,),
                         f"gen.{t}.decoders.{b}.{a}.out_proj.weight": (D, D),
                         f"gen.{t}.decoders.{b}.{a}.out_proj.bias": (D,)}
            want |= {f"gen.{t}.decoders.{b}.linear1.weight": (4 * D, D), f"gen.{t}.decoders.{b}.linear1.bias": (4 * D,),
                     f"gen.{t}.decoders.{b}.linear2.weight": (D, 4 * D), f"gen.{t}.decoders.{b}.linear2.bias": (D,)}
            want |= {f"gen.{t}.decoders.{b}.norm{i}.{k}": (D,) for i in (1, 2, 3) for k in ("weight", "bias")}
    got = {k.split("mm_projector.", 1)[1]: tuple(v.shape) for k, v in state.items()}
    assert all(k.startswith("model.mm_projector.") for k in state) and got == want
    from safetensors.torch import load_file

    last = load_file(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors")
    assert torch.equal(state["model.mm_projector.Bs"], last["projector.Bs"]) and last["projector.Bs"].any()
    # trainer.probe probes it like any other model: its deltas in, the plain template, no image tokens
    from trainer.probe import run as probe

    rc, log = call(probe, ["--store", str(trainer_store), "--eval-store", str(trainer_store), "--model",
                           str(whole / "export"), "--teachers-manifest", str(tiny_teachers), "--layers", "4,20",
                           "--output-dir", str(tmp_path / "probe"), "--max-steps", "1", "--set", "global_batch_size=4",
                           "--set", "micro_batch_size=4", "--set", "num_workers=0"])
    assert rc == 0 and "olaf VLoRA export" in log, log
    scores = json.loads((tmp_path / "probe" / "probe_scores.json").read_text())["scores"]
    assert all(math.isfinite(v) for by_layer in scores.values() for v in by_layer.values())


def test_vlora_with_the_embedding_losses_trains_and_logs_each_task_and_layer(tmp_path, trainer_store, tiny_models,
                                                                           tiny_teachers):
    out = tmp_path / "both"
    rc, log = call(trainer, vlora_args(trainer_store, tiny_models, tiny_teachers, out, "--max-steps", "2",
                                       "--set", "tasks=gen,depth,seg"))
    assert rc == 0, log
    rows = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
    layers = {"gen": [12, 20], "depth": [8, 20], "seg": [10, 18]}
    for r in rows:
        for t, ls in layers.items():
            for layer in ls:
                assert math.isfinite(r[f"{t}/{layer}/sl1"]) and math.isfinite(r[f"{t}/{layer}/nce"])
        assert r["loss"] > r["ntp"]


@pytest.mark.parametrize("setting,message", [
    ("vlora_rank: 0", "vlora_rank must be a positive integer"),
    ("skip_layers: 3", "does not divide the LLM's 20 layers"),
    ("vlora_visual_dim: 1024", "vlora_visual_dim is 1024 but the tower gives 32"),
    ("kv_deltas: hidden", "grouped-query attention"),
    ("vlora_dim: 40", "multiple of the generator's 16 heads"),
    # each of these trained silently wrong, or ran out of memory, before (reliability, round four)
    ("vlora_alpha: 0", "vlora_alpha must be > 0 (the deltas are scaled by alpha / rank: 0 would silence them)"),
    ("vlora_alpha: -2", "would negate them"),
    ("vlora_rank: true", "vlora.vlora_rank must be an integer, got True"),
    ("weights_sep: maybe", "vlora.weights_sep must be true or false, got 'maybe'"),
    ("vlora_alpha: abc", "vlora.vlora_alpha must be a number, got 'abc'"),
    ("vlora_rank: 100000", "vlora_rank 100000 is above the LLM's width 64"),
    ("vlora_depth: 1000000", "GB in float32) and this machine has"),
    ("vlora_type: 5", "vlora.vlora_type must be a word, got 5"),
])
def test_bad_vlora_settings_are_one_line(tmp_path, trainer_store, tiny_models, tiny_teachers, setting, message):
    bad = "vlora={vlora_dim: 32, vlora_depth: 1, " + setting + "}"
    rc, log = call(trainer, [*vlora_args(trainer_store, tiny_models, tiny_teachers, tmp_path / "o"), "--set", bad])
    assert rc == 2 and message in log and "Traceback" not in log, log
