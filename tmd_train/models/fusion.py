"""Fusion layers of the flow head: merge the backbone tokens ``m`` with the patch-embedded inner
state ``e = PatchEmbed(y_s)`` (docs/design.md §2.2; paper App. A.1 / B.3).

Both take ``(m [B, N, D], e [B, N, D], s [B])`` and return the head's input tokens ``h [B, N, D]``.
"""
from __future__ import annotations

import torch
from torch import nn

import tmd_ext

from .time_embed import SmoothTimeEmbedding


class GatedFusion(nn.Module):
    """Gated fusion (our formula; the paper describes it only in words)::

        (shift, scale, g) = Linear(SiLU(temb_f(s)))        # zero-initialised Linear
        z = e + MLP(LN(e)·(1 + scale) + shift)             # AdaLN-modulated Linear-GELU-Linear
        λ = sigmoid(α)·g                                   # α learnable scalar, init 0
        h = m + λ ⊙ (z - m)

    ``temb_f`` is the fusion's own low-frequency embedding of ``s`` (:class:`SmoothTimeEmbedding`,
    ordinary init; the zero-initialised Linear after it already makes the layer start inert).
    At init ``g = 0``, so ``h = m`` exactly and the head reproduces the teacher's last blocks.

    ``LN(e)·(1+scale)+shift`` runs as ``tmd_ext.adaln_modulate``; the last MLP Linear, the residual
    ``e`` and the interpolation run as one ``tmd_ext.gated_fusion_linear(m, a, W₂, b₂, g, α,
    residual=e)`` (``a`` the GELU output): on sm_90a one GEMM whose epilogue adds ``b₂ + e`` and
    applies the fusion, so ``z`` never goes to memory (docs/design.md §3.2). Under an autocast to a
    narrower dtype than ``m`` (fp32 weights with bf16 autocast) that op would have to round ``m``
    and lose ``h = m`` at init, so there the Linear runs under autocast and the interpolation as
    ``tmd_ext.gated_fusion`` in the dtype of ``m``.

    Args:
        dim: hidden size D of the transformer.
        hidden_dim: width of the MLP (default D).
        eps: LayerNorm epsilon (Wan's 1e-6).
        time_num_freqs, time_min_freq, time_max_freq: the sinusoids of ``temb_f`` (see
            :class:`SmoothTimeEmbedding`).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, eps: float = 1e-6, *,
                 time_num_freqs: int = 32, time_min_freq: float = 0.1, time_max_freq: float = 4.0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or dim
        self.eps = eps
        self.time_embed = SmoothTimeEmbedding(dim, time_num_freqs, time_min_freq, time_max_freq,
                                              zero_init=False)
        self.act = nn.SiLU()
        self.modulation = nn.Linear(dim, 3 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden_dim, dim))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, m: torch.Tensor, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``m, e [B, N, D]``, ``s [B]`` -> ``h [B, N, D]`` (dtype of ``m``)."""
        shift, scale, gate = self.modulation(self.act(self.time_embed(s))).to(e.dtype).chunk(3, dim=-1)
        fc1, act, fc2 = self.mlp
        a = act(fc1(tmd_ext.adaln_modulate(e, shift, scale, self.eps)))
        dt = m.dtype
        if not self._fused_last_linear(m):
            z = e + fc2(a)
            return tmd_ext.gated_fusion(m, z.to(dt), gate.to(dt), self.alpha.to(dt))
        bias = fc2.bias.to(dt) if fc2.bias is not None else None
        return tmd_ext.gated_fusion_linear(m, a.to(dt), fc2.weight.to(dt), bias, gate.to(dt), self.alpha.to(dt),
                                           residual=e.to(dt))

    @staticmethod
    def _fused_last_linear(m: torch.Tensor) -> bool:
        """Whether the last Linear runs inside ``gated_fusion_linear``: always, except under an
        autocast whose dtype differs from that of ``m``."""
        dev = m.device.type
        return not torch.is_autocast_enabled(dev) or torch.get_autocast_dtype(dev) == m.dtype


class ConcatFusion(nn.Module):
    """Concat fusion (paper App. B.3): ``h = Linear([m, e])``, a ``2D -> D`` Linear initialised to
    the identity on the ``m`` coordinates, ``N(0, init_std²)`` on the ``e`` coordinates, zero bias.

    Not an exact identity at init: ``h = m + W_e·e`` with small random ``W_e``, so an untrained
    student with this fusion is only close to the teacher. ``s`` is accepted for the common
    fusion interface and not used (the paper's concat layer has no time input).
    """

    def __init__(self, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            nn.init.normal_(self.proj.weight[:, dim:], mean=0.0, std=init_std)
            self.proj.bias.zero_()

    def forward(self, m: torch.Tensor, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``m, e [B, N, D]``, ``s [B]`` (unused) -> ``h [B, N, D]``."""
        return self.proj(torch.cat([m, e.to(m.dtype)], dim=-1))
