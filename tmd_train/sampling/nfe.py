"""NFE accounting: the effective NFE of TMD (paper Eq. 16) and a measured count of the
transformer-block evaluations a sampler runs.

A sampler's NFE is measured, not computed: forward pre-hooks count the rows pushed through every
transformer block, divided by ``L·B`` (one CFG pass over a ``2B`` batch therefore counts 2).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn


def effective_nfe(M: int, N: int, H: int, L: int) -> float:
    """Effective NFE of TMD (paper Eq. 16): ``M·(1 + (N-1)·H/L)``.

    M outer steps, N inner steps, H head blocks, L teacher blocks. E.g. N2H5, M=2, L=30 -> 2.333;
    N4H5, M=1, L=40 -> 1.375. A plain few-step student is ``N = 1`` (-> M).
    """
    for name, v in (("M", M), ("N", N), ("H", H), ("L", L)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if H > L:
        raise ValueError(f"H (head blocks) must be <= L (teacher blocks), got H={H}, L={L}")
    return M * (1.0 + (N - 1) * H / L)


@dataclass
class BlockCount:
    """Rows pushed through a model's transformer blocks (see :func:`count_blocks`)."""

    num_blocks: int
    batch_size: int
    rows: int = 0

    @property
    def nfe(self) -> float:
        """Full-model evaluations per sample: ``rows / (L · batch_size)``."""
        return self.rows / (self.num_blocks * self.batch_size)


@contextmanager
def count_blocks(blocks: nn.ModuleList, batch_size: int) -> Iterator[BlockCount]:
    """Count transformer-block evaluations of a Wan model inside the ``with`` body: forward
    pre-hooks on every block add the batch size of each call (rows of ``hidden_states``)."""
    count = BlockCount(len(blocks), batch_size)

    def hook(module: nn.Module, args: tuple) -> None:
        count.rows += args[0].shape[0]

    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()
