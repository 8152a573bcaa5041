"""VLoRA's connector (Ma et al., NeurIPS 2024; FeipengMa6/VLoRA; ../shared/VLORA_SPEC.md): frozen CLIP features
become per-sample low-rank deltas inside the LLM's layers; the LLM sees no visual tokens.

    features (B, P, visual) -> visual_proj + pos_embed = memory M (B, P, D)
    per type t of vlora_type (q, k, v, o, m): L/s queries -> N pre-LN decoder blocks (self-attention, cross-
        attention to M, GELU MLP 4x; 16 heads) -> LayerNorm -> weights_head Linear(D -> d*r)
    query j of type t = A (d x r, row-major), the generated down-projection of 0-based LLM layer j*s + s-1;
    its up-projection B is `Bs` row (t, j), learned, zero-initialised, shared by the batch, scaled by alpha/r
    delta_t(x) = x A B^T, added (never merged) to q/k/v_proj's outputs (x: input_layernorm's output), to o_proj's
    (x: the attention output) and to the whole MLP's (x: post_attention_layernorm's output: a bypass, "m")

The module and parameter names are theirs (`gen.{t}.decoders.{l}.self_attn...`, `Bs`), so the state dict under
`model.mm_projector.` is their mm_projector.bin. Their quirks are switches (docs/vlora.md): `kv_deltas` (their k/v
deltas have the hidden width, which GQA LLMs such as Llama-3-8B cannot take: olaf's default gives them the k/v
width), `queries_init`, `placeholder`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TYPES = "qkvom"  # the delta sites, in their order
HEADS, MLP_RATIO = 16, 4  # hard-coded in theirs
# their pretrain.sh; the widths and depths left None are read from the models (and checked when given)
DEFAULTS = {"vlora_dim": 1024, "vlora_depth": 8, "vlora_visual_dim": None, "vlora_pos_num": None,
            "vlora_llm_dim": None, "vlora_llm_depth": None, "vlora_rank": 64, "vlora_alpha": 64,
            "vlora_type": "qkvom", "weights_sep": True, "skip_layers": 4,
            # olaf's switches for their quirks (docs/vlora.md)
            "kv_deltas": "kv_width", "queries_init": "randn", "placeholder": "keep"}
CHOICES = {"kv_deltas": ("kv_width", "hidden"), "queries_init": ("randn", "trunc_normal"),
           "placeholder": ("keep", "drop")}


class VLoRAError(ValueError):
    """A VLoRA setting that cannot work; the message says which and why."""


def settings(given: dict | None, llm_config, tower) -> dict:
    """The generator's settings: DEFAULTS, then `given`, the widths and depths the models fix filled in; every
    problem one line."""
    s = {**DEFAULTS, **(given or {})}
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise VLoRAError(f"vlora: unknown settings {unknown}; known: {', '.join(DEFAULTS)}")
    fixed = {"vlora_visual_dim": tower.hidden_size, "vlora_pos_num": tower.num_tokens,
             "vlora_llm_dim": llm_config.hidden_size, "vlora_llm_depth": llm_config.num_hidden_layers}
    for key, value in fixed.items():
        if s[key] is not None and s[key] != value:
            raise VLoRAError(f"vlora.{key} is {s[key]} but the {'tower' if 'visual' in key or 'pos' in key else 'LLM'}"
                             f" gives {value}: leave it out (it is read from the model) or use a matching model")
        s[key] = value
    for key in ("vlora_dim", "vlora_depth", "vlora_rank", "skip_layers"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise VLoRAError(f"vlora.{key} must be a positive integer, got {s[key]!r}")
    if s["vlora_dim"] % HEADS:
        raise VLoRAError(f"vlora.vlora_dim {s['vlora_dim']} must be a multiple of the generator's {HEADS} heads")
    if s["vlora_llm_depth"] % s["skip_layers"]:
        raise VLoRAError(f"vlora.skip_layers {s['skip_layers']} does not divide the LLM's {s['vlora_llm_depth']} "
                         f"layers (deltas go to every skip_layers-th layer)")
    if not s["vlora_type"] or any(t not in TYPES for t in s["vlora_type"]) or len(set(s["vlora_type"])) < len(s["vlora_type"]):
        raise VLoRAError(f"vlora.vlora_type must be distinct letters of {TYPES}, got {s['vlora_type']!r}")
    for key, options in CHOICES.items():
        if s[key] not in options:
            raise VLoRAError(f"vlora.{key} must be one of {', '.join(options)}, got {s[key]!r}")
    return s


class DecoderBlock(nn.Module):
    """Their TransformerDecoderLayer: pre-LN self-attention, cross-attention to the memory, GELU MLP; no dropout."""

    def __init__(self, dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, HEADS, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, HEADS, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, MLP_RATIO * dim), nn.Linear(MLP_RATIO * dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.multihead_attn(self.norm2(q), memory, memory, need_weights=False)[0]
        return q + self.linear2(F.gelu(self.linear1(self.norm3(q))))


class WeightsGenerator(nn.Module):
    """Learned queries -> decoder blocks over the memory -> LayerNorm -> the shared head (D -> d*r)."""

    def __init__(self, queries: int, dim: int, depth: int, out: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, dim))
        self.decoders = nn.ModuleList(DecoderBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.weights_head = nn.Linear(dim, out)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(memory.shape[0], -1, -1)
        for block in self.decoders:
            q = block(q, memory)
        return self.weights_head(self.norm(q))


def _init(module: nn.Module) -> None:
    """Their init: every Linear trunc_normal std 0.02 (bounds +-2), bias 0; LayerNorm 1/0; attention in_proj as
    nn.MultiheadAttention leaves it (xavier, bias 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VLoRAGenerator(nn.Module):
    """Their LoRAGenerater: `forward(features)` -> A (B, T, L/s, d, r), the generated factors; `up(t, j, width)`
    -> B of slot (t, j) at an output `width` (d, or a GQA LLM's k/v width under kv_deltas: kv_width), scaled."""

    def __init__(self, s: dict):
        super().__init__()
        self.s, self.types = s, s["vlora_type"]
        D, d, r = s["vlora_dim"], s["vlora_llm_dim"], s["vlora_rank"]
        self.slots = s["vlora_llm_depth"] // s["skip_layers"]
        self.visual_proj = nn.Linear(s["vlora_visual_dim"], D)
        self.pos_embed = nn.Parameter(torch.randn(1, s["vlora_pos_num"], D))
        n, T = self.slots, len(self.types)
        sizes = [n] * T if s["weights_sep"] else [n * T]
        self.gen = nn.ModuleList(WeightsGenerator(q, D, s["vlora_depth"], d * r) for q in sizes)
        self.apply(_init)
        if s["queries_init"] == "trunc_normal":  # their intent; their apply() never reaches parameters (randn)
            for p in (self.pos_embed, *(g.queries for g in self.gen)):
                nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
        self.Bs = nn.Parameter(torch.zeros(1, n * T, d * r))
        self.scale = s["vlora_alpha"] / r

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        memory = self.visual_proj(features) + self.pos_embed
        out = torch.cat([g(memory) for g in self.gen], dim=1)  # (B, T * L/s, d * r), type-major
        d, r = self.s["vlora_llm_dim"], self.s["vlora_rank"]
        return out.view(out.shape[0], len(self.types), self.slots, d, r)

    def up(self, t: int, j: int, width: int) -> torch.Tensor:
        r = self.s["vlora_rank"]
        row = self.Bs[0, t * self.slots + j]
        return row[: width * r].view(width, r) * self.scale


def delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x A B^T per sample: x (B, l, d_in), A (B, d_in, r), B (d_out, r)."""
    return torch.einsum("blr,or->blo", torch.einsum("bld,bdr->blr", x, a.to(x.dtype)), b.to(x.dtype))


class VLoRAConnector(VLoRAGenerator):
    """The generator (its parameters under their names) and where its deltas go. `forward(features)` computes this
    batch's factors and returns no image tokens (B, 0, H): the deltas reach the LLM through forward hooks on its
    layers, which read the factors of the latest batch. They stay set until the next batch, so activation
    checkpointing's recomputation in the backward pass adds the same deltas."""

    num_tokens = 0

    def __init__(self, s: dict, decoder: nn.Module):
        layers, step = decoder.layers, s["skip_layers"]
        attn = layers[0].self_attn
        kv_width = attn.k_proj.out_features
        if s["kv_deltas"] == "hidden" and kv_width != s["vlora_llm_dim"] and set("kv") & set(s["vlora_type"]):
            raise VLoRAError(f"vlora kv_deltas: hidden (the authors' k/v deltas) gives k/v deltas of width "
                             f"{s['vlora_llm_dim']}, but this LLM's k/v width is {kv_width} (grouped-query "
                             f"attention): use kv_deltas: kv_width, or a vlora_type without k and v")
        super().__init__(s)
        self.factors = None
        self.sites = [(i, t) for i in range(step - 1, len(layers), step) for t in s["vlora_type"]]
        # with kv_deltas: hidden the widths are the hidden size everywhere (MHA only, checked above)
        self.widths = {"q": attn.q_proj.out_features, "k": kv_width, "v": kv_width,
                       "o": attn.o_proj.out_features, "m": s["vlora_llm_dim"]}
        self._hooks = [self._site(layers[i], i, t).register_forward_hook(self._hook(i, t)) for i, t in self.sites]

    @staticmethod
    def _site(layer: nn.Module, i: int, t: str) -> nn.Module:
        return layer.mlp if t == "m" else getattr(layer.self_attn, f"{t}_proj")

    def _hook(self, i: int, t: str):
        ti, j = self.s["vlora_type"].index(t), i // self.s["skip_layers"]

        def add_delta(module, inputs, output):
            if self.factors is None:
                return output
            return output + delta(inputs[0], self.factors[:, ti, j], self.up(ti, j, self.widths[t]))

        return add_delta

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.factors = super().forward(features)
        return features.new_zeros(features.shape[0], 0, self.s["vlora_llm_dim"])
