"""Samplers, deterministic given a ``torch.Generator``.

* :func:`sample_teacher` — flow-matching Euler with timestep shift and CFG (the 100-NFE teacher).
* :func:`sample_tmd` — Algorithm 1 of docs/design.md: M outer steps, each one backbone pass and an
  N-step inner flow of the head from fresh noise ``y1``.
* :func:`sample_few_step` — the plain few-step student (DMD2-v baseline, a teacher-architecture
  model), deterministic stepping Eq. 18: ``x_{t'} = (1 - t'/t)·x̂ + (t'/t)·x_t``,
  ``x̂ = x_t - t·v(x_t, t)``.

Every sampler returns a :class:`Sample` ``(x0, nfe)`` with ``nfe`` measured by
:func:`~tmd_train.sampling.nfe.count_blocks`. Times are flow times in ``[0, 1]``; grids are float64.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from diffusers import WanTransformer3DModel

from ..models.teacher import teacher_velocity
from ..schedules import shifted_grid
from .inputs import batch_time, check_text, initial_noise, randn
from .nfe import count_blocks

if TYPE_CHECKING:
    from ..models.student import TMDStudent


class Sample(NamedTuple):
    """A sampler's result: ``x0 [B, C, F, H, W]`` (float32 latents at t=0) and the measured
    effective NFE (transformer block evaluations per sample / L)."""

    x0: torch.Tensor
    nfe: float


@torch.no_grad()
def sample_teacher(teacher: WanTransformer3DModel, text: torch.Tensor, *,
                   negative_text: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
                   steps: int = 50, cfg: float = 5.0, shift: float = 5.0, t_max: float = 1.0) -> Sample:
    """Teacher sampling: flow-matching Euler on the shifted grid ``t_i = t_max·shift(i/steps, γ)``,
    ``x ← x - (t_i - t_{i-1})·v_cfg(x, t_i)`` from ``x = noise`` at ``t_max`` down to 0.

    CFG: ``v_cfg = v(∅) + cfg·(v(text) - v(∅))`` with ``∅`` the negative-prompt embedding; it runs
    as one ``2B`` pass when ``text`` and ``negative_text`` have the same length (2 NFE per step).
    ``cfg == 1`` skips the unconditional pass (1 NFE per step).

    Args:
        teacher: the Wan transformer.
        text: ``[B, L_text, text_dim]`` prompt embeddings.
        negative_text: ``[1 or B, L_neg, text_dim]`` negative-prompt embedding (needed if cfg != 1).
        noise / shape: the start ``x`` at ``t_max`` ``[B, C, F, H, W]``, or its shape to draw it
            from ``generator`` (exactly one of the two).
        steps: Euler steps (default 50: with cfg 100 NFE).
        cfg: guidance scale (default 5).
        shift: timestep shift γ of the grid (default 5.0, Wan2.1's T2V sampling shift).
        t_max: the first time (1.0 for the teacher).
    Returns:
        ``Sample(x0, nfe)``.
    """
    device = teacher.patch_embedding.weight.device
    x = initial_noise(noise, shape, generator, device)
    B = x.shape[0]
    check_text(text, B)
    guided = cfg != 1.0
    if guided:
        if negative_text is None:
            raise ValueError("cfg != 1 needs negative_text (the negative-prompt embedding)")
        if negative_text.dim() != 3 or negative_text.shape[0] not in (1, B):
            raise ValueError(f"negative_text must be [1 or B={B}, L, text_dim], got "
                             f"{tuple(negative_text.shape)}")
        negative_text = negative_text.to(device).expand(B, -1, -1)
    text = text.to(device)
    grid = shifted_grid(steps, shift, t_max, device=device)
    with count_blocks(teacher.blocks, B) as counter:
        for i in range(steps, 0, -1):
            t = batch_time(grid[i], B)
            if not guided:
                v = teacher_velocity(teacher, x, t, text)
            elif negative_text.shape[1] == text.shape[1]:
                v_c, v_u = teacher_velocity(teacher, torch.cat([x, x]), torch.cat([t, t]),
                                            torch.cat([text, negative_text])).chunk(2)
                v = v_u + cfg * (v_c - v_u)
            else:
                v_c = teacher_velocity(teacher, x, t, text)
                v_u = teacher_velocity(teacher, x, t, negative_text)
                v = v_u + cfg * (v_c - v_u)
            x = x - float(grid[i] - grid[i - 1]) * v
    return Sample(x, counter.nfe)


@torch.no_grad()
def sample_tmd(student: TMDStudent, text: torch.Tensor, *, noise: torch.Tensor | None = None,
               shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
               M: int = 2, N: int = 2, outer_shift: float = 10.0, inner_shift: float = 10.0,
               t_max: float = 0.999, s_max: float = 0.999) -> Sample:
    """TMD sampling, Algorithm 1 (docs/design.md §1.7)::

        x = noise                                   # at t_M = t_max
        for i = M..1:  m = backbone(x, t_i);  y1 ~ N(0, I) (fresh);  y = y1
                       for j = N..1:  y = y - (s_j - s_{j-1})·(y1 - head(y, s_j, s_{j-1}; m))
                       x = x - (t_i - t_{i-1})·y

    Outer grid ``t_i = t_max·shift(i/M, outer_shift)``, inner grid ``s_j = s_max·shift(j/N,
    inner_shift)``. Draw order from ``generator``: the start noise (unless given), then ``y1``
    for every outer step in order.

    Args:
        student: the :class:`~tmd_train.models.TMDStudent`.
        text: ``[B, L_text, text_dim]`` prompt embeddings (no CFG: the student is distilled).
        noise / shape: start ``x`` ``[B, C, F, H, W]`` or its shape (exactly one).
        M, N: outer and inner steps.
    Returns:
        ``Sample(x0, nfe)`` with ``nfe = M·(1 + (N-1)·H/L)`` as measured.
    """
    device = student.device
    x = initial_noise(noise, shape, generator, device)
    B = x.shape[0]
    check_text(text, B)
    text = text.to(device)
    t_grid = shifted_grid(M, outer_shift, t_max, device=device)
    s_grid = shifted_grid(N, inner_shift, s_max, device=device)
    with count_blocks(student.transformer.blocks, B) as counter:
        for i in range(M, 0, -1):
            feats = student.backbone(x, batch_time(t_grid[i], B), text)
            y1 = randn(tuple(x.shape), generator, device)
            y = student.inner_flow(feats, y1, s_grid)
            x = x - float(t_grid[i] - t_grid[i - 1]) * y
    return Sample(x, counter.nfe)


@torch.no_grad()
def sample_few_step(model: WanTransformer3DModel, text: torch.Tensor, *, noise: torch.Tensor | None = None,
                    shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
                    steps: int = 4, shift: float = 10.0, t_max: float = 0.999) -> Sample:
    """Plain few-step student (DMD2-v baseline), deterministic conditional-flow stepping (Eq. 18)::

        x̂ = x_t - t·v(x_t, t);   x_{t'} = (1 - t'/t)·x̂ + (t'/t)·x_t

    on the grid ``t_i = t_max·shift(i/steps, shift)`` from ``x = noise`` at ``t_max``; the last
    step (``t' = 0``) returns ``x̂``.

    Args:
        model: a teacher-architecture velocity model.
        text: ``[B, L_text, text_dim]``.
        noise / shape: start ``x`` or its shape (exactly one).
        steps: number of student steps (= NFE).
    Returns:
        ``Sample(x0, nfe)``.
    """
    device = model.patch_embedding.weight.device
    x = initial_noise(noise, shape, generator, device)
    B = x.shape[0]
    check_text(text, B)
    text = text.to(device)
    grid = shifted_grid(steps, shift, t_max, device=device)
    with count_blocks(model.blocks, B) as counter:
        for i in range(steps, 0, -1):
            t, t_next = float(grid[i]), float(grid[i - 1])
            x_hat = x - t * teacher_velocity(model, x, batch_time(grid[i], B), text)
            x = (1.0 - t_next / t) * x_hat + (t_next / t) * x
    return Sample(x, counter.nfe)
