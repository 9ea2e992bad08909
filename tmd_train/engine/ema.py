"""Exponential moving average of a (possibly FSDP2-sharded) module's parameters."""
from __future__ import annotations

import torch
from torch import nn

from .distributed import local_tensor


class EMA:
    """``ema ← d·ema + (1-d)·w`` after every :meth:`update`; during the first ``start`` updates
    it just copies the weights. The averages live beside the parameters (same device, dtype and,
    under FSDP2, the same sharding), keyed by parameter name.

    Args:
        module: the module whose parameters are averaged (the FSDP root, if sharded).
        decay: ``d`` in ``[0, 1)``.
        start: updates that copy instead of averaging.
    """

    def __init__(self, module: nn.Module, decay: float, start: int = 0) -> None:
        self.module = module
        self.decay = decay
        self.start = start
        self.updates = 0
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update from the module's current weights (counted in ``updates``)."""
        self.updates += 1
        copy_only = self.updates <= self.start
        for n, p in self.module.named_parameters():
            if copy_only:
                self.shadow[n].copy_(p.detach())
            else:
                self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages as they are held (under FSDP2 sharded like the parameters: nothing gathered), keyed
        by parameter name; a checkpoint saves these tensors and loads into them in place."""
        return dict(self.shadow)

    def full(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies of the averages (collective under FSDP)."""
        return {n: local_tensor(v).detach().cpu().clone() for n, v in self.shadow.items()}

    def load(self, full: dict[str, torch.Tensor]) -> None:
        """Set the averages from unsharded tensors (as :meth:`full` returns them), re-sharding
        them like the parameters."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        for n, p in self.module.named_parameters():
            value = full[n].to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            self.shadow[n] = value.detach().clone()
