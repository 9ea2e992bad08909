"""Low-frequency time embeddings of the flow head (docs/design.md §2.5).

Wan embeds time as sinusoids of ``1000·t`` (up to 1000 rad per unit of t). Along such an input a
central difference at δ = 5e-3 is useless, so the head's extra embeddings of ``s`` and ``s - r``
(and the fusion layer's embedding of ``s``) use sinusoids of the time itself, with frequencies
geometrically spaced in ``[min_freq, max_freq]`` rad per unit and ``max_freq·δ ≤ 0.05``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SmoothTimeEmbedding(nn.Module):
    """``[B]`` time -> ``[B, dim]``: sinusoids of the time itself -> Linear-SiLU-Linear.

    Args:
        dim: output width (the transformer's hidden size).
        num_freqs: number of frequencies K; the features are ``[sin(ω_k·τ), cos(ω_k·τ)]`` (2K).
        min_freq, max_freq: range of ``ω_k`` in rad per unit of time (geometric spacing).
        zero_init: zero the last Linear (weight and bias), so the embedding starts as exactly 0
            (used for the head's added embeddings of ``s`` and ``s - r``).
    """

    def __init__(self, dim: int, num_freqs: int = 32, min_freq: float = 0.1, max_freq: float = 4.0,
                 zero_init: bool = True) -> None:
        super().__init__()
        if num_freqs < 1:
            raise ValueError(f"num_freqs must be >= 1, got {num_freqs}")
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"need 0 < min_freq <= max_freq, got {min_freq}, {max_freq}")
        if num_freqs == 1:
            self.freqs: tuple[float, ...] = (float(max_freq),)
        else:
            step = (math.log(max_freq) - math.log(min_freq)) / (num_freqs - 1)
            self.freqs = tuple(math.exp(math.log(min_freq) + k * step) for k in range(num_freqs))
        self._freqs_on: dict[torch.device, torch.Tensor] = {}  # float64 copies per device
        self.linear_1 = nn.Linear(2 * num_freqs, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)
        if zero_init:
            nn.init.zeros_(self.linear_2.weight)
            nn.init.zeros_(self.linear_2.bias)

    def features(self, tau: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> ``[B, 2K]`` float64 sinusoidal features. The frequencies are plain floats,
        not a buffer, so casting the module to bf16 cannot round them; their float64 copy on each
        device is made once (no host-to-device copy per call, so the head can be captured in a
        CUDA graph)."""
        freqs = self._freqs_on.get(tau.device)
        if freqs is None:
            freqs = torch.tensor(self.freqs, dtype=torch.float64, device=tau.device)
            self._freqs_on[tau.device] = freqs
        arg = tau.double()[:, None] * freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        """``tau [B]`` (flow time, not ``1000·t``) -> ``[B, dim]`` in the weights' dtype."""
        if tau.dim() != 1:
            raise ValueError(f"tau must be a [B] tensor of times, got shape {tuple(tau.shape)}")
        x = self.features(tau).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(x)))
