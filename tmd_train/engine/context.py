"""The run context: device, process rank/world, autocast dtype and CPU threads."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from .config import TrainConfig


@dataclass
class RunContext:
    """Where and how a run computes.

    Attributes:
        device: this process's device (CUDA when available, else CPU).
        rank, world, is_main: the process index, the number of processes, ``rank == 0``.
        autocast_dtype: ``torch.bfloat16`` when the config's ``mixed_precision`` is ``bf16``
            (or ``auto`` on GPU), else None (no autocast).
        mesh: the 1-D ``DeviceMesh`` FSDP2 shards over, or None to make one over all processes when the
            models are sharded (the memory planner passes the mesh of its fake process group).
    """

    device: torch.device
    rank: int
    world: int
    is_main: bool
    autocast_dtype: torch.dtype | None
    mesh: Any = None

    @classmethod
    def create(cls, cfg: TrainConfig) -> RunContext:
        """Set up the process (under ``torchrun``: the process group, gloo on CPU) and, on CPU,
        ``torch.set_num_threads(cfg.cpu_threads)`` when it is non-zero."""
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        device = accelerator.device
        if cfg.cpu_threads and device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
        return cls(device=device, rank=accelerator.process_index, world=accelerator.num_processes,
                   is_main=accelerator.is_main_process, autocast_dtype=torch.bfloat16 if amp else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The step's autocast region (a no-op without mixed precision)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
