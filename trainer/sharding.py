"""Sharded trained state (`model.sharding: fsdp`): the trained modules' parameters, gradients and AdamW state split
across the ranks with torch's FSDP2 (`fully_shard`), as ZeRO-2/3 do; the frozen LLM and tower are left whole on
every rank, as under DDP (`sharding: none`).

Units: each predictor, the mlp2x_gelu projector (or each of VLoRA's weight generators) is one FSDP group, gathered
for its own forward and backward only; the rest of the trained parameters (task tokens, logit scales, VLoRA's Bs,
visual projection and position embedding, which VLoRA's hooks read while the LLM runs) is the root's group,
gathered for the whole step. Precision is the run's: the trained weights stay fp32 and bf16 autocast casts them,
as under DDP, so the two give the same losses.

Checkpoints stay one format: the tensors are gathered to full ones (every rank takes part) and rank 0 writes them
as an unsharded run does; a load slices each rank's shard from the full tensors. So a run saved on N ranks under
fsdp resumes on M ranks under fsdp or under none, and the reverse.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


class Sharded:
    """What a sharded run does beyond FSDP2: the trained scalars (the logit scales; FSDP2 shards no 0-d tensor) are
    kept whole on every rank, their gradients averaged over the ranks here, as DDP would."""

    def __init__(self, replicated: list[nn.Parameter], world: int):
        self.replicated, self.world = replicated, world

    def reduce_replicated(self) -> None:
        """After the step's last backward: the replicated parameters' gradients, averaged over the ranks."""
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not grads:
            return
        import torch.distributed as dist

        flat = torch.stack([g.reshape(()) for g in grads])
        dist.all_reduce(flat)
        for g, v in zip(grads, (flat / self.world).unbind(), strict=True):
            g.copy_(v)


def shard_trained(model: nn.Module, world: int, device: torch.device, always: bool = False) -> Sharded | None:
    """Shards `model`'s trained state over the `world` ranks of the default process group (FSDP2); None (nothing
    done) on one process, where there is nothing to split, unless `always` (the GPU proof times the code path)."""
    if world < 2 and not always:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that a unit returns a view, which an in-place op would cut off from its backward hook; no
    # output of a unit here is changed in place (the generators' are concatenated, the predictors' go to the loss)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world,))
    for unit in units(model):
        fully_shard(unit, mesh=mesh, shard_placement_fn=longest_dim)
    frozen = {p for part in (model.embed, model.decoder, model.lm_head, model.vision) if part is not None
              for p in part.parameters()}
    scalars = [p for p in model.parameters() if p.requires_grad and p.dim() == 0]
    fully_shard(model, mesh=mesh, ignored_params=frozen | set(scalars), shard_placement_fn=longest_dim)
    return Sharded(scalars, world)


def clip_sharded(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """torch's clip_grad_norm_ for a sharded run: the total norm over every rank, and the gradients scaled by
    max_norm / (norm + 1e-6) where that is below 1 (only when `max_norm` is set)."""
    norm = grad_norm(params)
    if max_norm:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                local(p.grad).mul_(coef)
    return norm


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' total norm over every rank's shards and the replicated ones (a plain tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    parts = [torch.nn.utils.get_total_norm([g for g in grads if is_sharded(g) == s]) for s in (True, False)
             if any(is_sharded(g) == s for g in grads)]
    return torch.linalg.vector_norm(torch.stack([full(n).float() for n in parts])) if parts else torch.zeros(())


def longest_dim(p: nn.Parameter):
    """Shard a parameter along its longest dimension: FSDP2's default, dim 0, would leave a (1, n, d) tensor
    (VLoRA's Bs, position embedding and queries) whole on one rank and nothing on the others."""
    from torch.distributed.tensor import Shard

    return Shard(max(range(p.dim()), key=lambda d: (p.shape[d], -d)))


def units(model: nn.Module) -> list[nn.Module]:
    """The modules whose parameters are used inside their own forward only, each an FSDP group of its own."""
    conn = model.projector
    parts = conn.generators() if hasattr(conn, "generators") else [conn]
    return [*parts, *model.predictors.values()]


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it, in the same order), or `t` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor, or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def shard_as(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` cut as `like` is (its mesh and placements), or `whole` itself when `like` is not sharded."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.dtype), like.device_mesh, like.placements)


class OptimizerState:
    """An optimizer's state for checkpoints: whole tensors, as an unsharded run's `optimizer.state_dict()` (index-
    keyed), whatever the sharding; a load cuts each state tensor as its parameter is."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        params = self._params()
        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)] if int(i) < len(params) else None
            state[i] = {k: shard_as(v, p) if p is not None and torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in s.items()}
        self.optimizer.load_state_dict({**sd, "state": state})


def trained_state_bytes(model: nn.Module) -> dict[str, int]:
    """What the trained state takes on this rank: the trained modules' parameters (their frozen predictor parts
    too), the gradients and AdamW's two moments of the trained ones; as held between steps (a shard under fsdp)."""
    own = [local(p) for n, p in model.named_parameters() if p.requires_grad or n.startswith("predictors.")]
    trained = [local(p) for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in own)
    grads = sum(p.numel() * p.element_size() for p in trained)
    return {"parameters": params, "gradients": grads, "optimizer": 2 * grads,
            "total": params + grads + 2 * grads}
