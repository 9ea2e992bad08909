"""TMD sampling with the student's inner flow run by :class:`tmd_ext.FlowHeadLoop` (C++; one
captured CUDA graph of a head step replayed N times on CUDA, an eager C++ loop on CPU).

:class:`LoopedInnerFlow` computes exactly ``student.inner_flow(feats, y1, s_grid)`` (no grad):
``y = y1``; for ``j = N..1``: ``y = flow_step(y, head(y, s_j, s_{j-1}; m), y1, s_j, s_{j-1})``.
The loop itself, its static buffers and the eager fallback are :class:`tmd_ext.StaticFlowHeadLoop`;
this module hands it the student's head and the backbone :class:`~tmd_train.models.Features` as
the per-call tensors copied into those buffers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

import tmd_ext

from ..models.student import Features, TMDStudent
from ..schedules import shifted_grid
from .inputs import batch_time, check_text, initial_noise, randn
from .nfe import count_blocks
from .samplers import Sample


def _tensors(feats: Features) -> tuple[torch.Tensor, ...]:
    """The tensors of ``feats`` in the order :meth:`LoopedInnerFlow._head` reads them."""
    cos, sin = feats.rotary_emb
    return feats.m, feats.temb, feats.timestep_proj, feats.text, cos, sin, feats.t


class LoopedInnerFlow:
    """``student.inner_flow`` (inference) through :class:`tmd_ext.StaticFlowHeadLoop`.

    Args:
        student: the :class:`~tmd_train.models.TMDStudent`.
        s_grid: ``[N+1]`` ascending inner times (float32/float64, ``s_grid[0]`` the end time,
            normally 0, ``s_grid[N]`` the start, ≈ 1).
        use_graph: CUDA graph path (``None``: on CUDA, falling back to the eager C++ loop with a
            warning if the head cannot be captured; ``True``: required; ``False``: eager).
        warmup: head evaluations before the capture (CUDA graph path).

    Call ``inner(feats, y1)`` with the backbone :class:`~tmd_train.models.Features` and the inner
    noise ``y1 [B, C, F, H, W]``; returns ``y0 [B, C, F, H, W]`` in the dtype of ``y1``. The loop
    (and its graph) is built on the first call and reused while shapes, dtypes, devices and the
    token grid stay the same; a different layout builds a new one.
    """

    def __init__(self, student: TMDStudent, s_grid: torch.Tensor, *, use_graph: bool | None = None,
                 warmup: int = 2) -> None:
        self.student = student
        self.flow = tmd_ext.StaticFlowHeadLoop(self._head, s_grid, use_graph=use_graph, warmup=warmup)
        self._grid: tuple[int, int, int] | None = None

    @property
    def s_grid(self) -> torch.Tensor:
        """The ``[N+1]`` inner grid."""
        return self.flow.s_grid

    @property
    def num_steps(self) -> int:
        """N, head evaluations per call."""
        return self.flow.num_steps

    @property
    def num_head_calls(self) -> int:
        """Head evaluations of the inner flows run so far (graph replays included, warm-up not)."""
        return self.flow.num_head_calls

    @property
    def loop(self) -> tmd_ext.FlowHeadLoop | None:
        """The C++ loop of the current layout (``None`` before the first call)."""
        return self.flow.loop

    def _head(self, y: torch.Tensor, s: torch.Tensor, r: torch.Tensor, m: torch.Tensor, temb: torch.Tensor,
              timestep_proj: torch.Tensor, text: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
        feats = Features(m=m, temb=temb, timestep_proj=timestep_proj, text=text, rotary_emb=(cos, sin),
                         grid=self._grid, t=t)
        return self.student.head(y, s, r, feats).to(y.dtype)

    @torch.no_grad()
    def __call__(self, feats: Features, y1: torch.Tensor) -> torch.Tensor:
        if feats.batch_size != y1.shape[0]:
            raise ValueError(f"y1 has batch {y1.shape[0]} but the features have batch {feats.batch_size}")
        self._grid = feats.grid
        return self.flow(y1, _tensors(feats), key=feats.grid)


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
    x = initial_noise(noise, shape, generator, device)
    B = x.shape[0]
    check_text(text, B)
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
            feats = student.backbone(x, batch_time(t_grid[i], B), text)
        backbone_rows += counter.rows
        y1 = randn(tuple(x.shape), generator, device)
        y = inner(feats, y1)
        x = x - float(t_grid[i] - t_grid[i - 1]) * y
    head_rows = (inner.num_head_calls - calls_before) * student.head_blocks * B
    return Sample(x, (backbone_rows + head_rows) / (student.num_layers * B))
