"""What every sampler does with its inputs: the start noise, fresh noise draws that do not depend
on the model's device, per-sample times and the text check."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def initial_noise(noise: torch.Tensor | None, shape: Sequence[int] | None,
                  generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The start ``x [B, C, F, H, W]`` (float32, on ``device``) of a sampler: ``noise`` as given, or
    drawn with :func:`randn` from ``generator`` in ``shape`` (exactly one of the two)."""
    if (noise is None) == (shape is None):
        raise ValueError("pass exactly one of noise (the x at t_max) and shape ([B, C, F, H, W])")
    if noise is not None:
        if noise.dim() != 5:
            raise ValueError(f"noise must be [B, C, F, H, W], got shape {tuple(noise.shape)}")
        return noise.to(device=device, dtype=torch.float32)
    if len(shape) != 5:
        raise ValueError(f"shape must be [B, C, F, H, W], got {tuple(shape)}")
    return randn(tuple(shape), generator, device)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device (CPU without one), then
    moved to ``device``: the same seed gives the same noise whatever device the model is on."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def batch_time(value: torch.Tensor, batch: int) -> torch.Tensor:
    """0-d float64 time -> ``[B]`` (one flow time per sample)."""
    return value.reshape(1).expand(batch).contiguous()


def check_text(text: torch.Tensor, batch: int, name: str = "text") -> None:
    """Raise ValueError unless ``text`` is ``[B, L_text, text_dim]`` with ``B = batch``."""
    if text.dim() != 3 or text.shape[0] != batch:
        raise ValueError(f"{name} must be [B={batch}, L_text, text_dim], got {tuple(text.shape)}")
