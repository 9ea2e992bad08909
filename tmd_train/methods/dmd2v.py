"""Stage 2, ``method=dmd2v``: the plain few-step DMD2-v baseline — the generator is a trainable
copy of the teacher (a ``WanTransformer3DModel``), ``x̂ = x_t - t·v(x_t, t)``."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ..objectives.dmd import generator_sample_plain
from ..sampling import sample_few_step
from .distill import Distillation, Stage2Config
from .networks import empty_wan, load_training_teacher, teacher_config, write_plain
from .registry import register


class PlainGenerator(nn.Module):
    """The plain generator's FSDP root: ``forward(x0, x1, t, text, y1=None)`` returns
    ``x̂ = x_t - t·v(x_t, t, text)``."""

    def __init__(self, generator: WanTransformer3DModel) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                y1: None = None) -> torch.Tensor:
        return generator_sample_plain(self.generator, x0, x1, t, text)


@register("dmd2v")
class DMD2V(Distillation):
    """DMD2-v with a copy of the teacher as the generator (see :class:`~.distill.Distillation`)."""

    @classmethod
    def check_config(cls, cfg: Stage2Config) -> None:
        if cfg.init_student is not None:
            raise ValueError("init_student applies to method=tmd only (the dmd2v generator is a copy of the teacher)")

    def build_generator(self) -> tuple[WanTransformer3DModel, nn.Module, nn.ModuleList, dict[str, Any]]:
        teacher = load_training_teacher(self.cfg.teacher, self.cfg.seed)
        generator = copy.deepcopy(teacher)
        return teacher, generator, generator.blocks, teacher_config(teacher)

    def generator_root(self, generator: nn.Module) -> nn.Module:
        return PlainGenerator(generator)

    def empty_generator(self) -> nn.Module:
        return empty_wan(self.teacher_config)

    def write_generator(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        """A diffusers ``WanTransformer3DModel`` folder plus ``tmd_sampling.json``."""
        write_plain(self.teacher_config, state_dict, directory)
        super().write_generator(state_dict, directory)

    def sample(self, model: nn.Module, text: torch.Tensor, shape: tuple[int, ...],
               generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        return sample_few_step(model, text, shape=shape, generator=generator, steps=cfg.outer_steps,
                               shift=cfg.outer_shift, t_max=cfg.t_max).x0
