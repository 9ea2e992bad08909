"""`meanflow_fd_loss`: the TM-MeanFlow loss with the finite-difference target (docs/design.md §1.4; contract §3.2).

Per sample ``b`` with ``d`` elements::

    du/ds = (u_plus - u_minus) / (s_plus - s_minus)
    û     = v - (s - r)·du/ds          (û = v on rows with s == r; u_plus, u_minus unread there)
    Δ     = u - sg(û)
    loss  = ‖Δ‖² / sg(‖Δ‖² + c),   mse = ‖Δ‖² / d
"""
from __future__ import annotations

import math

import torch

from .. import reference
from . import checks, higher_order


def _check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c) -> None:
    checks.tensor(u, "u")
    checks.tensor(u_plus, "u_plus")
    checks.tensor(u_minus, "u_minus")
    checks.tensor(v, "v")
    for t, n in ((s, "s"), (r, "r"), (s_plus, "s_plus"), (s_minus, "s_minus")):
        checks.tensor(t, n, checks.TIME_DTYPES)
    for t, n in ((u_plus, "u_plus"), (u_minus, "u_minus"), (v, "v")):
        checks.same_dtype(t, n, u, "u")
    for t, n in ((u_plus, "u_plus"), (u_minus, "u_minus"), (v, "v"), (s, "s"), (r, "r"),
                 (s_plus, "s_plus"), (s_minus, "s_minus")):
        checks.same_device(t, n, u, "u")
    if u.dim() < 1:
        raise ValueError("u must be [B, ...] with at least 1 dimension, got a 0-d tensor")
    if math.prod(u.shape[1:]) == 0:  # mse = ‖Δ‖²/d is 0/0
        raise ValueError(f"u must have at least one element per sample, got shape {tuple(u.shape)}")
    for t, n in ((u_plus, "u_plus"), (u_minus, "u_minus"), (v, "v")):
        checks.shape(t, u.shape, n)
    for t, n in ((s, "s"), (r, "r"), (s_plus, "s_plus"), (s_minus, "s_minus")):
        checks.shape(t, (u.shape[0],), n)
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"c must be a Python float, got {type(c).__name__}")
    if not 0 < c < math.inf:  # comparisons only (NaN fails both), so a symbolic c traces too
        raise ValueError(f"c must be a finite number > 0, got {c}")


def meanflow_fd_loss(u: torch.Tensor, u_plus: torch.Tensor, u_minus: torch.Tensor, v: torch.Tensor,
                     s: torch.Tensor, r: torch.Tensor, s_plus: torch.Tensor, s_minus: torch.Tensor,
                     c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TM-MeanFlow loss ``‖Δ‖²/sg(‖Δ‖²+c)`` and raw MSE ``‖Δ‖²/d``.

    Args:
        u: ``[B, ...]`` (latents ``[B, C, F, H, W]``) the prediction ``y1 - head(y_s, s, r; m)``;
            fp32, bf16, fp16 or fp64. The only input that gets a gradient.
        u_plus, u_minus: ``[B, ...]`` no-grad evaluations at ``s_plus`` and ``s_minus`` (same
            dtype as ``u``). Ignored entirely on rows with ``s == r`` (they may hold anything there,
            NaN and Inf included).
        v: ``[B, ...]`` the (CFG) velocity target ``v_g`` (same dtype as ``u``).
        s, r, s_plus, s_minus: ``[B]`` per-sample times, float32 or float64. ``s_plus != s_minus``
            is required on every row with ``s != r``; checking it reads the times (on CUDA one
            host sync per call).
        c: finite ``> 0``, the adaptive-weight constant (``d`` or ``1e-5·d`` in the paper).
    Returns:
        ``(loss, mse)``, each ``[B]`` in fp32 (fp64 for fp64 inputs) — the loss is a reduction, so
        it is not rounded to a 16-bit input dtype. Arithmetic in fp32 (fp64); non-contiguous
        inputs are read through a contiguous copy.
    Gradients flow to ``u`` only, from both outputs: ``∂loss/∂u = 2Δ/(‖Δ‖²+c)``,
    ``∂mse/∂u = 2Δ/d`` (the target ``û`` and the loss denominator are stop-gradient); to every
    order, the stop-gradients held constant (docs/design.md §3.4). An empty batch (``B = 0``) gives
    empty ``loss`` and ``mse``; ``d = 0`` is rejected.
    """
    _check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c)
    if u.shape[0] == 0:  # nothing for a kernel to do
        return reference.meanflow_fd_loss(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c)
    if u.dtype in _SAVE_DELTA_DTYPES and u.requires_grad and torch.is_grad_enabled():
        # fp32/fp64: keep Δ (exact in the input dtype) so that the backward reads one tensor, not four
        loss, mse, _ = _PrivateDelta.apply(u, u_plus, u_minus, v, s, r, s_plus, s_minus, float(c))
        return loss, mse
    return torch.ops.tmd.meanflow_fd_loss(u, u_plus, u_minus, v, s, r, s_plus, s_minus, float(c))


# Input dtypes whose Δ the forward keeps for the backward: there Δ in the opmath dtype costs what one input
# costs, and the backward reads Δ once (2 passes over memory) instead of u, u_plus, u_minus, v (5 passes). For
# 16-bit inputs an fp32 Δ would cost as much as it saves, so their backward recomputes Δ from the inputs.
_SAVE_DELTA_DTYPES = (torch.float32, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("tmd::meanflow_fd_loss")
def _(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c):
    loss = u.new_empty((u.shape[0],), dtype=_acc(u.dtype))
    return loss, torch.empty_like(loss)


@torch.library.register_fake("tmd::meanflow_fd_loss_delta")
def _(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c):
    loss = u.new_empty((u.shape[0],), dtype=_acc(u.dtype))
    return loss, torch.empty_like(loss), u.new_empty(u.shape, dtype=_acc(u.dtype))


@torch.library.register_fake("tmd::meanflow_fd_loss_delta_backward")
def _(grad_loss, grad_mse, delta, mse, c):
    return torch.empty_like(delta, memory_format=torch.contiguous_format)


@torch.library.register_fake("tmd::meanflow_fd_loss_delta_backward_")
def _(grad_loss, grad_mse, delta, mse, c):
    return None


@torch.library.register_fake("tmd::meanflow_fd_loss_backward")
def _(grad_loss, grad_mse, u, u_plus, u_minus, v, s, r, s_plus, s_minus, mse, c):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _grad_u(ctx, kernel, saved_inputs, grad_loss, grad_mse):
    """The gradient w.r.t. u from ``kernel()`` (a backward op); when the backward is recorded
    (``create_graph=True``) it carries the reference's VJP graph, so it is differentiable (§3.4)."""
    u, *rest = saved_inputs
    if higher_order.recording():
        rest = tuple(t.detach() for t in rest)
        (grad_u,) = higher_order.kernel_grads(
            kernel, lambda u_: reference.meanflow_fd_loss(u_, *rest, ctx.c), (u,), (grad_loss, grad_mse))
    else:
        (grad_u,) = kernel()
    return grad_u, None, None, None, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    ctx.c = inputs[8]
    ctx.save_for_backward(*inputs[:8], output[1])


def _backward(ctx, grad_loss, grad_mse):
    *inputs, mse = ctx.saved_tensors

    def kernel():
        return (torch.ops.tmd.meanflow_fd_loss_backward(grad_loss, grad_mse, *inputs, mse, ctx.c),)

    return _grad_u(ctx, kernel, inputs, grad_loss, grad_mse)


torch.library.register_autograd("tmd::meanflow_fd_loss", _backward, setup_context=_setup_context)


def _setup_context_delta(ctx, inputs, output):
    ctx.c = inputs[8]
    # Δ is an output for the backward's sake only: non-differentiable, and no zero gradient of u's size is
    # materialised for it on every backward (a 6 MB fill at 1x1024x1536 fp32, 0.15 ms); the [B] gradients
    # of loss and mse are filled in _delta_backward when only one of them is used.
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.u_dtype = inputs[0].dtype
    ctx.save_for_backward(*inputs[:8], output[1], output[2])


def _backward_delta(ctx, grad_loss, grad_mse, _grad_delta):
    # The op's caller holds Δ (an output): never written over.
    return _delta_backward(ctx, grad_loss, grad_mse, may_overwrite=False)


def _delta_backward(ctx, grad_loss, grad_mse, may_overwrite: bool):
    """grad_u from the saved Δ (``ctx.saved_tensors`` = the 8 inputs, mse, Δ). With ``may_overwrite`` (Δ is
    private to the caller) and Δ dead after this backward, grad_u is written over Δ, as a compiled graph
    reuses its saved buffer: no u-sized allocation, each line read and written back while cached."""
    *inputs, mse, delta = ctx.saved_tensors
    if grad_loss is None and grad_mse is None:
        return (None,) * 9
    grad_loss = torch.zeros_like(mse) if grad_loss is None else grad_loss
    grad_mse = torch.zeros_like(mse) if grad_mse is None else grad_mse

    def kernel():
        return (torch.ops.tmd.meanflow_fd_loss_delta_backward(grad_loss, grad_mse, delta, mse, ctx.c)
                .to(ctx.u_dtype),)

    # _eager first: dynamo (tracing this backward) must not reach the graph-task query
    if (may_overwrite and _eager(delta) and not higher_order.recording() and _last_use_of_saved_tensors()
            and delta.dtype == ctx.u_dtype):
        torch.ops.tmd.meanflow_fd_loss_delta_backward_(grad_loss, grad_mse, delta, mse, ctx.c)
        return (delta,) + (None,) * 8
    return _grad_u(ctx, kernel, inputs, grad_loss, grad_mse)


def _eager(t: torch.Tensor) -> bool:
    """A plain tensor outside any tracing (a traced backward must not mutate what it saved: AOTAutograd
    traces the backward in a graph task of its own, which keeps nothing)."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None)


def _last_use_of_saved_tensors() -> bool:
    """Whether the running backward frees the graph's saved tensors after it (no ``retain_graph``, no
    ``create_graph``). False outside a backward (e.g. while a graph is traced for ``torch.compile``)."""
    return not torch._C._autograd._get_current_graph_task_keep_graph()


class _PrivateDelta(torch.autograd.Function):
    """The public function's fp32/fp64 path: ``tmd::meanflow_fd_loss_delta`` called where Δ never reaches
    the caller, so the backward may write grad_u over it (``_delta_backward(may_overwrite=True)``)."""

    @staticmethod
    def forward(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c):
        return torch.ops.tmd.meanflow_fd_loss_delta(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c)

    setup_context = staticmethod(_setup_context_delta)

    @staticmethod
    def backward(ctx, grad_loss, grad_mse, _grad_delta):
        return _delta_backward(ctx, grad_loss, grad_mse, may_overwrite=True)


torch.library.register_autograd("tmd::meanflow_fd_loss_delta", _backward_delta, setup_context=_setup_context_delta)
