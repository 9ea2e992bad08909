"""Stage 2, ``method=tmd``: Transition Matching Distillation — DMD2-v whose generator is the
:class:`~tmd_train.models.TMDStudent` (from the stage-1 folder ``init_student``, or built from the
teacher), its sample ``x̂`` rolled out through the flow head's N inner steps (``unroll``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ..models.student import TMDStudent
from ..objectives.dmd import generator_sample
from ..sampling import sample_tmd
from ..schedules import normal, shifted_grid
from .distill import Distillation
from .networks import build_models, empty_student, write_student
from .registry import register


class TMDGenerator(nn.Module):
    """The TMD generator's FSDP root: ``forward(x0, x1, t, text, y1)`` returns
    ``x̂ = x_t - t·InnerFlow(backbone(x_t, t, text); y1)`` (every module call of the generator
    runs inside this root forward)."""

    def __init__(self, generator: TMDStudent, s_grid: torch.Tensor, unroll: bool, checkpoint: bool) -> None:
        super().__init__()
        self.generator = generator
        self.register_buffer("s_grid", s_grid, persistent=False)
        self.unroll = unroll
        self.checkpoint = checkpoint

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                y1: torch.Tensor) -> torch.Tensor:
        return generator_sample(self.generator, x0, x1, t, text, y1, self.s_grid, checkpoint=self.checkpoint,
                                unroll=self.unroll)


@register("tmd")
class TMD(Distillation):
    """DMD2-v with the TMD student as the generator (see :class:`~.distill.Distillation`)."""

    def build_generator(self) -> tuple[WanTransformer3DModel, nn.Module, nn.ModuleList, dict[str, Any]]:
        cfg = self.cfg
        teacher, student = build_models(cfg.teacher, cfg.seed, need_teacher=True, init_student=cfg.init_student,
                                        head_blocks=cfg.head_blocks, fusion=cfg.fusion, head_time=cfg.head_time)
        return teacher, student, student.transformer.blocks, student.teacher_config

    def generator_root(self, generator: nn.Module) -> nn.Module:
        cfg = self.cfg
        s_grid = shifted_grid(cfg.inner_steps, cfg.inner_shift, cfg.s_max, device=self.device)
        return TMDGenerator(generator, s_grid, cfg.unroll, cfg.unroll_checkpoint)

    def inner_noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The flow head's start noise ``y1``."""
        return normal(shape, gen, self.device, dtype)

    def empty_generator(self) -> nn.Module:
        return empty_student(self.generator)

    def write_generator(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        """A :meth:`TMDStudent.from_pretrained` folder plus ``tmd_sampling.json``."""
        write_student(self.generator, state_dict, directory)
        super().write_generator(state_dict, directory)

    def sample(self, model: nn.Module, text: torch.Tensor, shape: tuple[int, ...],
               generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        return sample_tmd(model, text, shape=shape, generator=generator, M=cfg.outer_steps, N=cfg.inner_steps,
                          outer_shift=cfg.outer_shift, inner_shift=cfg.inner_shift, t_max=cfg.t_max,
                          s_max=cfg.s_max).x0

    def sampling_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {**super().sampling_settings(), "inner_steps": cfg.inner_steps, "inner_shift": cfg.inner_shift,
                "s_max": cfg.s_max, "head_blocks": cfg.head_blocks}
