"""`gated_fusion_linear`: :mod:`tmd_ext.ops.gated_fusion` with the projection fused in
(docs/design.md §3.2, §3.6),

    out = m + λ ⊙ (z - m),   z = x·weightᵀ + bias + residual,   λ = sigmoid(alpha) · gate[:, None, :],

whose GEMM accumulates in fp32 and whose ``z`` is never rounded to the input dtype (on sm_90a
the fusion, residual included, is the epilogue of a CUTLASS GEMM). With ``gate = 0`` it returns
``m`` exactly."""
from __future__ import annotations

import torch

from .. import reference
from . import checks, higher_order


def _check(m, x, weight, bias, gate, alpha, residual) -> None:
    named = [(m, "m"), (x, "x"), (weight, "weight")] + ([(bias, "bias")] if bias is not None else [])
    named += [(gate, "gate"), (alpha, "alpha")] + ([(residual, "residual")] if residual is not None else [])
    for t, n in named:
        checks.tensor(t, n)
    for t, n in named[1:]:
        checks.same_dtype(t, n, m, "m")
    for t, n in named[1:]:
        checks.same_device(t, n, m, "m")
    checks.dim(m, 3, "m", "[B, T, D]")
    checks.dim(x, 3, "x", "[B, T, K]")
    checks.dim(weight, 2, "weight", "[D, K]")
    b, t, d = m.shape
    k = x.shape[2]
    checks.shape(x, (b, t, k), "x")
    checks.shape(weight, (d, k), "weight")
    if bias is not None:
        checks.shape(bias, (d,), "bias")
    checks.shape(gate, (b, d), "gate")
    checks.zero_dim(alpha, "alpha")
    if residual is not None:
        checks.shape(residual, (b, t, d), "residual")


def gated_fusion_linear(m: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        gate: torch.Tensor, alpha: torch.Tensor,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """``gated_fusion(m, x·weightᵀ + bias + residual, gate, alpha)`` without materialising ``z`` in
    the input dtype (on sm_90a without materialising it at all: the fusion is the GEMM's epilogue).

    Args:
        m: ``[B, T, D]`` backbone feature.
        x: ``[B, T, K]`` input of the projection.
        weight: ``[D, K]``; bias: ``[D]`` or ``None``.
        gate: ``[B, D]``; alpha: 0-d.
        residual: ``[B, T, D]`` added to ``z`` before the fusion (a residual branch ``e + Linear(·)``,
            as in :class:`tmd_train.models.fusion.GatedFusion`), or ``None``.
        All one dtype among fp32, bf16, fp16, fp64, on one device.
    Returns:
        ``[B, T, D]`` in the input dtype. The GEMM accumulates in fp32 (fp64 for fp64).
    Gradients flow to ``m``, ``x``, ``weight``, ``bias``, ``gate``, ``alpha`` and ``residual``, to every order
    (docs/design.md §3.4). Empty ``m`` or ``x`` (``B``, ``T``, ``D`` or ``K`` zero) gives the
    reference's result; with ``K = 0`` only, ``z = bias`` (zero without bias) and the output is not empty.
    """
    _check(m, x, weight, bias, gate, alpha, residual)
    if m.numel() == 0 or x.numel() == 0:  # nothing for a kernel to do (K = 0: z = bias + residual)
        return reference.gated_fusion_linear(m, x, weight, bias, gate, alpha, residual)
    return torch.ops.tmd.gated_fusion_linear(m, x, weight, bias, gate, alpha, residual)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("tmd::gated_fusion_linear")
def _(m, x, weight, bias, gate, alpha, residual=None):
    return _contig(m)


@torch.library.register_fake("tmd::gated_fusion_linear_backward")
def _(grad_out, m, x, weight, bias, gate, alpha, residual=None):
    grad_residual = _contig(m) if residual is not None else m.new_empty((0,))
    return (_contig(m), _contig(x), _contig(weight), m.new_empty((m.shape[2],)), _contig(gate),
            torch.empty_like(alpha), grad_residual)


def _setup_context(ctx, inputs, output):
    m, x, weight, bias, gate, alpha, residual = inputs
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(m, x, weight, bias, gate, alpha, residual)


def _backward(ctx, grad_out):
    m, x, weight, bias, gate, alpha, residual = ctx.saved_tensors
    # The kernel returns all seven gradients; keep those of the tensors that were given.
    keep = [True, True, True, ctx.has_bias, True, True, ctx.has_residual]

    def kernel():
        grads = torch.ops.tmd.gated_fusion_linear_backward(grad_out, m, x, weight, bias, gate, alpha, residual)
        return tuple(g for g, k in zip(grads, keep, strict=True) if k)

    if higher_order.recording():  # create_graph=True: differentiable gradients (§3.4)
        full = (m, x, weight, bias, gate, alpha, residual)
        primals = tuple(t for t, k in zip(full, keep, strict=True) if k)

        def ref(*given):
            it = iter(given)
            return reference.gated_fusion_linear(*(next(it) if k else None for k in keep))

        grads = higher_order.kernel_grads(kernel, ref, primals, grad_out)
    else:
        grads = kernel()
    it = iter(grads)
    return tuple(next(it) if k else None for k in keep)


torch.library.register_autograd("tmd::gated_fusion_linear", _backward, setup_context=_setup_context)
