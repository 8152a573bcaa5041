"""The sequence model PT and probing share: [prefix | image tokens | task tokens | text] through a causal LLM.

    prefix       BOS, system block, user header (its length is the image offset, from the tokenizer)
    image        the frozen base encoder's tokens through the projector (mlp2x_gelu); none with VLoRA's
                 connector (trainer/vlora.py), whose per-sample deltas reach the LLM's layers instead
    task tokens  per task, its learnable vectors mean-pooled in contiguous groups to the tokens it puts in the
                 sequence (gen 8 -> 8; depth and seg 576 -> 8), in the canonical task order (recipes.ordered_tasks)
    text         question and answer, padded on the right (padding masked)

The LLM's weights never train (PT trains the projector and task tokens through it; probing trains nothing of
it). `MLLM.run` returns every layer's hidden states and, when asked, the logits of the last positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from recipes.manifest import ordered_tasks


class Projector(nn.Sequential):
    """LLaVA's mlp2x_gelu; the indices 0 and 2 give its checkpoint keys mm_projector.{0,2}.{weight,bias}."""

    def __init__(self, vision_width: int, llm_width: int):
        super().__init__(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))


@dataclass(frozen=True)
class Layout:
    """Where things sit in the LLM sequence."""

    prefix: int  # image offset
    image: int  # image tokens
    task_slots: dict[str, tuple[int, int]]  # task -> [start, stop) in the sequence
    text_start: int
    masked: tuple[int, ...] = ()  # prefix positions no token attends to (VLoRA's <image> placeholder)

    @classmethod
    def of(cls, prefix: int, image: int, task_tokens: dict[str, int], order=None, masked=()) -> Layout:
        """Task tokens follow the image in `order` (olaf's, None: the canonical task order, recipes.ordered_tasks;
        a released model's: its config's aux_mode), `task_tokens[t]` of each."""
        slots, pos = {}, prefix + image
        for t in ordered_tasks(task_tokens) if order is None else order:
            if t in task_tokens:
                slots[t], pos = (pos, pos + task_tokens[t]), pos + task_tokens[t]
        return cls(prefix, image, slots, pos, tuple(masked))

    def attention_mask(self, text_mask: torch.Tensor) -> torch.Tensor:
        fixed = text_mask.new_ones(text_mask.shape[0], self.text_start)
        fixed[:, list(self.masked)] = 0
        return torch.cat([fixed, text_mask], dim=1)

    def keys(self, hidden: torch.Tensor, text_mask: torch.Tensor, task: str | None = None):
        """The hidden states a head reads, as (keys (B, L', H), mask (B, L') bool): every token (`task` None: the
        probes), or a task's predictor's: prefix, image, its own task tokens and text, other tasks' tokens left
        out. Padding is masked."""
        full = self.attention_mask(text_mask).bool()
        if task is None:
            return hidden, full
        start, stop = self.task_slots[task]
        fixed = self.prefix + self.image
        keys = torch.cat([hidden[:, :fixed], hidden[:, start:stop], hidden[:, self.text_start:]], 1)
        mask = torch.cat([full[:, :fixed], full[:, start:stop], full[:, self.text_start:]], dim=1)
        return keys, mask


class TaskTokens(nn.ParameterDict):
    """Each task's learnable vectors (`special_tokens.<task>`), and the tokens it puts in the sequence: the
    vectors mean-pooled in `pooled[task]` contiguous groups (depth and seg 576 -> 8), or themselves (gen 8)."""

    def __init__(self, vectors: dict[str, torch.Tensor], pooled: dict[str, int], trainable: bool = True):
        # a plain dict: ParameterDict keeps its keys sorted, the parameter order checkpoints' optimizer states use
        super().__init__({t: nn.Parameter(v, requires_grad=trainable) for t, v in vectors.items()})
        self.pooled = dict(pooled)

    @classmethod
    def random(cls, counts: dict[str, int], pooled: dict[str, int], width: int) -> TaskTokens:
        """std-1 normal initialisation, as the original's torch.randn."""
        return cls({t: torch.randn(counts[t], width) for t in ordered_tasks(counts)}, pooled)

    def sequence_tokens(self, task: str) -> torch.Tensor:
        vecs, k = self[task], self.pooled[task]
        return vecs if vecs.shape[0] == k else vecs.view(k, vecs.shape[0] // k, -1).mean(dim=1)


class MLLM(nn.Module):
    """The frozen LLM (`embed` its input embeddings, `decoder` its layers, `lm_head` its output projection or
    None), the frozen base encoder (`vision`, a trainer.towers tower), the projector and the task tokens."""

    def __init__(self, embed: nn.Module, decoder: nn.Module, lm_head: nn.Module | None, vision, projector: nn.Module,
                 task_tokens: TaskTokens, layout: Layout, image_mean, image_std):
        super().__init__()
        self.embed, self.decoder, self.lm_head = embed, decoder, lm_head
        for part in (embed, decoder, lm_head):
            if part is not None:
                part.requires_grad_(False)
        self.vision = vision.eval().requires_grad_(False)
        self.projector, self.special_tokens, self.layout = projector, task_tokens, layout
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        image_tokens = getattr(projector, "num_tokens", vision.num_tokens)  # VLoRA's connector puts none
        if layout.image != image_tokens or set(layout.task_slots) != set(task_tokens):
            raise ValueError(f"layout {layout} does not fit {image_tokens} image tokens and task tokens "
                             f"{list(task_tokens)}")

    @property
    def config(self):
        """The LLM's config (layers, width)."""
        return self.decoder.config

    def image_tokens(self, pixels: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> projected image tokens (B, N, H); the tower frozen and without grad. `has_image`
        (B,) bool: which rows have a usable image, for a connector that treats the others as text-only."""
        x = (pixels.permute(0, 3, 1, 2).float() / 255.0 - self.image_mean) / self.image_std
        with torch.no_grad():
            feats = self.vision.features(x)
        feats = feats.to(next(self.projector.parameters()).dtype)
        if has_image is not None and getattr(self.projector, "masks_rows", False):
            return self.projector(feats, has_image)
        return self.projector(feats)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention mask) of a batch (pixels, prefix_ids, text_ids, text_mask)."""
        b, dtype = batch["pixels"].shape[0], self.embed.weight.dtype
        parts = [self.embed(batch["prefix_ids"]), self.image_tokens(batch["pixels"], batch.get("has_image")).to(dtype)]
        parts += [self.special_tokens.sequence_tokens(t).to(dtype).unsqueeze(0).expand(b, -1, -1)
                  for t in self.layout.task_slots]
        parts.append(self.embed(batch["text_ids"]))
        return torch.cat(parts, dim=1), self.layout.attention_mask(batch["text_mask"])

    def run(self, batch: dict, logits_to_keep: int = 0):
        """(hidden states of every layer (index 0: the embeddings), logits of the last `logits_to_keep` positions
        or None): the vocabulary projection only where it is needed (PT: the text)."""
        inputs, mask = self.inputs(batch)
        out = self.decoder(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True, use_cache=False)
        logits = self.lm_head(out.last_hidden_state[:, -logits_to_keep:]) if logits_to_keep else None
        return out.hidden_states, logits
