"""The PT loss (SPEC section 3), in fp32:

    L = L_ntp + sum over tasks  w_task * sum over the task's layers ( smoothL1(p, t) + w_nce * InfoNCE(p, t) )

  * NTP: cross-entropy of the labelled text tokens, mean over the micro-batch's labelled tokens.
  * smooth-L1, beta 1, mean over the elements of the samples whose target is valid;
  * InfoNCE: each sample's prediction and target flattened and L2-normalised, logits = min(exp(s), 100) * p_i . t_j
    against the targets of the whole global batch of the step (`Negatives`, gathered once per step from every
    rank and every micro-batch, without gradient), cross-entropy against the sample's own position; s is a
    learnable scalar per task (initialised to 2.0). With the released setting (8 GPUs x 32, no accumulation) that
    is the original's all-gathered batch; keeping it the whole global batch also under accumulation is what makes
    a step's loss independent of the number of processes. Samples without a valid target are neither rows nor
    columns.
  * Invalid samples are masked per sample in every term: a masked mean, so a micro-batch with none valid
    contributes 0 and still reaches every parameter (DDP needs no unused-parameter search). (The released code
    zeroes its masks before using them, which makes every embedding loss 0; that bug is not reproduced.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.templates import IGNORE_INDEX


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp(min=1)


def ntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens; logits[:, i] predicts labels[:, i]. 0 when none is labelled."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return masked_mean(ce, labels.flatten() != IGNORE_INDEX)


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    per_sample = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).flatten(1).mean(dim=1)
    return masked_mean(per_sample, valid)


@dataclass
class Negatives:
    """A task's targets of the whole global batch, flattened and L2-normalised (fp32), in position order."""

    targets: torch.Tensor  # (G, T*W)
    valid: torch.Tensor  # (G,) bool

    @classmethod
    def of(cls, targets: list[torch.Tensor], valid: list[torch.Tensor], gather: bool = True) -> Negatives:
        """From this rank's micro-batches of the step (in order), gathered over the process group (rank r's
        micro-batches come before rank r+1's, as the stream assigns them); `gather` False: this rank's only."""
        with torch.no_grad():
            t = F.normalize(torch.cat([x.float().flatten(1) for x in targets]), dim=-1)
            v = torch.cat(valid).bool()
            if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                ts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
                vs = [torch.empty_like(v, dtype=torch.uint8) for _ in range(dist.get_world_size())]
                dist.all_gather(ts, t.contiguous())
                dist.all_gather(vs, v.to(torch.uint8))
                t, v = torch.cat(ts), torch.cat(vs).bool()
        return cls(t, v)


def step_negatives(micro_batches: list[dict], tasks, gather: bool = True) -> dict[str, Negatives]:
    """Every task's `Negatives` for one step, from this rank's micro-batches (already on the device)."""
    return {t: Negatives.of([b["targets"][t] for b in micro_batches], [b["valid"][t] for b in micro_batches],
                            gather) for t in tasks}


def infonce(pred: torch.Tensor, valid: torch.Tensor, negatives: Negatives, row_offset: int,
            logit_scale: torch.Tensor, max_scale: float = 100.0) -> torch.Tensor:
    """Rows: this micro-batch's predictions, whose own targets sit at `row_offset + i` of `negatives`."""
    p = F.normalize(pred.float().flatten(1), dim=-1)
    logits = torch.clamp(logit_scale.float().exp(), max=max_scale) * p @ negatives.targets.T
    logits = logits.masked_fill(~negatives.valid[None, :], float("-inf"))
    rows = valid.bool()
    logits = torch.where(rows[:, None], logits, 0.0)  # an invalid row's own column may be -inf: keep it finite
    labels = torch.arange(p.shape[0], device=p.device) + row_offset
    return masked_mean(F.cross_entropy(logits, labels, reduction="none"), rows)


def pt_loss(ntp: torch.Tensor, preds: dict, targets: dict, valid: dict, negatives: dict[str, Negatives],
            row_offset: int, logit_scales, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms ({"ntp", "<task>/<layer>/sl1", "<task>/<layer>/nce", "<task>", "loss"}) as
    detached 0-d tensors (the caller decides when to bring them to the host)."""
    total = ntp.float()
    terms = {"ntp": ntp.detach().float()}
    for task, by_layer in preds.items():
        task_sum = 0.0
        for layer, p in by_layer.items():
            sl1 = masked_smooth_l1(p, targets[task], valid[task], cfg.tasks.smooth_l1_beta)
            nce = infonce(p, valid[task], negatives[task], row_offset, logit_scales[task], cfg.tasks.logit_scale_max)
            task_sum = task_sum + sl1 + cfg.tasks.contrastive_weight * nce
            terms[f"{task}/{layer}/sl1"] = sl1.detach()
            terms[f"{task}/{layer}/nce"] = nce.detach()
        task_loss = cfg.tasks.task_loss_weight * task_sum
        terms[task] = task_loss.detach()
        total = total + task_loss
    terms["loss"] = total.detach()
    return total, terms
