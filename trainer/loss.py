"""The PT loss (SPEC section 3), in fp32:

    L = L_ntp + sum over tasks  w_task * sum over the task's layers ( smoothL1(p, t) + w_nce * InfoNCE(p, t) )

  * smooth-L1, beta 1, mean over the elements of the samples whose target is valid;
  * InfoNCE: each sample's prediction and target flattened and L2-normalised, logits = min(exp(s), 100) * p_i . t_j
    against the targets of the whole global batch (gathered from every rank, without gradient), cross-entropy
    against the sample's own index; s is a learnable scalar per task (initialised to 2.0). Samples without a
    valid target are neither rows nor columns.
  * Invalid samples are masked per sample in both terms. (The released code zeroes its masks before using
    them, which makes every embedding loss 0; that bug is not reproduced.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    per_sample = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).flatten(1).mean(dim=1)
    n = valid.sum()
    return (per_sample * valid).sum() / n.clamp(min=1)


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(concatenation over ranks, offset of this rank's rows); x unchanged without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def infonce(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor,
            max_scale: float = 100.0) -> torch.Tensor:
    p = F.normalize(pred.float().flatten(1), dim=-1)
    with torch.no_grad():
        t = F.normalize(target.float().flatten(1), dim=-1)
        t_all, offset = _gather(t)
        valid_all, _ = _gather(valid.to(torch.uint8))
    logits = torch.clamp(logit_scale.float().exp(), max=max_scale) * p @ t_all.T
    logits = logits.masked_fill(~valid_all.bool()[None, :], float("-inf"))
    rows = valid.bool()
    if not rows.any():
        return logits.new_zeros(()) + 0.0 * pred.sum() + 0.0 * logit_scale  # keeps every parameter in the graph
    labels = torch.arange(p.shape[0], device=p.device) + offset
    return F.cross_entropy(logits[rows], labels[rows])


def pt_loss(ntp: torch.Tensor, preds: dict, targets: dict, valid: dict, logit_scales, cfg) -> tuple[torch.Tensor, dict]:
    """Total loss and its terms ({"ntp", "<task>/<layer>/sl1", "<task>/<layer>/nce", "<task>"}) as floats."""
    total = ntp.float()
    terms = {"ntp": ntp.detach().float()}
    for task, by_layer in preds.items():
        task_sum = 0.0
        for layer, p in by_layer.items():
            sl1 = masked_smooth_l1(p, targets[task], valid[task], cfg.smooth_l1_beta)
            nce = infonce(p, targets[task], valid[task], logit_scales[task], cfg.logit_scale_max)
            task_sum = task_sum + sl1 + cfg.contrastive_weight * nce
            terms[f"{task}/{layer}/sl1"] = sl1.detach()
            terms[f"{task}/{layer}/nce"] = nce.detach()
        task_loss = cfg.task_loss_weight * task_sum
        terms[task] = task_loss.detach()
        total = total + task_loss
    terms["loss"] = total.detach()
    return total, terms
