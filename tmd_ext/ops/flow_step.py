"""`flow_step`: one inner-flow step ``y_r = y_s - (s-r)·(y1 - head_out)`` (docs/design.md §1.2, the sign
fixed: for a constant velocity field the step is exact)."""
from __future__ import annotations

import torch

from .. import reference
from . import checks, higher_order


def _check(y, head_out, y1, s, r) -> None:
    checks.tensor(y, "y")
    checks.tensor(head_out, "head_out")
    checks.tensor(y1, "y1")
    checks.tensor(s, "s", checks.TIME_DTYPES)
    checks.tensor(r, "r", checks.TIME_DTYPES)
    checks.same_dtype(head_out, "head_out", y, "y")
    checks.same_dtype(y1, "y1", y, "y")
    for t, n in ((head_out, "head_out"), (y1, "y1"), (s, "s"), (r, "r")):
        checks.same_device(t, n, y, "y")
    if y.dim() < 1:
        raise ValueError("y must be [B, ...] with at least 1 dimension, got a 0-d tensor")
    checks.shape(head_out, y.shape, "head_out")
    checks.shape(y1, y.shape, "y1")
    checks.shape(s, (y.shape[0],), "s")
    checks.shape(r, (y.shape[0],), "r")


def flow_step(y: torch.Tensor, head_out: torch.Tensor, y1: torch.Tensor, s: torch.Tensor,
              r: torch.Tensor) -> torch.Tensor:
    """``y - (s-r)[:, None, ...]·(y1 - head_out)``.

    Args:
        y, head_out, y1: ``[B, ...]`` (latents are ``[B, C, F, H, W]``), one dtype among fp32,
            bf16, fp16, fp64. Non-contiguous inputs are accepted (read through a contiguous copy).
        s, r: ``[B]`` per-sample times, float32 or float64.
    Returns:
        ``[B, ...]`` in the dtype of ``y``; arithmetic in fp32 (fp64 for fp64 inputs).
    Gradients flow to ``y``, ``head_out`` and ``y1`` (not to the times), to every order
    (docs/design.md §3.4). Empty ``y`` (``B`` or a trailing size zero) gives an empty output.
    """
    _check(y, head_out, y1, s, r)
    if y.numel() == 0:  # nothing for a kernel to do
        return reference.flow_step(y, head_out, y1, s, r)
    return torch.ops.tmd.flow_step(y, head_out, y1, s, r)


@torch.library.register_fake("tmd::flow_step")
def _(y, head_out, y1, s, r):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("tmd::flow_step_backward")
def _(grad_out, s, r):
    g = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    return g, torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    _, _, _, s, r = inputs
    ctx.save_for_backward(s, r)


def _backward(ctx, grad_out):
    s, r = ctx.saved_tensors

    def kernel():
        return torch.ops.tmd.flow_step_backward(grad_out, s, r)

    if higher_order.recording():  # create_graph=True: differentiable gradients (§3.4)
        # linear in (head_out, y1): the Jacobian does not depend on the point, so grad_out (its
        # shape and dtype) serves as the primals
        s_, r_ = s.detach(), r.detach()
        point = grad_out.detach()
        grad_head_out, grad_y1 = higher_order.kernel_grads(
            kernel, lambda h, y1: reference.flow_step(point, h, y1, s_, r_), (point, point), grad_out)
    else:
        grad_head_out, grad_y1 = kernel()
    return grad_out, grad_head_out, grad_y1, None, None


torch.library.register_autograd("tmd::flow_step", _backward, setup_context=_setup_context)
