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

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.errors import TrainerError
from trainer.fields import is_kind

TYPES = "qkvom"  # the delta sites, in their order
HEADS, MLP_RATIO = 16, 4  # hard-coded in theirs


@dataclass(frozen=True)
class VLoRASettings:
    """The `vlora:` section of a config, typed: their pretrain.sh's values under their names; the widths and depths
    left None are read from the models (and checked when given). The last three are olaf's switches for their
    quirks (docs/vlora.md)."""

    vlora_dim: int = 1024
    vlora_depth: int = 8
    vlora_visual_dim: int | None = None
    vlora_pos_num: int | None = None
    vlora_llm_dim: int | None = None
    vlora_llm_depth: int | None = None
    vlora_rank: int = 64
    vlora_alpha: float = 64  # the deltas' scale is alpha / rank
    vlora_type: str = "qkvom"
    weights_sep: bool = True
    skip_layers: int = 4
    kv_deltas: str = "kv_width"
    queries_init: str = "randn"
    placeholder: str = "keep"

    @classmethod
    def of(cls, given) -> VLoRASettings:
        """From a config's mapping: every field of its type (no `true` for a rank, no `maybe` for a switch), every
        problem named; VLoRAError otherwise."""
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise VLoRAError(f"vlora must be a mapping of settings (e.g. {{vlora_rank: 64}}), got {given!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise VLoRAError(f"vlora: unknown settings {unknown}; known: {', '.join(fields)}")
        problems = [p for k, v in given.items() if (p := _type_problem(k, v, fields[k].type))]
        if problems:
            raise VLoRAError("; ".join(problems))
        return cls(**given)


CHOICES = {"kv_deltas": ("kv_width", "hidden"), "queries_init": ("randn", "trunc_normal"),
           "placeholder": ("keep", "drop")}
DEFAULTS = dataclasses.asdict(VLoRASettings())


def _type_problem(key: str, value, kind: str) -> str | None:
    """Why `value` is not of the field's type `kind` (its annotation's text), or None. YAML's `true` is a bool,
    never an int; a number is never a word."""
    if value is None:
        return None if "None" in kind else f"vlora.{key} cannot be null"
    t = next((t for t in (int, float, bool) if kind.startswith(t.__name__)), str)
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a word"}[t]
    return None if is_kind(value, t) else f"vlora.{key} must be {want}, got {value!r}"


class VLoRAError(TrainerError, ValueError):
    """A VLoRA setting that cannot work; the message says which and why."""


def settings(given: dict | VLoRASettings | None, llm_config, tower) -> dict:
    """The generator's settings: DEFAULTS, then `given` (type-checked), the widths and depths the models fix filled
    in; every problem one line; sizes that cannot be allocated refused before anything is."""
    s = dataclasses.asdict(given if isinstance(given, VLoRASettings) else VLoRASettings.of(given))
    fixed = {"vlora_visual_dim": tower.hidden_size, "vlora_pos_num": tower.num_tokens,
             "vlora_llm_dim": llm_config.hidden_size, "vlora_llm_depth": llm_config.num_hidden_layers}
    for key, value in fixed.items():
        if s[key] is not None and s[key] != value:
            raise VLoRAError(f"vlora.{key} is {s[key]} but the {'tower' if 'visual' in key or 'pos' in key else 'LLM'}"
                             f" gives {value}: leave it out (it is read from the model) or use a matching model")
        s[key] = value
    for key in ("vlora_dim", "vlora_depth", "vlora_rank", "skip_layers"):
        if s[key] < 1:
            raise VLoRAError(f"vlora.{key} must be a positive integer, got {s[key]!r}")
    if not s["vlora_alpha"] > 0:
        raise VLoRAError(f"vlora.vlora_alpha must be > 0 (the deltas are scaled by alpha / rank: "
                         f"{s['vlora_alpha']} would {'silence' if s['vlora_alpha'] == 0 else 'negate'} them), "
                         f"got {s['vlora_alpha']!r}")
    if s["vlora_rank"] > s["vlora_llm_dim"]:
        raise VLoRAError(f"vlora.vlora_rank {s['vlora_rank']} is above the LLM's width {s['vlora_llm_dim']}: a "
                         f"low-rank delta's rank is at most its width")
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
    _check_fits(s)
    return s


def parameter_count(s: dict) -> int:
    """The generator's parameters, counted from its settings (nothing allocated)."""
    D, d, r, N, P = s["vlora_dim"], s["vlora_llm_dim"], s["vlora_rank"], s["vlora_depth"], s["vlora_pos_num"]
    T, n = len(s["vlora_type"]), s["vlora_llm_depth"] // s["skip_layers"]
    attention = 3 * D * D + 3 * D + D * D + D
    block = 2 * attention + (D * MLP_RATIO * D + MLP_RATIO * D) + (MLP_RATIO * D * D + D) + 3 * 2 * D
    per_generator = N * block + 2 * D + D * d * r + d * r
    queries = n * T * D
    generators = T if s["weights_sep"] else 1
    return s["vlora_visual_dim"] * D + D + P * D + generators * per_generator + queries + n * T * d * r


def _available_bytes() -> int | None:
    """Memory this process could still allocate on the host (MemAvailable), or None where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(s: dict) -> None:
    """Refuse a generator whose float32 parameters alone exceed the host's free memory, before it is built (a rank
    of 200000 once allocated 51 GB before failing)."""
    if torch.get_default_device().type == "meta":  # nothing is allocated
        return
    need, free = 4 * parameter_count(s), _available_bytes()
    if free is not None and need > free:
        raise VLoRAError(f"vlora: the generator would have {need // 4:,} parameters ({need / 1e9:.1f} GB in float32) "
                         f"and this machine has {free / 1e9:.1f} GB free: lower vlora_dim, vlora_depth or vlora_rank "
                         f"(their PT: 1024, 8, 64)")


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
        # their names: T generators gen.0 .. gen.{T-1}, or one generator `gen` of all T * n queries, type-major
        self.gen = nn.ModuleList(WeightsGenerator(n, D, s["vlora_depth"], d * r) for _ in range(T)) \
            if s["weights_sep"] else WeightsGenerator(n * T, D, s["vlora_depth"], d * r)
        self.apply(_init)
        if s["queries_init"] == "trunc_normal":  # their intent; their apply() never reaches parameters (randn)
            for p in (self.pos_embed, *(g.queries for g in self.generators())):
                nn.init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0)
        self.Bs = nn.Parameter(torch.zeros(1, n * T, d * r))
        self.scale = s["vlora_alpha"] / r

    def generators(self) -> list[WeightsGenerator]:
        return list(self.gen) if isinstance(self.gen, nn.ModuleList) else [self.gen]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        memory = self.visual_proj(features) + self.pos_embed
        out = torch.cat([g(memory) for g in self.generators()], dim=1)  # (B, T * L/s, d * r), type-major
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
    """The generator (its parameters under their names) and where its deltas go. `forward(features, has_image)`
    computes this batch's factors and returns no image tokens (B, 0, H): the deltas reach the LLM through forward
    hooks on its layers. Rows without an image get no deltas (their A times 0, as theirs for text-only rows).

    The factors belong to the next call of the LLM and to nothing else: that call takes them (a later call with no
    fresh connector forward, e.g. text-only evaluation or generation at another batch size, gets no deltas), and
    they are dropped once it is done: at once without autograd, else once their gradient is computed, after
    activation checkpointing's recomputation in the backward pass has added the same deltas again."""

    num_tokens = 0
    masks_rows = True  # forward takes has_image (trainer.sequence.MLLM passes each row's)

    def __init__(self, s: dict, decoder: nn.Module):
        layers, step = decoder.layers, s["skip_layers"]
        attn = layers[0].self_attn
        kv_width = attn.k_proj.out_features
        if s["kv_deltas"] == "hidden" and kv_width != s["vlora_llm_dim"] and set("kv") & set(s["vlora_type"]):
            raise VLoRAError(f"vlora kv_deltas: hidden (the authors' k/v deltas) gives k/v deltas of width "
                             f"{s['vlora_llm_dim']}, but this LLM's k/v width is {kv_width} (grouped-query "
                             f"attention): use kv_deltas: kv_width, or a vlora_type without k and v")
        super().__init__(s)
        self.factors = self._next = None
        self.sites = [(i, t) for i in range(step - 1, len(layers), step) for t in s["vlora_type"]]
        # with kv_deltas: hidden the widths are the hidden size everywhere (MHA only, checked above)
        self.widths = {"q": attn.q_proj.out_features, "k": kv_width, "v": kv_width,
                       "o": attn.o_proj.out_features, "m": s["vlora_llm_dim"]}
        self._hooks = [self._site(layers[i], i, t).register_forward_hook(self._hook(i, t)) for i, t in self.sites]
        self._hooks += [decoder.register_forward_pre_hook(self._take), decoder.register_forward_hook(self._done)]

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

    def _take(self, module, args):
        """The LLM starts a call: it takes the factors computed for it, or none."""
        self.factors, self._next = self._next, None

    def _done(self, module, args, output):
        """The LLM's call is over: its factors go, once the backward pass no longer needs them."""
        factors = self.factors
        if factors is None:
            return
        if torch.is_grad_enabled() and factors.requires_grad:
            factors.register_hook(lambda grad: self._drop(factors))
        else:
            self._drop(factors)

    def _drop(self, factors: torch.Tensor) -> None:
        if self.factors is factors:
            self.factors = None

    def forward(self, features: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        factors = super().forward(features)
        if has_image is not None:  # theirs: A * 0 for a row without an image
            factors = factors * has_image.to(factors.dtype).view(-1, 1, 1, 1, 1)
        self._next = factors
        return features.new_zeros(features.shape[0], 0, self.s["vlora_llm_dim"])
