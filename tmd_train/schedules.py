"""Time schedules: the timestep shift and the shifted step grids (docs/design.md §1.1).

All times are flow times in ``[0, 1]`` (t=0 data, t=1 noise). Grids are float64 (the paper keeps
time in FP64) and ascending: ``grid[0] = 0``, ``grid[n] = t_max``.
"""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor | float, gamma: float) -> torch.Tensor | float:
    """The timestep shift ``t' -> γ·t' / ((γ-1)·t' + 1)``.

    Maps ``[0, 1]`` onto itself monotonically, fixing 0 and 1; ``γ > 1`` pushes times towards
    the noise end. Works elementwise on tensors (any shape) and on Python floats.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return gamma * t / ((gamma - 1.0) * t + 1.0)


def shifted_grid(n: int, gamma: float, t_max: float = 1.0, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[n+1]`` ascending grid ``grid[i] = t_max · shift(i/n, γ)``: ``grid[0] = 0``, ``grid[n] = t_max``.

    Used for the outer student/teacher step grid ``t_0 < … < t_M`` (γ=10, ``t_max`` 0.999 for the
    student) and the inner flow-head grid ``s_0 < … < s_N`` (γ=10, ``s_max`` 0.999). Scaling by
    ``t_max`` (rather than clipping the shifted points) keeps the grid strictly increasing for any
    ``n`` and ``γ``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an int >= 1, got {n!r}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    u = torch.arange(n + 1, dtype=torch.float64) / n
    grid = t_max * shift_time(u, gamma)
    grid[0] = 0.0
    grid[n] = t_max
    return grid.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- per-sample draws
def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, …, 1]`` (broadcastable against ``like``) in the dtype of ``like``."""
    return t.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def uniform(n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """``[n]`` float64 U[0, 1) drawn on the generator's device, moved to ``device``."""
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).to(device)


def normal(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str,
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device, then cast/moved (so a seed
    gives the same noise whatever device the model is on)."""
    x = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)
