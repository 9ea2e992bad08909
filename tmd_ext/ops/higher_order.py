"""Second and higher derivatives through the ops (docs/design.md §3.4).

A backward op is a kernel without autograd of its own. When the backward itself is recorded
(``create_graph=True``, ``torch.autograd.gradgradcheck``, a gradient penalty), each op's autograd
backward still returns the kernel's gradients — the same values as without ``create_graph`` — but
carrying the autograd graph of the reference's vector-Jacobian product (:mod:`tmd_ext.reference`,
written in differentiable torch ops), so differentiating them again is exact to every order. This
costs one reference forward and backward on top of the kernel, only when the graph is recorded."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def recording() -> bool:
    """Whether the running backward is itself recorded (grad mode is on inside a backward only with
    ``create_graph=True``)."""
    return torch.is_grad_enabled()


class _KernelValue(torch.autograd.Function):
    """``value`` (a kernel's gradient) whose derivatives are those of ``like`` (the same gradient
    computed by the reference in differentiable torch ops)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return value.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def kernel_grads(kernel: Callable[[], Sequence[torch.Tensor | None]], reference: Callable,
                 primals: Sequence[torch.Tensor], cotangents) -> tuple[torch.Tensor | None, ...]:
    """The gradients ``kernel()`` returns (w.r.t. ``primals``, ``None`` where there is none), each
    carrying the graph of ``vjp(reference, *primals)(cotangents)``, so it is differentiable w.r.t.
    the primals and the cotangents. ``reference`` takes exactly ``primals`` (every other argument
    closed over as a constant). The kernel runs without grad: the backward op has no autograd."""
    with torch.no_grad():
        grads = kernel()
    _, vjp = torch.func.vjp(reference, *primals)
    ref = vjp(cotangents)
    return tuple(None if g is None else _KernelValue.apply(g, r) for g, r in zip(grads, ref, strict=True))
