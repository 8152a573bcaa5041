"""The embedding predictors: OLA-VLM's one-block Perceiver resampler (TaskTokenResampler), which PT trains at
chosen layers with the task's own latents, and which probing trains at every layer with learned latents (the
probe head of the paper's Section 3 is this predictor with `learned_latents`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm_keys = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, keys: torch.Tensor, key_mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, q_len, _ = latents.shape
        keys, latents = self.norm_keys(keys), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([keys, latents], dim=1)).chunk(2, dim=-1)  # latents attend to themselves too
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        mask = torch.cat([key_mask, key_mask.new_ones(b, q_len)], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(dim_head), as the original
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, -1))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: float):
        inner = int(dim * mult)
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


def intermediate_mlp(width: int) -> nn.Sequential:
    """The original's build_mlp(width, width): Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class Predictor(nn.Module):
    """Perceiver resampler (OLA-VLM's TaskTokenResampler): (keys (B, L, H), key mask, latents (B, Q, H)) ->
    (B, Q, out_dim). `width` is its inner width (the target's for gen and seg, the LLM's for depth, as in the
    original's heads). Keys and given latents go through the same input projection.

    `learned_latents=Q`: Q latents of its own, learned in the inner width (the probe head; `forward` takes no
    latents). `intermediate` (the original's use_intermediate_depth): three MLPs on the output and the prediction
    is linear_1's; linear_2 and linear_3 feed only the original's depth visualisation, get no gradient there, and
    are kept frozen here (so DDP sees no unused trainable parameter)."""

    def __init__(self, llm_width: int, out_dim: int, heads: int = 4, dim_head: int = 32, ff_mult: float = 1,
                 depth: int = 1, width: int | None = None, intermediate: bool = False,
                 learned_latents: int | None = None):
        super().__init__()
        width = width or out_dim
        if learned_latents:
            self.latents = nn.Parameter(torch.randn(1, learned_latents, width) / width ** 0.5)
        self.proj_in = nn.Linear(llm_width, width)  # shared by keys and latents, as in TaskTokenResampler
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, dim_head, heads), FeedForward(width, ff_mult)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.intermediate = intermediate
        if intermediate:
            self.linear_1, self.linear_2, self.linear_3 = (intermediate_mlp(out_dim) for _ in range(3))
            self.linear_2.requires_grad_(False)
            self.linear_3.requires_grad_(False)

    def forward(self, keys: torch.Tensor, key_mask: torch.Tensor, latents: torch.Tensor | None = None):
        x = self.proj_in(keys)
        lat = self.latents.expand(keys.shape[0], -1, -1) if latents is None else self.proj_in(latents)
        for attn, ff in self.blocks:
            lat = attn(x, key_mask, lat) + lat
            lat = ff(lat) + lat
        out = self.norm_out(self.proj_out(lat))
        return self.linear_1(out) if self.intermediate else out
