"""Pure-PyTorch references of the `tmd` ops: the ground truth of the tests and the "eager"
provider of the benchmarks. Same contracts as the ops (docs/design.md §3.2–§3.3): arithmetic in fp32 (fp64
for fp64 inputs), output in the input dtype."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against `like`."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def flow_step(y, head_out, y1, s, r):
    """``y - (s-r)·(y1 - head_out)`` with per-sample ``s, r`` [B]."""
    acc = _acc(y.dtype)
    c = _per_sample((s.double() - r.double()).to(acc), y)
    return (y.to(acc) - c * (y1.to(acc) - head_out.to(acc))).to(y.dtype)


def inner_flow(head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], y1: torch.Tensor,
               s_grid: torch.Tensor) -> torch.Tensor:
    """The inner flow that :class:`tmd_ext.FlowHeadLoop` runs: from ``y = y1``, for ``j = N..1``::

        y <- y - (s_j - s_{j-1})·(y1 - head(y, s_j, s_{j-1}))

    each step by :func:`flow_step`. ``y1 [B, ...]``; ``s_grid`` ``[N+1]`` (shared) or ``[B, N+1]``
    ascending inner times (``s_grid[..., 0]`` the end, ``s_grid[..., N]`` the start); ``head``
    receives ``y`` in the dtype of ``y1`` and ``[B]`` times in the grid's dtype and returns a
    ``[B, ...]`` tensor. Returns ``y0`` in the dtype of ``y1``."""
    batch = y1.shape[0]
    grid = s_grid[None, :].expand(batch, -1) if s_grid.dim() == 1 else s_grid
    y = y1
    for j in range(grid.shape[1] - 1, 0, -1):
        s, r = grid[:, j].contiguous(), grid[:, j - 1].contiguous()
        y = flow_step(y, head(y, s, r), y1, s, r)
    return y


def adaln_modulate(x, shift, scale, eps: float = 1e-6):
    """``LayerNorm_noaffine(x)·(1 + scale[:, None]) + shift[:, None]``; x [B,T,D], shift/scale [B,D]."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    xhat = (xf - mean) * torch.rsqrt(var + eps)
    return (xhat * (1 + scale.to(acc)[:, None, :]) + shift.to(acc)[:, None, :]).to(x.dtype)


def gated_fusion(m, z, gate, alpha):
    """``m + λ⊙(z - m)``, ``λ = sigmoid(alpha)·gate[:, None, :]``; m, z [B,T,D], gate [B,D], alpha 0-d."""
    acc = _acc(m.dtype)
    lam = torch.sigmoid(alpha.to(acc)) * gate.to(acc)[:, None, :]
    mf = m.to(acc)
    return (mf + lam * (z.to(acc) - mf)).to(m.dtype)


def gated_fusion_linear(m, x, weight, bias, gate, alpha, residual=None):
    """``gated_fusion(m, x·weightᵀ + bias + residual, gate, alpha)``; x [B,T,K], weight [D,K], bias [D]
    or None, residual [B,T,D] or None. The GEMM accumulates in fp32 (fp64 for fp64) and ``z`` is not
    rounded to the input dtype."""
    acc = _acc(m.dtype)
    z = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    if residual is not None:
        z = z + residual.to(acc)
    lam = torch.sigmoid(alpha.to(acc)) * gate.to(acc)[:, None, :]
    mf = m.to(acc)
    return (mf + lam * (z - mf)).to(m.dtype)


def meanflow_fd_loss(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c: float):
    """TM-MeanFlow loss with the finite-difference target; u, u_plus, u_minus, v [B, ...],
    s, r, s_plus, s_minus [B]. Returns ``(loss, mse)`` [B] in fp32 (fp64 for fp64 inputs)::

        û = v - (s-r)·(u_plus - u_minus)/(s_plus - s_minus)   (û = v where s == r)
        Δ = u - sg(û),  loss = ‖Δ‖²/sg(‖Δ‖² + c),  mse = ‖Δ‖²/d

    Rows with ``s == r`` select ``v`` with ``torch.where``, so NaN/Inf in their ``u_plus``,
    ``u_minus`` never reach the result. Differentiable w.r.t. ``u`` by autograd."""
    acc = _acc(u.dtype)
    fd = s.double() != r.double()
    ds = torch.where(fd, s_plus.double() - s_minus.double(), 1.0)
    du_ds = (u_plus.to(acc) - u_minus.to(acc)) / _per_sample(ds.to(acc), u)
    u_hat = v.to(acc) - _per_sample((s.double() - r.double()).to(acc), u) * du_ds
    u_hat = torch.where(_per_sample(fd, u), u_hat, v.to(acc))
    delta = u.to(acc) - u_hat.detach()
    delta_sq = delta.square().flatten(1).sum(1)
    d = math.prod(delta.shape[1:])
    return delta_sq / (delta_sq.detach() + c), delta_sq / d
