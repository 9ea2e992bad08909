"""`gated_fusion` and `gated_fusion_linear`: the gated residual fusion of the backbone feature ``m``
with a projected feature ``z`` (DESIGN.md §3),

    out = m + λ ⊙ (z - m),   λ = sigmoid(alpha) · gate[:, None, :],

with ``z`` given (`gated_fusion`) or ``z = x·weightᵀ + bias`` (`gated_fusion_linear`, whose GEMM
accumulates in fp32 and whose ``z`` is never rounded to the input dtype). With ``gate = 0`` both
return ``m`` exactly: the identity at initialisation."""
from __future__ import annotations

import torch

from .. import _checks


def _check_alpha(alpha: torch.Tensor) -> None:
    if alpha.dim() != 0:
        raise ValueError(f"alpha must be a 0-d tensor, got shape {tuple(alpha.shape)}")


def _check_fusion(m, z, gate, alpha) -> None:
    for t, n in ((m, "m"), (z, "z"), (gate, "gate"), (alpha, "alpha")):
        _checks.tensor(t, n)
    for t, n in ((z, "z"), (gate, "gate"), (alpha, "alpha")):
        _checks.same_dtype(t, n, m, "m")
    for t, n in ((z, "z"), (gate, "gate"), (alpha, "alpha")):
        _checks.same_device(t, n, m, "m")
    _checks.dim(m, 3, "m", "[B, T, D]")
    _checks.nonempty(m, "m")
    _checks.shape(z, m.shape, "z")
    _checks.shape(gate, (m.shape[0], m.shape[2]), "gate")
    _check_alpha(alpha)


def _check_linear(m, x, weight, bias, gate, alpha) -> None:
    named = [(m, "m"), (x, "x"), (weight, "weight")] + ([(bias, "bias")] if bias is not None else [])
    named += [(gate, "gate"), (alpha, "alpha")]
    for t, n in named:
        _checks.tensor(t, n)
    for t, n in named[1:]:
        _checks.same_dtype(t, n, m, "m")
    for t, n in named[1:]:
        _checks.same_device(t, n, m, "m")
    _checks.dim(m, 3, "m", "[B, T, D]")
    _checks.dim(x, 3, "x", "[B, T, K]")
    _checks.dim(weight, 2, "weight", "[D, K]")
    _checks.nonempty(m, "m")
    _checks.nonempty(x, "x")
    b, t, d = m.shape
    k = x.shape[2]
    _checks.shape(x, (b, t, k), "x")
    _checks.shape(weight, (d, k), "weight")
    if bias is not None:
        _checks.shape(bias, (d,), "bias")
    _checks.shape(gate, (b, d), "gate")
    _check_alpha(alpha)


def gated_fusion(m: torch.Tensor, z: torch.Tensor, gate: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``m + λ⊙(z - m)`` with ``λ = sigmoid(alpha)·gate[:, None, :]``.

    Args:
        m, z: ``[B, T, D]`` (backbone feature, projected feature), one dtype among fp32, bf16,
            fp16, fp64. Non-contiguous inputs are accepted (read through a contiguous copy).
        gate: ``[B, D]`` per-sample, per-channel gate.
        alpha: 0-d learnt gate logit.
    Returns:
        ``[B, T, D]`` in the input dtype; arithmetic in fp32 (fp64 for fp64 inputs).
    Gradients flow to ``m``, ``z``, ``gate`` and ``alpha`` (those of gate and alpha are summed over
    the tokens deterministically).
    """
    _check_fusion(m, z, gate, alpha)
    return torch.ops.tmd.gated_fusion(m, z, gate, alpha)


def gated_fusion_linear(m: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        gate: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``gated_fusion(m, x·weightᵀ + bias, gate, alpha)`` without materialising ``z`` in the input
    dtype (on sm_90a without materialising it at all: the fusion is the GEMM's epilogue).

    Args:
        m: ``[B, T, D]`` backbone feature.
        x: ``[B, T, K]`` input of the projection.
        weight: ``[D, K]``; bias: ``[D]`` or ``None``.
        gate: ``[B, D]``; alpha: 0-d. All one dtype among fp32, bf16, fp16, fp64, on one device.
    Returns:
        ``[B, T, D]`` in the input dtype. The GEMM accumulates in fp32 (fp64 for fp64).
    Gradients flow to ``m``, ``x``, ``weight``, ``bias``, ``gate`` and ``alpha``.
    """
    _check_linear(m, x, weight, bias, gate, alpha)
    return torch.ops.tmd.gated_fusion_linear(m, x, weight, bias, gate, alpha)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("tmd::gated_fusion")
def _(m, z, gate, alpha):
    return _contig(m)


@torch.library.register_fake("tmd::gated_fusion_backward")
def _(grad_out, m, z, gate, alpha):
    return _contig(m), _contig(m), _contig(gate), torch.empty_like(alpha)


@torch.library.register_fake("tmd::gated_fusion_linear")
def _(m, x, weight, bias, gate, alpha):
    return _contig(m)


@torch.library.register_fake("tmd::gated_fusion_linear_backward")
def _(grad_out, m, x, weight, bias, gate, alpha):
    return (_contig(m), _contig(x), _contig(weight), m.new_empty((m.shape[2],)), _contig(gate),
            torch.empty_like(alpha))


def _fusion_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fusion_backward(ctx, grad_out):
    m, z, gate, alpha = ctx.saved_tensors
    return torch.ops.tmd.gated_fusion_backward(grad_out, m, z, gate, alpha)


def _linear_setup_context(ctx, inputs, output):
    m, x, weight, bias, gate, alpha = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(m, x, weight, bias, gate, alpha)


def _linear_backward(ctx, grad_out):
    m, x, weight, bias, gate, alpha = ctx.saved_tensors
    grads = torch.ops.tmd.gated_fusion_linear_backward(grad_out, m, x, weight, bias, gate, alpha)
    grad_m, grad_x, grad_weight, grad_bias, grad_gate, grad_alpha = grads
    return grad_m, grad_x, grad_weight, grad_bias if ctx.has_bias else None, grad_gate, grad_alpha


torch.library.register_autograd("tmd::gated_fusion", _fusion_backward, setup_context=_fusion_setup_context)
torch.library.register_autograd("tmd::gated_fusion_linear", _linear_backward,
                                setup_context=_linear_setup_context)
