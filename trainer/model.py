"""The OLA-VLM PT model: frozen CLIP tower -> trainable projector -> frozen causal LLM with trainable task tokens,
and trainable embedding predictors that read the LLM's hidden states at chosen layers.

Sequence (per sample): [prefix | 576 image tokens | gen 8 | depth 8 | seg 8 | text (question, answer)]
  * prefix: BOS, system block, user header (its length is the image offset, from the tokenizer)
  * task tokens: gen owns 8 learnable vectors; depth and seg own 576 each, mean-pooled in 8 groups of 72
  * predictor for (task, layer l): a one-block Perceiver resampler whose keys are the layer-l hidden states of
    prefix | image | that task's own 8 tokens | text, padding masked (the original leaves other tasks' tokens
    out but attends to padding); its queries are the task's 576 vectors (depth, seg) or the mean of the 8 gen
    tokens' hidden states (gen), both through the predictor's input projection, as in OLA-VLM's
    TaskTokenResampler; its output has the target's shape (gen 1 x 1024, depth 576 x 1024, seg 576 x 1536).
    Its inner width is the target's for gen and seg and the LLM's for depth (the original's TaskTokenDepthHead,
    `predictor_width`); `use_intermediate_depth` adds the original's three MLPs on the depth output.
Token grids are row-major (token = row * 24 + col), the stored targets' layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import TASKS, PTConfig
from trainer.loss import Negatives, ntp_loss, pt_loss, step_negatives


class Projector(nn.Sequential):
    """LLaVA's mlp2x_gelu; the indices 0 and 2 give its checkpoint keys mm_projector.{0,2}.{weight,bias}."""

    def __init__(self, vision_width: int, llm_width: int):
        super().__init__(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))


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
    original's heads). With `intermediate` (the original's use_intermediate_depth) three MLPs sit on the output
    and the prediction is linear_1's; linear_2 and linear_3 feed only the original's depth visualisation, get
    no gradient there, and are kept frozen here (so DDP sees no unused trainable parameter)."""

    def __init__(self, llm_width: int, out_dim: int, heads: int = 4, dim_head: int = 32, ff_mult: float = 1,
                 depth: int = 1, width: int | None = None, intermediate: bool = False):
        super().__init__()
        width = width or out_dim
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

    def forward(self, keys, key_mask, latents):
        x, lat = self.proj_in(keys), self.proj_in(latents)
        for attn, ff in self.blocks:
            lat = attn(x, key_mask, lat) + lat
            lat = ff(lat) + lat
        out = self.norm_out(self.proj_out(lat))
        return self.linear_1(out) if self.intermediate else out


@dataclass
class Layout:
    """Where things sit in the LLM sequence."""

    prefix: int  # image offset
    image: int  # image tokens
    task_slots: dict[str, tuple[int, int]]  # task -> [start, stop) in the sequence
    text_start: int


def make_layout(prefix: int, image: int, tasks, task_tokens: dict[str, int]) -> Layout:
    slots, pos = {}, prefix + image
    for t in TASKS:  # fixed order: gen, depth, seg
        if t in tasks:
            slots[t] = (pos, pos + task_tokens[t])
            pos += task_tokens[t]
    return Layout(prefix, image, slots, pos)


def predictor_keys(hidden: torch.Tensor, text_mask: torch.Tensor, layout: Layout, task: str):
    """The layer's hidden states a task's predictor may read: prefix, image, its own task tokens, text (padding
    masked); other tasks' tokens are left out. Returns (keys (B, L', H), mask (B, L') bool)."""
    b = hidden.shape[0]
    start, stop = layout.task_slots[task]
    keys = torch.cat([hidden[:, : layout.prefix + layout.image], hidden[:, start:stop], hidden[:, layout.text_start:]], 1)
    fixed = hidden.new_ones(b, layout.prefix + layout.image + stop - start, dtype=torch.bool)
    return keys, torch.cat([fixed, text_mask.bool()], dim=1)


class OLAPT(nn.Module):
    """`forward(batch, negatives)` -> (loss, terms): the whole PT objective, logit scales included, so DDP sees
    every trained parameter used in its forward."""

    def __init__(self, cfg: PTConfig, llm, vision, target_shapes: dict[str, tuple[int, int]], layout: Layout,
                 image_mean, image_std):
        super().__init__()
        self.cfg = cfg
        self.llm = llm.requires_grad_(False)
        self.vision = vision.eval().requires_grad_(False)  # a trainer.towers tower: features(pixels) -> (B, T, C)
        width = llm.config.hidden_size
        self.num_image_tokens = vision.num_tokens
        self.tasks = [t for t in TASKS if t in cfg.tasks]
        self.layout = layout
        if layout.image != self.num_image_tokens or list(layout.task_slots) != self.tasks:
            raise ValueError(f"layout {layout} does not fit {self.num_image_tokens} image tokens and tasks {self.tasks}")
        n_layers = llm.config.num_hidden_layers
        for t in self.tasks:
            bad = [layer for layer in cfg.layers[t] if not 1 <= layer <= n_layers]
            if bad:
                raise ValueError(f"layers.{t} {bad}: the LLM has decoder layers 1..{n_layers}")
        self.projector = Projector(vision.hidden_size, width)
        # std-1 normal initialisation, as the original's torch.randn
        self.special_tokens = nn.ParameterDict({t: nn.Parameter(torch.randn(cfg.special_tokens[t], width)) for t in self.tasks})
        p = cfg.predictor
        self.predictors = nn.ModuleDict()
        for t in self.tasks:
            tokens, out_dim = target_shapes[t]
            queries = 1 if t == "gen" else cfg.special_tokens[t]
            if queries != tokens:
                raise ValueError(f"{t}: the predictor makes {queries} tokens, the store's targets have {tokens}")
            inner = {"out": out_dim, "llm": width}.get(cfg.predictor_width[t], cfg.predictor_width[t])
            for layer in cfg.layers[t]:
                self.predictors[f"{t}_{layer}"] = Predictor(width, out_dim, p["heads"], p["dim_head"], p["ff_mult"],
                                                            p["depth"], inner, t == "depth" and cfg.use_intermediate_depth)
        self.logit_scales = nn.ParameterDict({t: nn.Parameter(torch.tensor(float(cfg.logit_scale_init))) for t in self.tasks})
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trained parameters, and the predictors whole (their frozen parts too)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad or n.startswith("predictors.")}

    def task_token_embeds(self, task: str) -> torch.Tensor:
        vecs = self.special_tokens[task]
        k = self.cfg.task_tokens[task]
        if vecs.shape[0] == k:
            return vecs
        return vecs.view(k, vecs.shape[0] // k, -1).mean(dim=1)  # contiguous groups, as the original

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> projected image tokens (B, 576, H), the tower frozen and without grad."""
        x = (pixels.permute(0, 3, 1, 2).float() / 255.0 - self.image_mean) / self.image_std
        with torch.no_grad():
            feats = self.vision.features(x)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def step_context(self, micro_batches: list[dict]) -> dict[str, Negatives]:
        """What a step's micro-batches share: InfoNCE's columns, the targets of the whole global batch."""
        return step_negatives(micro_batches, self.tasks)

    def forward(self, batch: dict, negatives: dict[str, Negatives] | None = None):
        """batch (on the device): pixels, prefix_ids, text_ids, text_mask, text_labels, targets, valid and
        row_offset (where the micro-batch sits in its global batch). `negatives`: the step's (`step_negatives`);
        None = this micro-batch is the whole global batch. Returns (loss, detached terms)."""
        ntp, preds = self.predict(batch["pixels"], batch["prefix_ids"], batch["text_ids"], batch["text_mask"],
                                  batch["text_labels"])
        if negatives is None:
            negatives, offset = step_negatives([batch], self.tasks), 0
        else:
            offset = batch["row_offset"]
        return pt_loss(ntp, preds, batch["targets"], batch["valid"], negatives, offset, self.logit_scales, self.cfg)

    def predict(self, pixels, prefix_ids, text_ids, text_mask, text_labels):
        """Returns (NTP loss, {task: {layer: prediction (B, T, W)}})."""
        b = pixels.shape[0]
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype
        parts = [embed(prefix_ids), self.image_features(pixels).to(dtype)]
        parts += [self.task_token_embeds(t).to(dtype).unsqueeze(0).expand(b, -1, -1) for t in self.tasks]
        parts.append(embed(text_ids))
        inputs = torch.cat(parts, dim=1)
        fixed = self.layout.text_start
        attention_mask = torch.cat([text_mask.new_ones(b, fixed), text_mask], dim=1)
        n_text = text_ids.shape[1]
        # logits only where they predict text (the last n_text + 1 positions): the rest has no label, and the
        # vocabulary projection of 600 image and task positions would cost memory and time for nothing
        out = self.llm(inputs_embeds=inputs, attention_mask=attention_mask, output_hidden_states=True,
                       use_cache=False, logits_to_keep=n_text + 1)
        ntp = ntp_loss(out.logits[:, :-1], text_labels)
        preds: dict[str, dict[int, torch.Tensor]] = {}
        for t in self.tasks:
            preds[t] = {}
            for layer in self.cfg.layers[t]:
                hidden = out.hidden_states[layer]  # output of decoder layer `layer` (index 0 = embeddings)
                keys, mask = predictor_keys(hidden, text_mask, self.layout, t)
                if t == "gen":
                    start, stop = self.layout.task_slots[t]
                    latents = hidden[:, start:stop].mean(dim=1, keepdim=True)
                else:
                    latents = self.special_tokens[t].to(hidden.dtype).unsqueeze(0).expand(b, -1, -1)
                preds[t][layer] = self.predictors[f"{t}_{layer}"](keys, mask, latents)
        return ntp, preds
