"""`adaln_modulate`: the AdaLN modulation of the head's blocks and the fusion FFN (docs/design.md §3.2),
``LayerNorm_noaffine(x)·(1 + scale) + shift`` with per-sample ``shift, scale``."""
from __future__ import annotations

import math

import torch

from .. import reference
from . import checks, higher_order


def _check(x, shift, scale, eps) -> None:
    checks.tensor(x, "x")
    checks.tensor(shift, "shift")
    checks.tensor(scale, "scale")
    checks.same_dtype(shift, "shift", x, "x")
    checks.same_dtype(scale, "scale", x, "x")
    checks.same_device(shift, "shift", x, "x")
    checks.same_device(scale, "scale", x, "x")
    checks.dim(x, 3, "x", "[B, T, D]")
    checks.shape(shift, (x.shape[0], x.shape[2]), "shift")
    checks.shape(scale, (x.shape[0], x.shape[2]), "scale")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """``xhat·(1 + scale[:, None, :]) + shift[:, None, :]`` with ``xhat = (x - mean)·rsqrt(var + eps)``
    over the last dimension (LayerNorm without affine parameters, biased variance).

    Args:
        x: ``[B, T, D]`` tokens, one dtype among fp32, bf16, fp16, fp64. Non-contiguous inputs
            are accepted (read through a contiguous copy).
        shift, scale: ``[B, D]`` per-sample modulation, the dtype of ``x``.
        eps: finite, ``>= 0``; added to the variance.
    Returns:
        ``[B, T, D]`` in the dtype of ``x``; arithmetic in fp32 (fp64 for fp64 inputs), rounded once.
    Gradients flow to ``x``, ``shift`` and ``scale``, to every order (docs/design.md §3.4). Empty
    ``x`` (``B``, ``T`` or ``D`` zero) gives the reference's result: an empty output, and zero
    gradients for ``shift`` and ``scale`` where ``T = 0``.
    """
    _check(x, shift, scale, eps)
    if x.numel() == 0:  # nothing for a kernel to do
        return reference.adaln_modulate(x, shift, scale, eps)
    out, _, _ = torch.ops.tmd.adaln_modulate(x, shift, scale, float(eps))
    return out


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("tmd::adaln_modulate")
def _(x, shift, scale, eps):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    stats = x.new_empty(x.shape[:2], dtype=_opmath(x.dtype))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("tmd::adaln_modulate_backward")
def _(grad_out, x, scale, mean, rstd):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_shift = x.new_empty((x.shape[0], x.shape[2]))
    return grad_x, grad_shift, torch.empty_like(grad_shift)


def _setup_context(ctx, inputs, output):
    x, shift, scale, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps = eps
    ctx.save_for_backward(x, shift, scale, mean, rstd)


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors

    def kernel():
        return torch.ops.tmd.adaln_modulate_backward(grad_out, x, scale, mean, rstd)

    if higher_order.recording():  # create_graph=True: differentiable gradients (§3.4)
        grads = higher_order.kernel_grads(
            kernel, lambda x_, shift_, scale_: reference.adaln_modulate(x_, shift_, scale_, ctx.eps),
            (x, shift, scale), grad_out)
    else:
        grads = kernel()
    grad_x, grad_shift, grad_scale = grads
    return grad_x, grad_shift, grad_scale, None


torch.library.register_autograd("tmd::adaln_modulate", _backward, setup_context=_setup_context)
