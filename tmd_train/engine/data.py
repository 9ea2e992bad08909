"""The data order and the loader of per-step batches.

The order is a pure function of ``(step, chunk)`` (:class:`StepSampler`), so resuming needs no
sampler state; :func:`step_loader` turns it into device batches through a ``DataLoader``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..data.sources import DataSource, masked_text, open_source
from .config import TrainConfig
from .seeding import derive_seed


class StepSampler:
    """The data order: the dataset is visited epoch by epoch, each epoch a permutation seeded by
    ``(seed, epoch)``; step ``k`` (1-based) takes the next ``global_batch`` positions of that
    endless sequence, and chunk ``c`` of the step takes its ``c``-th slice of ``chunk_size``.
    Pure function of ``(step, chunk)``: resuming needs no sampler state.

    Args:
        num_samples: dataset size.
        chunk_size: samples per chunk (the per-process micro-batch).
        num_chunks: chunks per step (processes × accumulation steps).
        seed: the run's seed.
    """

    def __init__(self, num_samples: int, chunk_size: int, num_chunks: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.num_chunks = num_chunks
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.chunk_size * self.num_chunks

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._perms[epoch] = torch.randperm(self.num_samples, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, chunk: int) -> list[int]:
        """Dataset indices of ``chunk`` of ``step`` (``chunk_size`` of them)."""
        if step < 1 or not 0 <= chunk < self.num_chunks:
            raise ValueError(f"bad (step, chunk) = ({step}, {chunk}) for {self.num_chunks} chunks")
        start = (step - 1) * self.global_batch + chunk * self.chunk_size
        out = []
        for p in range(start, start + self.chunk_size):
            out.append(int(self._perm(p // self.num_samples)[p % self.num_samples]))
        return out


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler for a ``DataLoader``: the index lists of ``chunks`` for every step in
    ``[first_step, last_step]``, step-major (so DataLoader workers can prefetch)."""

    def __init__(self, sampler: StepSampler, first_step: int, last_step: int, chunks: Sequence[int]) -> None:
        self.sampler = sampler
        self.first_step = first_step
        self.last_step = last_step
        self.chunks = list(chunks)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step, self.last_step + 1):
            for chunk in self.chunks:
                yield self.sampler.indices(step, chunk)

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1) * len(self.chunks)


def step_loader(source: Any, sampler: StepSampler, first_step: int, last_step: int, chunks: Sequence[int],
                collate_fn: Callable[[Sequence[Any]], dict[str, torch.Tensor]], num_workers: int,
                device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``chunks`` for steps ``first_step..last_step`` (step-major), on ``device``."""
    loader = torch.utils.data.DataLoader(
        source, batch_sampler=StepBatches(sampler, first_step, last_step, chunks), collate_fn=collate_fn,
        num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def open_training_data(cfg: TrainConfig, teacher_config: dict, device: torch.device,
                       source: DataSource | None = None,
                       negative: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[DataSource, torch.Tensor]:
    """``(source, negative_text [L, D] on device)``: the data of ``cfg.data`` (checked against the
    teacher), or ``source`` with its ``negative = (text_emb [L, D], text_mask [L])`` (tests)."""
    if source is None:
        source, negative = open_source(cfg.data, teacher_config=teacher_config,
                                       synthetic_samples=cfg.synthetic_samples,
                                       synthetic_latent_size=cfg.synthetic_latent_size,
                                       synthetic_text_len=cfg.synthetic_text_len, seed=cfg.seed)
    elif negative is None:
        raise ValueError("a custom source needs its negative embedding (negative=(text_emb, text_mask))")
    return source, masked_text(negative[0].float(), negative[1]).to(device)
