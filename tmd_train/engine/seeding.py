"""Seeding: every stochastic choice of a training step draws from a generator seeded by
``(seed, step, chunk)`` where ``chunk = rank·grad_accum_steps + micro_step`` (= the rank without
accumulation), so a resumed run repeats the uninterrupted one exactly and a 1-process run with
accumulation repeats the multi-process one."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key (SHA-256 of their text), so nearby keys give
    unrelated streams."""
    digest = hashlib.sha256(":".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, step: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's chunk (``chunk = rank·accum + micro``), on ``device``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "step", step, chunk))
