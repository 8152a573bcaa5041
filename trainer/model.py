"""The OLA-VLM PT model: the sequence model (trainer.sequence: frozen CLIP tower -> trainable projector -> frozen
causal LLM with trainable task tokens) and trainable embedding predictors that read the LLM's hidden states at
chosen layers; `forward` returns the PT loss. `connector: vlora` puts VLoRA's weights generator where the projector
is (trainer/vlora.py); `tasks: []` leaves next-token prediction alone (LLaVA-1.5's and VLoRA's PT).

  * predictor for (task, layer l): a one-block Perceiver resampler (trainer.heads.Predictor) whose keys are the
    layer-l hidden states of prefix | image | that task's own tokens | text, padding masked (the original leaves
    other tasks' tokens out but attends to padding); its queries are the task's 576 vectors (depth, seg) or the
    mean of the 8 gen tokens' hidden states (gen), both through the predictor's input projection, as in
    OLA-VLM's TaskTokenResampler; its output has the target's shape (gen 1 x 1024, depth 576 x 1024, seg 576 x
    1536). Its inner width is the target's for gen and seg and the LLM's for depth (the original's
    TaskTokenDepthHead, `predictor_width`); `use_intermediate_depth` adds the original's three MLPs on the depth
    output.
Token grids are row-major (token = row * 24 + col), the stored targets' layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from recipes.manifest import ordered_tasks
from trainer.config import PTConfig
from trainer.heads import Predictor
from trainer.loss import Negatives, ntp_loss, pt_loss, step_negatives
from trainer.sequence import MLLM, Layout, Projector, TaskTokens


def connector(cfg: PTConfig, llm, vision) -> nn.Module:
    """What turns the tower's features into the LLM's input: LLaVA's mlp2x_gelu projector (image tokens), or
    VLoRA's weights generator (per-sample deltas in the LLM's layers, no image tokens)."""
    if cfg.model.connector == "vlora":
        from trainer import vlora
        from trainer.errors import TrainerError

        try:
            return vlora.VLoRAConnector(vlora.settings(cfg.vlora, llm.config, vision), llm.get_decoder())
        except vlora.VLoRAError as e:
            raise TrainerError(str(e)) from None
    return Projector(vision.hidden_size, llm.config.hidden_size)


class OLAPT(MLLM):
    """`forward(batch, negatives)` -> (loss, terms): the whole PT objective, logit scales included, so DDP sees
    every trained parameter used in its forward. Trained: projector, special_tokens, predictors, logit_scales."""

    def __init__(self, cfg: PTConfig, llm, vision, target_shapes: dict[str, tuple[int, int]], layout: Layout,
                 image_mean, image_std):
        width = llm.config.hidden_size
        tasks = ordered_tasks(cfg.tasks.names)
        projector = connector(cfg, llm, vision)
        tokens = TaskTokens.random({t: cfg.tasks.special_tokens[t] for t in tasks}, cfg.tasks.task_tokens, width)
        super().__init__(llm.get_input_embeddings(), llm.get_decoder(), llm.get_output_embeddings(), vision,
                         projector, tokens, layout, image_mean, image_std)
        self.cfg, self.tasks = cfg, tasks
        self.pooled = {t: target_shapes[t][0] == 1 for t in tasks}  # a one-vector target: its tokens' mean queries
        n_layers = llm.config.num_hidden_layers
        for t in tasks:
            bad = [layer for layer in cfg.tasks.layers[t] if not 1 <= layer <= n_layers]
            if bad:
                raise ValueError(f"layers.{t} {bad}: the LLM has decoder layers 1..{n_layers}")
        p = cfg.tasks.predictor
        self.predictors = nn.ModuleDict()
        for t in tasks:
            tokens_out, out_dim = target_shapes[t]
            queries = 1 if tokens_out == 1 else cfg.tasks.special_tokens[t]  # one vector (gen) or a grid
            if queries != tokens_out:
                raise ValueError(f"{t}: the predictor makes {queries} tokens, the store's targets have {tokens_out}")
            inner = {"out": out_dim, "llm": width}.get(cfg.tasks.predictor_width[t], cfg.tasks.predictor_width[t])
            for layer in cfg.tasks.layers[t]:
                self.predictors[f"{t}_{layer}"] = Predictor(width, out_dim, p["heads"], p["dim_head"], p["ff_mult"],
                                                            p["depth"], inner, t == "depth" and cfg.tasks.use_intermediate_depth)
        scale = float(cfg.tasks.logit_scale_init)
        self.logit_scales = nn.ParameterDict({t: nn.Parameter(torch.tensor(scale)) for t in tasks})

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trained parameters, and the predictors whole (their frozen parts too)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad or n.startswith("predictors.")}

    def step_context(self, micro_batches: list[dict]) -> dict[str, Negatives]:
        """What a step's micro-batches share: InfoNCE's columns, the targets of the whole global batch."""
        return step_negatives(micro_batches, self.tasks)

    def forward(self, batch: dict, negatives: dict[str, Negatives] | None = None):
        """batch (on the device): pixels, prefix_ids, text_ids, text_mask, text_labels, targets, valid and
        row_offset (where the micro-batch sits in its global batch). `negatives`: the step's (`step_negatives`);
        None = this micro-batch is the whole global batch. Returns (loss, detached terms)."""
        ntp, preds = self.predict(batch)
        if negatives is None:
            negatives, offset = step_negatives([batch], self.tasks), 0
        else:
            offset = batch["row_offset"]
        return pt_loss(ntp, preds, batch["targets"], batch["valid"], negatives, offset, self.logit_scales, self.cfg)

    def predict(self, batch: dict):
        """Returns (NTP loss, {task: {layer: prediction (B, T, W)}})."""
        n_text = batch["text_ids"].shape[1]
        # logits only where they predict text (the last n_text + 1 positions): the rest has no label, and the
        # vocabulary projection of 600 image and task positions would cost memory and time for nothing
        hidden_states, logits = self.run(batch, logits_to_keep=n_text + 1)
        ntp = ntp_loss(logits[:, :-1], batch["text_labels"])
        b = batch["pixels"].shape[0]
        preds: dict[str, dict[int, torch.Tensor]] = {}
        for t in self.tasks:
            preds[t] = {}
            for layer in self.cfg.tasks.layers[t]:
                hidden = hidden_states[layer]  # output of decoder layer `layer` (index 0 = embeddings)
                keys, mask = self.layout.keys(hidden, batch["text_mask"], t)
                if self.pooled[t]:
                    start, stop = self.layout.task_slots[t]
                    latents = hidden[:, start:stop].mean(dim=1, keepdim=True)
                else:
                    latents = self.special_tokens[t].to(hidden.dtype).unsqueeze(0).expand(b, -1, -1)
                preds[t][layer] = self.predictors[f"{t}_{layer}"](keys, mask, latents)
        return ntp, preds
