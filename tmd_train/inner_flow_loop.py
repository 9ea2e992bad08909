"""The student's inner flow run by :class:`tmd_ext.FlowHeadLoop` (C++; one captured CUDA graph of a
head step replayed N times on CUDA, an eager C++ loop on CPU), and TMD sampling with it.

:class:`LoopedInnerFlow` computes exactly ``student.inner_flow(feats, y1, s_grid)`` (no grad):
``y = y1``; for ``j = N..1``: ``y = flow_step(y, head(y, s_j, s_{j-1}; m), y1, s_j, s_{j-1})``.
A CUDA graph replays the kernels and addresses it captured, so the head reads its backbone
features from static buffers: every call copies the new :class:`~tmd_train.models.Features` into
them (``copy_``), never rebinding the head to new tensors.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

import tmd_ext

from .models.student import Features, TMDStudent
from .sampling import Sample, _batch_time, _check_text, _initial_noise, _randn, count_blocks
from .schedules import shifted_grid


def _static_copy(feats: Features) -> Features:
    """Fresh buffers holding a copy of ``feats`` (same shapes, dtypes, devices)."""
    cos, sin = feats.rotary_emb
    return Features(m=feats.m.clone(), temb=feats.temb.clone(), timestep_proj=feats.timestep_proj.clone(),
                    text=feats.text.clone(), rotary_emb=(cos.clone(), sin.clone()), grid=feats.grid,
                    t=feats.t.clone())


def _pairs(a: Features, b: Features) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(a.m, b.m), (a.temb, b.temb), (a.timestep_proj, b.timestep_proj), (a.text, b.text),
            (a.rotary_emb[0], b.rotary_emb[0]), (a.rotary_emb[1], b.rotary_emb[1]), (a.t, b.t)]


def _layout(feats: Features, y1: torch.Tensor) -> tuple:
    """What the static buffers and the loop depend on: shapes, dtypes and devices."""
    tensors = [t for t, _ in _pairs(feats, feats)] + [y1]
    return (feats.grid,) + tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


class LoopedInnerFlow:
    """``student.inner_flow`` (inference) through :class:`tmd_ext.FlowHeadLoop`.

    Args:
        student: the :class:`~tmd_train.models.TMDStudent`.
        s_grid: ``[N+1]`` ascending inner times (float32/float64, ``s_grid[0]`` the end time,
            normally 0, ``s_grid[N]`` the start, ≈ 1).
        use_graph: CUDA graph path (``None``: on CUDA, falling back to the eager C++ loop with a
            warning if the head cannot be captured; ``True``: required; ``False``: eager).
        warmup: head evaluations before the capture (CUDA graph path).

    Call ``inner(feats, y1)`` with the backbone :class:`~tmd_train.models.Features` and the inner
    noise ``y1 [B, C, F, H, W]``; returns ``y0 [B, C, F, H, W]`` in the dtype of ``y1``. The loop
    (and its graph) is built on the first call and reused while shapes, dtypes and devices stay
    the same; a different layout builds a new one.
    """

    def __init__(self, student: TMDStudent, s_grid: torch.Tensor, *, use_graph: bool | None = None,
                 warmup: int = 2) -> None:
        if not isinstance(s_grid, torch.Tensor) or s_grid.dim() != 1 or s_grid.numel() < 2:
            raise ValueError(f"s_grid must be a 1-D [N+1] tensor with N >= 1, got "
                             f"{tuple(s_grid.shape) if isinstance(s_grid, torch.Tensor) else type(s_grid).__name__}")
        self.student = student
        self.s_grid = s_grid
        self.use_graph = use_graph
        self.warmup = warmup
        self.loop: tmd_ext.FlowHeadLoop | None = None
        self._static: Features | None = None
        self._layout: tuple | None = None
        self._head_calls_before = 0  # head calls of loops replaced by a new layout or a fallback

    @property
    def num_steps(self) -> int:
        """N, head evaluations per call."""
        return self.s_grid.numel() - 1

    @property
    def num_head_calls(self) -> int:
        """Head evaluations of the inner flows run so far (graph replays included, warm-up not)."""
        return self._head_calls_before + (self.loop.num_head_calls if self.loop is not None else 0)

    def _head(self, y: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.student.head(y, s, r, self._static).to(y.dtype)

    def _build(self, y1: torch.Tensor, use_graph: bool | None) -> None:
        if self.loop is not None:
            self._head_calls_before += self.loop.num_head_calls
        grid = self.s_grid.to(device=y1.device)
        if grid.dtype not in (torch.float32, torch.float64):
            grid = grid.double()
        self.loop = tmd_ext.FlowHeadLoop(self._head, tuple(y1.shape), y1.dtype, y1.device, grid,
                                         use_graph=use_graph, warmup=self.warmup)

    @torch.no_grad()
    def __call__(self, feats: Features, y1: torch.Tensor) -> torch.Tensor:
        if feats.batch_size != y1.shape[0]:
            raise ValueError(f"y1 has batch {y1.shape[0]} but the features have batch {feats.batch_size}")
        layout = _layout(feats, y1)
        if layout != self._layout:
            self._static = _static_copy(feats)
            self._build(y1, self.use_graph)
            self._layout = layout
        else:
            for dst, src in _pairs(self._static, feats):
                dst.copy_(src)
        try:
            return self.loop(y1)
        except RuntimeError as e:
            fallback = self.use_graph is None and self.loop.uses_graph and not self.loop.captured
            if not fallback or "CUDA graph" not in str(e):
                raise
            warnings.warn(f"the flow head could not be captured into a CUDA graph ({e.__cause__ or e}); "
                          "running the C++ inner loop eagerly", RuntimeWarning, stacklevel=2)
            self._build(y1, False)
            return self.loop(y1)


@torch.no_grad()
def sample_tmd_looped(student: TMDStudent, text: torch.Tensor, *, noise: torch.Tensor | None = None,
                      shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
                      M: int = 2, N: int = 2, outer_shift: float = 10.0, inner_shift: float = 10.0,
                      t_max: float = 0.999, s_max: float = 0.999, use_graph: bool | None = None,
                      inner: LoopedInnerFlow | None = None) -> Sample:
    """:func:`tmd_train.sampling.sample_tmd` (Algorithm 1) with the inner flow run by
    :class:`LoopedInnerFlow`: the same grids, the same draws from ``generator`` in the same order,
    the same result.

    Args:
        student, text, noise, shape, generator, M, N, outer_shift, inner_shift, t_max, s_max: as
            in :func:`~tmd_train.sampling.sample_tmd`.
        use_graph: passed to :class:`LoopedInnerFlow` (ignored when ``inner`` is given).
        inner: a :class:`LoopedInnerFlow` to reuse (keeps its captured graph across calls); its
            grid must be ``shifted_grid(N, inner_shift, s_max)``.
    Returns:
        ``Sample(x0, nfe)``; ``nfe`` counts the backbone blocks run (forward hooks) plus ``H``
        blocks per head evaluation of the loop (replays run no Python hooks), per sample, over ``L``.
    """
    device = student.device
    x = _initial_noise(noise, shape, generator, device)
    B = x.shape[0]
    _check_text(text, B)
    text = text.to(device)
    t_grid = shifted_grid(M, outer_shift, t_max, device=device)
    s_grid = shifted_grid(N, inner_shift, s_max, device=device)
    if inner is None:
        inner = LoopedInnerFlow(student, s_grid, use_graph=use_graph)
    elif inner.num_steps != N or not torch.equal(inner.s_grid.to(s_grid), s_grid):
        raise ValueError(f"inner was built for another inner grid ({inner.num_steps} steps) than "
                         f"shifted_grid(N={N}, inner_shift={inner_shift}, s_max={s_max})")
    calls_before = inner.num_head_calls
    backbone_rows = 0
    for i in range(M, 0, -1):
        with count_blocks(student.transformer.blocks, B) as counter:
            feats = student.backbone(x, _batch_time(t_grid[i], B), text)
        backbone_rows += counter.rows
        y1 = _randn(tuple(x.shape), generator, device)
        y = inner(feats, y1)
        x = x - float(t_grid[i] - t_grid[i - 1]) * y
    head_rows = (inner.num_head_calls - calls_before) * student.head_blocks * B
    return Sample(x, (backbone_rows + head_rows) / (student.num_layers * B))
