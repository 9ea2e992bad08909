"""Stage 2: DMD2-v with flow-head roll-out — the generator sample, the DMD (VSD) loss and the
fake-score loss (docs/design.md §1.5; arXiv:2601.09881). The GAN part lives in
:mod:`tmd_train.models.discriminator`.

Per sample (``x`` clean data, ``x1`` outer noise, ``t`` a student-grid time)::

    x_t = (1-t)·x + t·x1,   m = backbone(x_t, t, text)
    x̂ = x_t - t·InnerFlow(m; y1)            # gradients through all N inner steps
    τ = clip(shift(U, γ=5), 0.001, 0.999),  ε ~ N,  x̂_τ = (1-τ)·x̂ + τ·ε
    x0_real = x̂_τ - τ·v_cfg(x̂_τ, τ)          # teacher, CFG 5 with the negative prompt, no grad
    x0_fake = x̂_τ - τ·v_fake(x̂_τ, τ)         # fake score, no grad
    grad = (x0_fake - x0_real) / mean|x̂ - x0_real|   (per sample, nan_to_num)
    L_dmd = ½·mean((x̂ - sg(x̂ - grad))²)

Reduction: ``L_dmd`` is DMD2's ``0.5·F.mse_loss(x̂, sg(x̂ - grad), reduction="mean")`` — the mean
over every element of the batch — so ``dL/dx̂ = grad / x̂.numel()``.

The fake score (a trainable copy of the teacher, a ``WanTransformer3DModel``) is trained with
the flow-matching loss on ``sg(x̂)``: ``x_τ = (1-τ)·x̂ + τ·ε``, target ``ε - x̂``, MSE (mean) of
its velocity; ``τ`` from the same shifted distribution as the DMD time by default
(``fake_time="shifted"``), uniform in ``[tau_min, tau_max]`` with ``fake_time="uniform"``.

:func:`gan_inputs` noises data and x̂ at one τ (drawn like the DMD time) with one ε for the GAN.

Randomness: every draw comes from the ``generator`` argument, in a fixed order (τ, then ε).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel

import tmd_ext

from ..models.student import TMDStudent
from ..models.teacher import teacher_velocity
from ..schedules import normal, per_sample, shift_time, uniform

FAKE_TIMES = ("shifted", "uniform")


@dataclass(frozen=True)
class DMDConfig:
    """Options of the DMD and fake-score losses (defaults: the paper's recipe).

    Attributes:
        tau_shift: shift γ of the DMD noise time ``τ`` (5).
        tau_min, tau_max: clip range of ``τ`` ([0.001, 0.999]).
        cfg_scale: CFG scale of the teacher in ``x0_real`` (5; 1 disables CFG).
        fake_time: ``"shifted"`` (τ as in the DMD loss) or ``"uniform"`` (U[tau_min, tau_max]) for
            the fake-score loss.
    """

    tau_shift: float = 5.0
    tau_min: float = 0.001
    tau_max: float = 0.999
    cfg_scale: float = 5.0
    fake_time: str = "shifted"

    def __post_init__(self) -> None:
        if not self.tau_shift > 0:
            raise ValueError(f"tau_shift must be > 0, got {self.tau_shift!r}")
        if not 0 <= self.tau_min < self.tau_max <= 1:
            raise ValueError(f"tau_min must be in [0, tau_max) and tau_max <= 1, got {self.tau_min}, {self.tau_max}")
        if not self.cfg_scale > 0:
            raise ValueError(f"cfg_scale must be > 0, got {self.cfg_scale!r}")
        if self.fake_time not in FAKE_TIMES:
            raise ValueError(f"fake_time must be one of {FAKE_TIMES}, got {self.fake_time!r}")


def sample_dmd_time(batch: int, cfg: DMDConfig, generator: torch.Generator, device: torch.device,
                    shifted: bool = True) -> torch.Tensor:
    """``[B]`` float64 ``τ = clip(shift(U, tau_shift), tau_min, tau_max)`` (``shifted=False``:
    ``tau_min + (tau_max - tau_min)·U``)."""
    u = uniform(batch, generator, device)
    if shifted:
        return shift_time(u, cfg.tau_shift).clamp(cfg.tau_min, cfg.tau_max)
    return cfg.tau_min + (cfg.tau_max - cfg.tau_min) * u


def _noised(x: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1-t)·x + t·x1`` with per-sample ``t [B]``."""
    tt = per_sample(t, x)
    return (1 - tt) * x + tt * x1


def generator_sample(student: TMDStudent, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                     text: torch.Tensor, y1: torch.Tensor, s_grid: torch.Tensor,
                     checkpoint: bool = False, unroll: bool = True) -> torch.Tensor:
    """The TMD generator output ``x̂ = x_t - t·InnerFlow(backbone(x_t, t, text); y1)`` with
    ``x_t = (1-t)·x0 + t·x1``.

    Args:
        x0: ``[B, C, F, H, W]`` clean data; x1: the outer noise (same shape).
        t: ``[B]`` student-grid flow times.
        text: ``[B, L, D]`` text states.
        y1: ``[B, C, F, H, W]`` inner start noise.
        s_grid: ``[N+1]`` or ``[B, N+1]`` ascending inner grid (see :meth:`TMDStudent.inner_flow`).
        checkpoint: recompute each inner step in backward instead of storing it (``unroll`` only).
        unroll: differentiate through the backbone and ALL N inner steps (the paper's roll-out).
            ``False``: the inner steps ``s_N → … → s_1`` run without autograd (their result
            ``y_{s_1}`` is a constant) and only the LAST step ``s_1 → s_0`` carries gradient — to
            the head's parameters and, through ``m``, to the backbone (the cheap ablation: one
            differentiable head pass whatever N).
    Returns:
        ``x̂ [B, C, F, H, W]`` in the dtype of ``x0``.
    """
    x_t = _noised(x0, x1, t)
    feats = student.backbone(x_t, t, text)
    y1 = y1.to(x0.dtype)
    if unroll:
        y_hat = student.inner_flow(feats, y1, s_grid, grad=True, checkpoint=checkpoint)
    else:
        grid = s_grid if s_grid.dim() == 2 else s_grid[None, :].expand(y1.shape[0], -1)
        grid = grid.to(device=y1.device, dtype=torch.float64)
        y = y1
        if grid.shape[1] > 2:  # steps N..2 on the sub-grid s_1..s_N, without autograd
            y = student.inner_flow(feats, y1, grid[:, 1:], grad=False)
        s, r = grid[:, 1].contiguous(), grid[:, 0].contiguous()
        y_hat = tmd_ext.flow_step(y, student.head(y, s, r, feats).to(y.dtype), y1, s, r)
    return x_t - per_sample(t, x_t) * y_hat.to(x_t.dtype)


def generator_sample_plain(student: WanTransformer3DModel, x0: torch.Tensor, x1: torch.Tensor,
                           t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The DMD2-v baseline generator (a plain few-step Wan student): ``x̂ = x_t - t·v(x_t, t)``,
    ``x_t = (1-t)·x0 + t·x1``. Shapes as in :func:`generator_sample`; differentiable."""
    x_t = _noised(x0, x1, t)
    return x_t - per_sample(t, x_t) * teacher_velocity(student, x_t, t, text)


def _negative(negative_text: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[L, D]`` or ``[B, L, D]`` negative-prompt embedding -> ``[B, L, D]`` like ``text``."""
    if negative_text.dim() == 2:
        negative_text = negative_text.unsqueeze(0).expand(text.shape[0], -1, -1)
    if tuple(negative_text.shape) != tuple(text.shape):
        raise ValueError(f"negative_text must be [L, D] or [B, L, D] matching text {tuple(text.shape)}, "
                         f"got {tuple(negative_text.shape)}")
    return negative_text.to(text.dtype)


@torch.no_grad()
def cfg_velocity(teacher: WanTransformer3DModel, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 negative_text: torch.Tensor, scale: float) -> torch.Tensor:
    """``v_neg + scale·(v_text - v_neg)`` (no grad; one batched pass over ``2B`` rows;
    ``v_text`` alone when ``scale == 1``). Shapes: ``x [B, C, F, H, W]``, ``t [B]``."""
    if scale == 1.0:
        return teacher_velocity(teacher, x, t, text)
    neg = _negative(negative_text, text)
    v_c, v_n = teacher_velocity(teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, neg])).chunk(2)
    return v_n + scale * (v_c - v_n)


def dmd_loss(x_hat: torch.Tensor, teacher: WanTransformer3DModel, fake_score: WanTransformer3DModel,
             text: torch.Tensor, negative_text: torch.Tensor, cfg: DMDConfig, generator: torch.Generator
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The DMD (VSD) loss of the generator output (module docstring for the formulas).

    Args:
        x_hat: ``[B, C, F, H, W]`` generator output (with its autograd graph).
        teacher: frozen teacher (CFG branch), fake_score: the critic; both run without grad.
        text: ``[B, L, D]``; negative_text: ``[L, D]`` or ``[B, L, D]``.
        cfg: :class:`DMDConfig`; generator: source of τ and ε.
    Returns:
        ``({"loss": L_dmd}, log)``; log holds detached ``loss``, ``grad_norm`` (mean per-sample
        RMS of ``grad``), ``normaliser`` (mean of ``mean|x̂ - x0_real|``), ``tau_mean``.
    """
    B, device, dtype = x_hat.shape[0], x_hat.device, x_hat.dtype
    tau = sample_dmd_time(B, cfg, generator, device)
    eps = normal(tuple(x_hat.shape), generator, device, dtype)
    with torch.no_grad():
        x = x_hat.detach()
        x_tau = _noised(x, eps, tau)
        tt = per_sample(tau, x)
        x0_real = x_tau - tt * cfg_velocity(teacher, x_tau, tau, text, negative_text, cfg.cfg_scale)
        x0_fake = x_tau - tt * teacher_velocity(fake_score, x_tau, tau, text)
        norm = (x - x0_real).abs().flatten(1).mean(1)
        grad = torch.nan_to_num((x0_fake - x0_real) / per_sample(norm, x))
        target = x - grad
    loss = 0.5 * torch.nn.functional.mse_loss(x_hat, target, reduction="mean")
    log = {"loss": loss.detach(), "grad_norm": grad.flatten(1).pow(2).mean(1).sqrt().mean(),
           "normaliser": norm.mean(), "tau_mean": tau.mean()}
    return {"loss": loss}, log


def fake_score_loss(fake_score: WanTransformer3DModel, x_hat: torch.Tensor, text: torch.Tensor,
                    cfg: DMDConfig, generator: torch.Generator
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Flow-matching loss of the fake score on ``sg(x̂)``: ``x_τ = (1-τ)·x̂ + τ·ε``,
    ``loss = mean((v_fake(x_τ, τ) - (ε - x̂))²)``; τ per ``cfg.fake_time``.

    Args:
        x_hat: ``[B, C, F, H, W]`` generator output (detached here).
        text: ``[B, L, D]``.
    Returns:
        ``({"loss": loss}, {"loss", "tau_mean"})``.
    """
    x = x_hat.detach()
    B, device, dtype = x.shape[0], x.device, x.dtype
    tau = sample_dmd_time(B, cfg, generator, device, shifted=cfg.fake_time == "shifted")
    eps = normal(tuple(x.shape), generator, device, dtype)
    v = teacher_velocity(fake_score, _noised(x, eps, tau), tau, text)
    loss = torch.nn.functional.mse_loss(v.to(dtype), eps - x, reduction="mean")
    return {"loss": loss}, {"loss": loss.detach(), "tau_mean": tau.mean()}


def gan_inputs(x_real: torch.Tensor, x_hat: torch.Tensor, cfg: DMDConfig, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The discriminator's inputs: real = noised data, fake = noised ``x̂`` at the SAME ``τ``
    (drawn like the DMD time) and the same ``ε``; ``fake_t`` keeps ``x̂``'s graph.

    Args:
        x_real: ``[B, C, F, H, W]`` data latents; x_hat: the generator output (same shape).
    Returns:
        ``(real_t, fake_t, τ [B] float64)``.
    """
    if x_real.shape != x_hat.shape:
        raise ValueError(f"x_real {tuple(x_real.shape)} and x_hat {tuple(x_hat.shape)} must have one shape")
    tau = sample_dmd_time(x_hat.shape[0], cfg, generator, x_hat.device)
    eps = normal(tuple(x_hat.shape), generator, x_hat.device, x_hat.dtype)
    return _noised(x_real.to(x_hat.dtype), eps, tau), _noised(x_hat, eps, tau), tau
