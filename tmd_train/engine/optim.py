"""The guarded optimizer update every method uses: learning rate, replicated-gradient averaging,
global clipping, the non-finite guard (skip and count), step, zero_grad."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .config import TrainConfig
from .distributed import all_finite, average_gradients, clip_grad_norm


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Constant learning rate after a linear warm-up over ``warmup_steps`` (step is 1-based)."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, step / warmup_steps)


def adamw(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` with the config's betas, eps and weight decay."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite (on any process) and counts
    them (``skipped``)."""

    def __init__(self, skipped: int = 0) -> None:
        self.skipped = skipped

    def ok(self, *values: torch.Tensor) -> bool:
        """True when every value is finite on every process (a collective under distribution);
        counts a skip otherwise."""
        good = all_finite(*values)
        if not good:
            self.skipped += 1
        return good


def guarded_update(optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, loss: torch.Tensor, *,
                   max_grad_norm: float, lr: float | None = None,
                   replicated: Sequence[nn.Parameter] = ()) -> tuple[float, bool]:
    """After backward: set ``lr`` (if given), average the gradients of the ``replicated``
    parameters among the optimizer's, clip the global gradient norm to ``max_grad_norm`` (<= 0:
    no clipping), then step unless the loss or the norm is non-finite on some process (the guard
    counts the skip); gradients are zeroed either way. Returns ``(grad_norm, stepped)``."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    params = [p for g in optimizer.param_groups for p in g["params"]]
    average_gradients([p for p in replicated if any(p is q for q in params)])
    grad_norm = clip_grad_norm(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    stepped = guard.ok(loss.detach().double().cpu(), grad_norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), stepped
