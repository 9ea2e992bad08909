"""The Python side of :class:`tmd_ext.FlowHeadLoop`: an inner flow whose head reads per-call
inputs from static buffers.

The C++ loop runs the whole inner flow of one outer step (docs/design.md §3.5)::

    y = y1;  for j = N..1:  y = flow_step(y, head(y, s_j, s_{j-1}), y1, s_j, s_{j-1})

replaying a captured CUDA graph of one head step on CUDA and looping eagerly in C++ on CPU. A CUDA
graph replays the kernels and the addresses it captured, so a head that depends on per-call
tensors (a student's backbone features) must read them from buffers that stay put.
:class:`StaticFlowHeadLoop` owns those buffers: every call copies its inputs into them
(``copy_``), a call with another layout (shapes, dtypes, devices, key) gets fresh buffers and a new
loop, and a head that cannot be captured falls back to the eager C++ loop — visibly: a
RuntimeWarning, and :attr:`StaticFlowHeadLoop.fallbacks` / ``fallback_reason`` record it. Under
autocast the head runs with the autocast weight cache off, so a captured graph never points at a
cast the cache frees when the autocast region ends.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence

import torch

from . import _C

Head = Callable[..., torch.Tensor]


def _layout(y1: torch.Tensor, inputs: Sequence[torch.Tensor], key: Hashable) -> tuple:
    """What the static buffers and the loop depend on: ``key`` and every shape, dtype and device."""
    return (key,) + tuple((tuple(t.shape), t.dtype, t.device) for t in (*inputs, y1))


class StaticFlowHeadLoop:
    """An inner flow through :class:`tmd_ext.FlowHeadLoop` with a head that reads static inputs.

    Args:
        head: ``head(y, s, r, *inputs) -> head_out``; ``y`` and ``head_out`` ``[B, ...]`` in the
            dtype of ``y1``, ``s, r`` ``[B]`` in the grid's dtype, ``inputs`` the static buffers
            holding the tensors of the current call.
        s_grid: ``[N+1]`` ascending inner times in ``[0, 1]`` (``s_grid[0]`` the end time, normally
            0, ``s_grid[N]`` the start, ≈ 1); float32 or float64 (other dtypes are cast to float64).
        use_graph: CUDA graph path (``None``: on CUDA, falling back to the eager C++ loop with a
            warning if the head cannot be captured; ``True``: required; ``False``: eager).
        warmup: head evaluations before the capture (CUDA graph path).

    Call ``flow(y1, inputs, key)`` with the inner noise ``y1 [B, ...]``, the head's per-call tensors
    ``inputs`` and a hashable ``key`` for anything else the head depends on (a change rebuilds the
    loop); returns ``y0 [B, ...]`` in the dtype of ``y1``, without autograd. The loop (and its graph)
    is built on the first call and reused while the layout stays the same.
    """

    def __init__(self, head: Head, s_grid: torch.Tensor, *, use_graph: bool | None = None,
                 warmup: int = 2) -> None:
        if not callable(head):
            raise TypeError(f"head must be callable, got {type(head).__name__}")
        if not isinstance(s_grid, torch.Tensor) or s_grid.dim() != 1 or s_grid.numel() < 2:
            raise ValueError(f"s_grid must be a 1-D [N+1] tensor with N >= 1, got "
                             f"{tuple(s_grid.shape) if isinstance(s_grid, torch.Tensor) else type(s_grid).__name__}")
        self.head = head
        self.s_grid = s_grid
        self.use_graph = use_graph
        self.warmup = warmup
        self.loop: _C.FlowHeadLoop | None = None
        self.static: tuple[torch.Tensor, ...] = ()
        self._layout: tuple | None = None
        self._head_calls_before = 0  # head calls of loops replaced by a new layout or a fallback
        self.fallbacks = 0  # times a head that could not be captured fell back to the eager loop
        self.fallback_reason: str | None = None  # the error of the last fallback

    @property
    def num_steps(self) -> int:
        """N, head evaluations per call."""
        return self.s_grid.numel() - 1

    @property
    def num_head_calls(self) -> int:
        """Head evaluations of the inner flows run so far (graph replays included, warm-up not)."""
        return self._head_calls_before + (self.loop.num_head_calls if self.loop is not None else 0)

    def _static_head(self, y: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        dev = y.device.type
        if torch.is_autocast_enabled(dev):
            # The autocast cache keeps casts of the weights only until the region ends; a graph
            # captured with it would replay reads of freed memory.
            with torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), cache_enabled=False):
                return self.head(y, s, r, *self.static)
        return self.head(y, s, r, *self.static)

    def _build(self, y1: torch.Tensor, use_graph: bool | None) -> None:
        if self.loop is not None:
            self._head_calls_before += self.loop.num_head_calls
        grid = self.s_grid.to(device=y1.device)
        if grid.dtype not in (torch.float32, torch.float64):
            grid = grid.double()
        self.loop = _C.FlowHeadLoop(self._static_head, tuple(y1.shape), y1.dtype, y1.device, grid,
                                    use_graph=use_graph, warmup=self.warmup)

    @torch.no_grad()
    def __call__(self, y1: torch.Tensor, inputs: Sequence[torch.Tensor] = (), key: Hashable = None) -> torch.Tensor:
        if not isinstance(y1, torch.Tensor):
            raise TypeError(f"y1 must be a torch.Tensor, got {type(y1).__name__}")
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
        layout = _layout(y1, inputs, key)
        if layout != self._layout:
            self.static = tuple(t.clone() for t in inputs)
            self._build(y1, self.use_graph)
            self._layout = layout
        else:
            for dst, src in zip(self.static, inputs, strict=True):
                dst.copy_(src)
        try:
            return self.loop(y1)
        except RuntimeError as e:
            # Any error before the graph exists (in the warm-up, the capture or a C++ check during
            # it) falls back when the graph was optional; a head that is simply wrong raises the
            # same error again from the eager loop.
            fallback = self.use_graph is None and self.loop.uses_graph and not self.loop.captured
            if not fallback:
                raise
            self.fallbacks += 1
            self.fallback_reason = str(e.__cause__ or e)
            warnings.warn(f"the flow head could not be captured into a CUDA graph ({self.fallback_reason}); "
                          "running the C++ inner loop eagerly", RuntimeWarning, stacklevel=2)
            self._build(y1, False)
            return self.loop(y1)
