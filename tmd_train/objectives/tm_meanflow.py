"""Stage 1: TM-MeanFlow (TM-MF) pretraining of the flow head (docs/design.md §1.4; paper §3.2, Eq. 14–15).

Per sample::

    t ∈ {t_1..t_M} (student grid, shift γ=10, t_max 0.999),  x1 ~ N,  x_t = (1-t)·x + t·x1
    m = backbone(x_t, t, text)                                       # with gradients
    y = x1 - x,  y1 ~ N,  (s, r) ~ sampler,  y_s = (1-s)·y + s·y1,  v_in = y1 - y
    u = y1 - head(y_s, s, r; m)                                      # with gradients
    v_g = ω·v_in + (1-ω)·u_uncond,   u_uncond = y1 - head(y_s, s, s; backbone(x_t, t, ∅))   # no grad
    du/ds ≈ [u(y_s + (s⁺-s)·v_g, s⁺, r) - u(y_s + (s⁻-s)·v_g, s⁻, r)] / (s⁺ - s⁻)         # no grad
    û = sg(v_g - (s-r)·du/ds),  loss = ‖u - û‖² / sg(‖u - û‖² + c)   (tmd_ext.meanflow_fd_loss)

The guidance is MeanFlow's: the derivative is taken along the guided field ``v_g`` (tangent
``(v_g, 1, 0)`` in ``(y, s, r)``), and the unconditional velocity is the student's own ``r = s``
prediction with the negative prompt (``cfg_source="student"``); ``cfg_source="teacher"`` takes
``u_uncond = y1 - v_teacher(x_t, t, ∅)`` from the frozen teacher instead.

(s, r) sampler: ``s = clip(shift(U, γ=3), 0.001, 0.999)``; ``r`` = the largest point ``≤ s`` of
the inner grid (N steps, shift γ=10, top 0.999); on a fraction of the samples (default 75%)
``r = s`` — those rows are plain transition matching and need no derivative. The two perturbed
head evaluations of the other ``B'`` rows run as ONE no-grad head pass over ``2B'`` rows that
reuses the backbone features (the "fused FD-JVP pass"). ``s± = s ± δ`` clamped to ``[0, 1]``:
a central difference inside, an off-centre one (still two evaluations, spacing ≥ δ) where
``s ± δ`` leaves ``[0, 1]``.

Condition dropout replaces the text by the negative-prompt embedding (and the target by the
plain ``v_in``) on a fraction of the samples. ``variant="tm"`` is the plain TM ablation
(``r = s`` always, no derivative pass).

Randomness: every draw comes from the ``generator`` argument, in a fixed order (dropout, t,
x1, y1, s, r=s choice), so a seeded generator repeats a step exactly.

Module calls and collectives: under FSDP every process must issue the same collectives in the
same order, and the FD pass all-gathers the head's blocks. A batch with no ``r ≠ s`` row skips
the FD pass — unless ``any_process`` (an or-reduction over the processes) says another process
runs it, in which case this one runs it on one stand-in row and discards the result. The
unconditional pass with every row dropped likewise runs on one stand-in row.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers import WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

import tmd_ext

from ..models.student import Features, TMDStudent
from ..models.teacher import teacher_velocity
from ..schedules import normal, per_sample, shift_time, shifted_grid, uniform

VARIANTS = ("tm_meanflow", "tm")
CFG_SOURCES = ("teacher", "student")


@dataclass(frozen=True)
class TMMeanFlowConfig:
    """The options of the TM-MF objective (defaults: the paper's 1.3B recipe, docs/design.md §1.4).

    Attributes:
        variant: ``"tm_meanflow"`` (TM-MF) or ``"tm"`` (plain transition matching, ``r = s``); in
            a training config it is set by the method (``method=tm_meanflow|tm``), not a key.
        outer_steps: M, the student's outer steps (``t`` is drawn from ``t_1..t_M``).
        inner_steps: N, the flow head's inner steps (``r`` snaps to this grid).
        outer_shift, inner_shift: shift γ of the outer and inner grids (10).
        t_max, s_max: top of the outer and inner grids (0.999).
        s_shift: shift γ of the uniform draw of ``s`` (3).
        s_min, s_max_clip: the clip range of ``s`` ([0.001, 0.999]).
        equal_fraction: probability per sample of ``r = s`` (0.75).
        delta: finite-difference step δ (5e-3).
        cfg_scale: ω of the CFG target ``v_g = ω·v_in + (1-ω)·u_uncond`` (3; 1 disables it).
        cfg_source: ``"student"`` (default, MeanFlow's: ``u_uncond`` is the student's own ``r = s``
            prediction at ``(y_s, s)`` with the negative text, no grad) or ``"teacher"``
            (``u_uncond = y1 - v_teacher(x_t, t, ∅)``, the frozen teacher).
        cond_dropout: probability per sample of replacing the text by the negative prompt (0.1).
        c_scale: the loss constant as a multiple of d (elements per sample): ``c = c_scale·d``
            (1 for 1.3B, 1e-5 for 14B).
        fd_autocast: run the derivative pass under the caller's autocast like the rest of the
            step (True), or with autocast off at the weights' precision (False, default: with
            float32 weights the difference of its two rows is not buried in bf16 rounding;
            docs/design.md §1.4 gives the measured errors).
    """

    variant: str = field(default="tm_meanflow", metadata={"set_by": "method"})
    outer_steps: int = 2
    inner_steps: int = 2
    outer_shift: float = 10.0
    inner_shift: float = 10.0
    t_max: float = 0.999
    s_max: float = 0.999
    s_shift: float = 3.0
    s_min: float = 0.001
    s_max_clip: float = 0.999
    equal_fraction: float = 0.75
    delta: float = 5e-3
    cfg_scale: float = 3.0
    cfg_source: str = "student"
    cond_dropout: float = 0.1
    c_scale: float = 1.0
    fd_autocast: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.cfg_source not in CFG_SOURCES:
            raise ValueError(f"cfg_source must be one of {CFG_SOURCES}, got {self.cfg_source!r}")
        if not isinstance(self.fd_autocast, bool):
            raise ValueError(f"fd_autocast must be a bool, got {self.fd_autocast!r}")
        for name in ("outer_steps", "inner_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("outer_shift", "inner_shift", "s_shift", "delta", "c_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("t_max", "s_max"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.s_min < self.s_max_clip <= 1:
            raise ValueError(f"need 0 <= s_min < s_max_clip <= 1, got {self.s_min}, {self.s_max_clip}")
        if not self.delta < 0.5:
            raise ValueError(f"delta must be < 0.5, got {self.delta}")
        for name in ("equal_fraction", "cond_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.cfg_scale > 0:
            raise ValueError(f"cfg_scale must be > 0, got {self.cfg_scale!r}")


# ---------------------------------------------------------------------------- pieces
def sample_outer_time(batch: int, outer_steps: int, shift: float, t_max: float, generator: torch.Generator,
                      device: torch.device) -> torch.Tensor:
    """``[B]`` float64 ``t`` drawn uniformly from the student grid points ``t_1..t_M``
    (``shifted_grid(M, γ, t_max)``; ``t_0 = 0`` excluded)."""
    grid = shifted_grid(outer_steps, shift, t_max, device=device)
    idx = torch.randint(1, outer_steps + 1, (batch,), generator=generator, device=generator.device)
    return grid[idx.to(device)]


def sample_inner_times(batch: int, cfg: TMMeanFlowConfig, generator: torch.Generator,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (s, r) sampler of docs/design.md §1.4: ``s = clip(shift(U, s_shift), s_min, s_max_clip)``;
    ``r`` = the largest inner-grid point ``≤ s``, replaced by ``s`` with probability
    ``equal_fraction`` (always for ``variant="tm"``). Returns ``(s, r)``, ``[B]`` float64."""
    s = shift_time(uniform(batch, generator, device), cfg.s_shift).clamp(cfg.s_min, cfg.s_max_clip)
    equal = uniform(batch, generator, device) < cfg.equal_fraction
    if cfg.variant == "tm":
        return s, s.clone()
    grid = shifted_grid(cfg.inner_steps, cfg.inner_shift, cfg.s_max, device=device)
    below = torch.searchsorted(grid, s, right=True) - 1
    r = grid[below.clamp(min=0)]
    return s, torch.where(equal, s, r)


def fd_times(s: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s⁺, s⁻) = (min(s + δ, 1), max(s - δ, 0))`` ``[B]``: central inside ``[δ, 1-δ]``, an
    off-centre difference (spacing still ≥ δ) where ``s ± δ`` leaves ``[0, 1]``."""
    return (s + delta).clamp(max=1.0), (s - delta).clamp(min=0.0)


def select_features(feats: Features, rows: torch.Tensor, repeats: int = 1,
                    dtype: torch.dtype | None = None) -> Features:
    """The features of ``rows`` (``[B']`` indices), stacked ``repeats`` times (copy-major,
    ``[repeats·B', …]``) and optionally cast to ``dtype`` (rotary tables and ``t`` stay as are)."""
    def pick(x: torch.Tensor) -> torch.Tensor:
        x = x.index_select(0, rows)
        if repeats > 1:
            x = x.repeat((repeats,) + (1,) * (x.dim() - 1))
        return x if dtype is None else x.to(dtype)
    t = feats.t.index_select(0, rows).repeat(repeats)
    return Features(pick(feats.m), pick(feats.temb), pick(feats.timestep_proj), pick(feats.text),
                    feats.rotary_emb, feats.grid, t)


@torch.no_grad()
def fd_head_pass(student: TMDStudent, feats: Features, y_s: torch.Tensor, v: torch.Tensor,
                 y1: torch.Tensor, s: torch.Tensor, r: torch.Tensor, s_plus: torch.Tensor,
                 s_minus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused FD-JVP pass: ONE no-grad head pass over ``2B'`` rows.

    Evaluates ``u = y1 - head(y, σ, r; m)`` at ``(y_s + (s⁺-s)·v, s⁺)`` and
    ``(y_s + (s⁻-s)·v, s⁻)``: two points along the tangent ``(v, 1, 0)`` in ``(y, σ, r)``, with
    the features fixed. The objective passes the guided velocity ``v = v_g``.

    Args:
        feats: backbone :class:`Features` of these ``B'`` rows (not repeated).
        y_s, v, y1: ``[B', C, F, H, W]``.
        s, r, s_plus, s_minus: ``[B']`` times.
    Returns:
        ``(u_plus, u_minus)``, each ``[B', C, F, H, W]`` in the dtype of ``y1``.
    """
    def at(t: torch.Tensor) -> torch.Tensor:
        return y_s + per_sample(t - s, y_s) * v
    y_pm = torch.cat([at(s_plus), at(s_minus)])
    out = student.head(y_pm, torch.cat([s_plus, s_minus]), torch.cat([r, r]), feats.repeat(2))
    u_plus, u_minus = (torch.cat([y1, y1]) - out.to(y1.dtype)).chunk(2)
    return u_plus, u_minus


@contextlib.contextmanager
def forward_ad_friendly() -> Iterator[None]:
    """Inside: the ``tmd_ext`` fusion ops are replaced by their pure-PyTorch references (the
    custom ops define reverse-mode autograd only) and attention runs on the math SDPA backend,
    so ``torch.func.jvp`` can push tangents through the student. Not thread-safe."""
    names = ("adaln_modulate", "gated_fusion", "gated_fusion_linear")
    saved = {n: getattr(tmd_ext, n) for n in names if hasattr(tmd_ext, n)}
    try:
        for n in saved:
            setattr(tmd_ext, n, getattr(tmd_ext.reference, n))
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for n, fn in saved.items():
            setattr(tmd_ext, n, fn)


def exact_total_derivative(student: TMDStudent, feats: Features, y_s: torch.Tensor, v: torch.Tensor,
                           y1: torch.Tensor, s: torch.Tensor, r: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, du/ds)`` with the exact total derivative along the tangent ``(v, 1, 0)``: forward-mode
    ``torch.func.jvp`` of ``u(y, σ) = y1 - head(y, σ, r; m)`` at ``(y_s, s)`` with tangent
    ``(v, 1)`` (and 0 for ``r`` and the features). Shapes as in :func:`fd_head_pass`.
    The ground truth of the FD pass (tests) and the "exact" provider of the benchmark; the
    primal ``u`` keeps its autograd graph when grad mode is on."""
    def u_of(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return y1 - student.head(y, sigma, r, feats).to(y1.dtype)
    with forward_ad_friendly():
        return torch.func.jvp(u_of, (y_s, s), (v, torch.ones_like(s)))


def cfg_target(v_in: torch.Tensor, u_uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``v_g = ω·v_in + (1-ω)·u_uncond`` (``v_in`` itself when ``u_uncond`` is None)."""
    if u_uncond is None:
        return v_in
    return scale * v_in + (1.0 - scale) * u_uncond


@torch.no_grad()
def unconditional_velocity(student: TMDStudent, teacher: WanTransformer3DModel | None, source: str,
                           x_t: torch.Tensor, t: torch.Tensor, negative: torch.Tensor, y_s: torch.Tensor,
                           s: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """``u_uncond`` of the CFG target (no grad), ``[B, C, F, H, W]`` in the dtype of ``y1``: the
    student's own ``r = s`` prediction ``y1 - head(y_s, s, s; backbone(x_t, t, ∅))``
    (``source="student"``, MeanFlow's) or ``y1 - v_teacher(x_t, t, ∅)`` (``source="teacher"``)."""
    if source == "teacher":
        if teacher is None:
            raise ValueError("cfg_source='teacher' needs the frozen teacher (teacher=None was passed)")
        return y1 - teacher_velocity(teacher, x_t, t, negative).to(y1.dtype)
    feats = student.backbone(x_t, t, negative)
    return student.velocity(y_s, s, s, feats, y1)


def _check_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for key in ("latents", "text", "negative_text"):
        if key not in batch:
            raise ValueError(f"batch lacks {key!r} (needs latents [B, C, F, H, W], text [B, L, D], "
                             f"negative_text [L, D] or [B, L, D])")
    x, text, neg = batch["latents"], batch["text"], batch["negative_text"]
    if x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"latents must be a float [B, C, F, H, W] tensor, got {tuple(x.shape)} {x.dtype}")
    B = x.shape[0]
    if text.dim() != 3 or text.shape[0] != B:
        raise ValueError(f"text must be [B={B}, L, D], got {tuple(text.shape)}")
    if neg.dim() == 2:
        neg = neg.unsqueeze(0).expand(B, -1, -1)
    if neg.dim() != 3 or neg.shape[0] != B or neg.shape[1:] != text.shape[1:]:
        raise ValueError(f"negative_text must be [L, D] or [B, L, D] with text's (L, D) = "
                         f"{tuple(text.shape[1:])}, got {tuple(batch['negative_text'].shape)}")
    return x, text, neg.to(text.dtype)


# ---------------------------------------------------------------------------- the objective
def _rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(rows, len(rows))``, or ``([0], 0)`` when empty: the pass then runs on one stand-in row
    whose result is discarded, so that it issues the same collectives as on the other processes."""
    n = rows.numel()
    return (rows, n) if n else (torch.zeros(1, dtype=rows.dtype, device=rows.device), 0)


def tm_meanflow(student: TMDStudent, batch: dict[str, torch.Tensor], cfg: TMMeanFlowConfig,
                generator: torch.Generator, *, teacher: WanTransformer3DModel | None = None,
                any_process: Callable[[bool], bool] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One TM-MF (or TM) loss evaluation on a batch.

    Args:
        student: the :class:`TMDStudent` being trained (its head AND backbone get gradients).
        batch: ``latents [B, C, F, H, W]`` (clean data ``x``; its dtype is the working dtype of
            the noise, targets and loss), ``text [B, L, D]`` (masked prompt embeddings),
            ``negative_text [L, D]`` or ``[B, L, D]`` (the negative-prompt embedding, used for
            condition dropout and the unconditional CFG branch).
        cfg: :class:`TMMeanFlowConfig`.
        generator: the source of every random draw (seed it by (seed, step, rank)).
        teacher: the frozen teacher (needed for ``cfg_source="teacher"`` with ``cfg_scale != 1``).
        any_process: with several processes, the logical or of a flag over all of them (a
            collective; called once per TM-MF evaluation on every process, with "this batch has an
            ``r ≠ s`` row"). None: this process decides alone (one process, or no sharding).
    Returns:
        ``(loss_dict, log_dict)``: ``loss_dict["loss"]`` is the scalar to backpropagate (mean of
        the per-sample loss); ``log_dict`` holds detached scalars ``loss``, ``mse`` (mean
        ‖Δ‖²/d), ``loss_fd``/``loss_tm`` (mean loss of the r≠s / r=s rows; NaN when there are
        none), ``frac_fd`` (fraction of rows with r≠s), ``frac_dropped``, ``t_mean``, ``s_mean``.
    """
    x, text, negative = _check_batch(batch)
    B, device, dtype = x.shape[0], x.device, x.dtype
    shape = tuple(x.shape)

    dropped = uniform(B, generator, device) < cfg.cond_dropout
    t = sample_outer_time(B, cfg.outer_steps, cfg.outer_shift, cfg.t_max, generator, device)
    x1 = normal(shape, generator, device, dtype)
    y1 = normal(shape, generator, device, dtype)
    s, r = sample_inner_times(B, cfg, generator, device)

    text_c = torch.where(dropped[:, None, None], negative, text)
    x_t = (1 - per_sample(t, x)) * x + per_sample(t, x) * x1
    y = x1 - x
    y_s = (1 - per_sample(s, y)) * y + per_sample(s, y) * y1
    v_in = y1 - y

    feats = student.backbone(x_t, t, text_c)
    u = student.velocity(y_s, s, r, feats, y1)

    # the guided velocity: the target AND the tangent of the derivative
    v_g = v_in
    if cfg.cfg_scale != 1.0:
        kept, n_kept = _rows((~dropped).nonzero().squeeze(1))

        def pick(z: torch.Tensor) -> torch.Tensor:
            return z.index_select(0, kept)
        u_unc = unconditional_velocity(student, teacher, cfg.cfg_source, pick(x_t), pick(t), pick(negative),
                                       pick(y_s), pick(s), pick(y1))
        if n_kept:
            v_g = v_in.clone()
            v_g.index_copy_(0, kept, cfg_target(pick(v_in), u_unc.to(v_in.dtype), cfg.cfg_scale))

    s_plus, s_minus = fd_times(s, cfg.delta)
    u_plus = torch.zeros_like(u)
    u_minus = torch.zeros_like(u)
    if cfg.variant == "tm_meanflow":
        rows = (r != s).nonzero().squeeze(1)
        n_fd = rows.numel()
        run = any_process(n_fd > 0) if any_process is not None else n_fd > 0
        if run:
            fd_rows, n_fd = _rows(rows)
            amp = contextlib.nullcontext() if cfg.fd_autocast else torch.autocast(device.type, enabled=False)
            fd_dtype = None if cfg.fd_autocast else student.dtype
            with amp:
                up, um = fd_head_pass(student, select_features(feats, fd_rows, dtype=fd_dtype),
                                      *(z.index_select(0, fd_rows) for z in (y_s, v_g, y1, s, r, s_plus, s_minus)))
            if n_fd:
                u_plus.index_copy_(0, fd_rows, up.to(u.dtype))
                u_minus.index_copy_(0, fd_rows, um.to(u.dtype))

    c = cfg.c_scale * float(u[0].numel())
    loss, mse = tmd_ext.meanflow_fd_loss(u, u_plus, u_minus, v_g, s, r, s_plus, s_minus, c)

    with torch.no_grad():
        fd_mask = r != s
        nan = torch.full((), float("nan"), device=device)
        log = {
            "loss": loss.mean().detach(),
            "mse": mse.mean().detach(),
            "loss_fd": loss[fd_mask].mean().detach() if bool(fd_mask.any()) else nan,
            "loss_tm": loss[~fd_mask].mean().detach() if bool((~fd_mask).any()) else nan,
            "frac_fd": fd_mask.double().mean(),
            "frac_dropped": dropped.double().mean(),
            "t_mean": t.mean(),
            "s_mean": s.mean(),
        }
    return {"loss": loss.mean()}, log

