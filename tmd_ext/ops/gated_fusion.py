"""`gated_fusion`: the gated residual fusion of the backbone feature ``m`` with a projected
feature ``z`` (docs/design.md §3.2),

    out = m + λ ⊙ (z - m),   λ = sigmoid(alpha) · gate[:, None, :].

With ``gate = 0`` it returns ``m`` exactly: the identity at initialisation. The variant that also
computes ``z = x·weightᵀ + bias`` is :mod:`tmd_ext.ops.gated_fusion_linear`."""
from __future__ import annotations

import torch

from .. import reference
from . import checks, higher_order


def _check(m, z, gate, alpha) -> None:
    for t, n in ((m, "m"), (z, "z"), (gate, "gate"), (alpha, "alpha")):
        checks.tensor(t, n)
    for t, n in ((z, "z"), (gate, "gate"), (alpha, "alpha")):
        checks.same_dtype(t, n, m, "m")
    for t, n in ((z, "z"), (gate, "gate"), (alpha, "alpha")):
        checks.same_device(t, n, m, "m")
    checks.dim(m, 3, "m", "[B, T, D]")
    checks.shape(z, m.shape, "z")
    checks.shape(gate, (m.shape[0], m.shape[2]), "gate")
    checks.zero_dim(alpha, "alpha")


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
    the tokens deterministically), to every order (docs/design.md §3.4). Empty ``m`` (``B``, ``T``
    or ``D`` zero) gives the reference's result: an empty output, zero gradients where the sums over
    tokens are empty.
    """
    _check(m, z, gate, alpha)
    if m.numel() == 0:  # nothing for a kernel to do
        return reference.gated_fusion(m, z, gate, alpha)
    return torch.ops.tmd.gated_fusion(m, z, gate, alpha)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("tmd::gated_fusion")
def _(m, z, gate, alpha):
    return _contig(m)


@torch.library.register_fake("tmd::gated_fusion_backward")
def _(grad_out, m, z, gate, alpha):
    return _contig(m), _contig(m), _contig(gate), torch.empty_like(alpha)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    m, z, gate, alpha = ctx.saved_tensors

    def kernel():
        return torch.ops.tmd.gated_fusion_backward(grad_out, m, z, gate, alpha)

    if higher_order.recording():  # create_graph=True: differentiable gradients (§3.4)
        return higher_order.kernel_grads(kernel, reference.gated_fusion, (m, z, gate, alpha), grad_out)
    return kernel()


torch.library.register_autograd("tmd::gated_fusion", _backward, setup_context=_setup_context)
