"""Stage 1, ``method=tm_meanflow``: TM-MeanFlow pretraining of the flow head (docs/design.md §1.4).

The student (backbone + flow head, initialised from the teacher or from ``init_student``) is
trained on :func:`~tmd_train.objectives.tm_meanflow.tm_meanflow` with AdamW. Checkpoint files:
``dcp/`` (the student's and AdamW's state, each process its shards, docs/design.md §6.5) and
``export/`` (the student folder's ``config.json``: ``python -m tmd_train.export`` makes the folder);
``state.json`` counts the skipped steps. The export (``<output_dir>/student``) is the final student.

With more than one process, every student block and the root are FSDP2 units (``fully_shard``;
gloo on CPU) and so is the frozen teacher; the student's units all-gather float32 unless
``objective.fd_autocast`` (the FD pass needs float32 weights), bf16 with it under bf16 mixed
precision, and a teacher folder is loaded shard by shard from the meta device (docs/design.md §7).
Each step processes ``batch_size`` samples per process
and accumulation step; chunk ``c = rank·grad_accum_steps + micro`` takes slice ``c`` of the step's
global batch and draws its randomness from a generator seeded by ``(seed, step, c)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ..data.sources import DataSource, collate
from ..engine.checkpoint import EXPORT_SPEC_DIR, load_sharded, module_state, restore_module, save_sharded
from ..engine.config import TrainConfig, check_fields
from ..engine.consolidate import ExportSpec, flatten, write_export_live
from ..engine.data import StepSampler, open_training_data, step_loader
from ..engine.distributed import (
    all_reduce_mean,
    average_gradients,
    local_tensor,
    materialize,
    replicated_parameters,
    shard_fsdp2,
)
from ..engine.optim import NonFiniteGuard, adamw, guarded_update, lr_at
from ..engine.seeding import seeded_generator
from ..engine.trainer import Method
from ..models.attention import set_attention_backend
from ..models.student import FUSIONS, HEAD_TIMES, TMDStudent
from ..models.teacher import cast_keeping_fp32
from ..objectives.tm_meanflow import TMMeanFlowConfig, tm_meanflow
from .exporting import student_files
from .networks import build_models, to_device
from .registry import check_method, register

LOG_KEYS = ("loss", "mse", "loss_fd", "loss_tm", "frac_fd", "frac_dropped", "t_mean", "s_mean")


@dataclass
class Stage1Config(TrainConfig):
    """Stage-1 options: the shared :class:`~tmd_train.engine.config.TrainConfig` fields, plus these
    (the objective's as ``objective.<key>``, see
    :class:`~tmd_train.objectives.tm_meanflow.TMMeanFlowConfig`).

    Attributes:
        method: "tm_meanflow" (TM-MeanFlow) or "tm" (plain transition matching, r = s).
        init_student: start from this TMDStudent folder instead of the teacher (optional).
        head_blocks: H, the teacher's last blocks that form the flow head.
        fusion: "gated" (exact teacher at init) or "concat" (paper App. B.3).
        head_time: "outer" (head time embedding of t plus zero-init ones of s, s-r) or "inner".
        objective: the TM-MeanFlow objective's options.
        grad_accum_steps: gradient accumulation steps per optimizer step.
        warmup_steps: linear learning-rate warm-up steps.
    """

    method: str = "tm_meanflow"
    init_student: str | None = None
    head_blocks: int = 5
    fusion: str = "gated"
    head_time: str = "outer"
    objective: TMMeanFlowConfig = field(default_factory=TMMeanFlowConfig)
    grad_accum_steps: int = 1
    warmup_steps: int = 0
    lr: float = 3e-5
    output_dir: str = "runs/stage1"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        super().validate()
        check_method(self)
        check_fields(self, choices={"fusion": FUSIONS, "head_time": HEAD_TIMES},
                     positive=("head_blocks", "grad_accum_steps"), non_negative=("warmup_steps",))


class Stage1Model(nn.Module):
    """The FSDP root: holds the student; ``forward`` evaluates the objective, so every student
    call of a step (backbone, head with grad, the no-grad FD and CFG passes) runs inside one
    root forward. ``any_process`` (set when sharded) is the objective's or-reduction over the
    processes that decides whether the FD pass runs anywhere (docs/design.md §1.4)."""

    def __init__(self, student: TMDStudent, objective: TMMeanFlowConfig,
                 any_process: Callable[[bool], bool] | None = None) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.any_process = any_process

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                teacher: WanTransformer3DModel | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return tm_meanflow(self.student, batch, self.objective, generator, teacher=teacher,
                           any_process=self.any_process)


def any_process_on(device: torch.device) -> Callable[[bool], bool]:
    """The logical or of a flag over all processes (one all-reduce of one number on ``device``)."""
    def reduce(flag: bool) -> bool:
        return bool(all_reduce_mean(torch.tensor([float(flag)], dtype=torch.float64, device=device))[0] > 0)
    return reduce


@register("tm_meanflow")
class TMMeanFlow(Method):
    """TM-MF pretraining: the student, the frozen teacher (when the CFG target needs it), AdamW
    and the data; one step accumulates ``grad_accum_steps`` chunks, then one guarded update.

    Args:
        cfg: a :class:`Stage1Config` (validated here).
        source: a data source to use instead of ``cfg.data`` (tests), with its ``negative``
            embedding ``(text_emb [L, D], text_mask [L])``.
    """

    config_cls = Stage1Config
    #: the objective variant this method trains (``TMMeanFlowConfig.variant``)
    variant = "tm_meanflow"

    def __init__(self, cfg: Stage1Config, source: DataSource | None = None,
                 negative: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(cfg)
        objective = dataclasses.replace(cfg.objective, variant=self.variant)
        needs_teacher = objective.cfg_source == "teacher" and objective.cfg_scale != 1.0
        teacher, student = build_models(cfg.teacher, cfg.seed, need_teacher=needs_teacher,
                                        init_student=cfg.init_student, head_blocks=cfg.head_blocks,
                                        fusion=cfg.fusion, head_time=cfg.head_time)
        to_device(student, self.device).train()
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        set_attention_backend(student, cfg.attention_backend, device=self.device)
        self.student = student
        self.model = Stage1Model(student, objective, any_process_on(self.device) if self.world > 1 else None)
        self.teacher: WanTransformer3DModel | None = None
        if teacher is not None:
            teacher.requires_grad_(False)
            if self.autocast_dtype is not None:  # the frozen teacher runs in bf16 (Wan's fp32 modules stay fp32)
                cast_keeping_fp32(teacher, self.autocast_dtype)
            to_device(teacher, self.device)
            set_attention_backend(teacher, cfg.attention_backend, device=self.device)
            self.teacher = teacher
        self.replicated: list[nn.Parameter] = []
        if self.world > 1:
            # bf16 all-gathers only where the FD pass may run in bf16 (objective.fd_autocast): its
            # derivative needs float32 weights and activations (docs/design.md §7)
            mp = {}
            if self.autocast_dtype is not None and objective.fd_autocast:
                mp = {"param_dtype": self.autocast_dtype, "reduce_dtype": torch.float32}
            self.replicated = shard_fsdp2(self.model, student.transformer.blocks, self.device.type,
                                          mesh=self.ctx.mesh, **mp)
            if self.teacher is not None:
                shard_fsdp2(self.teacher, self.teacher.blocks, self.device.type, mesh=self.ctx.mesh)
        materialize(self.model, self.device)  # models of a folder: each process reads its shards
        if self.teacher is not None:
            materialize(self.teacher, self.device)
        if self.world > 1:
            self.replicated = replicated_parameters(self.model)
        self.optimizer = adamw(self.model.parameters(), cfg, cfg.lr)
        self.guard = NonFiniteGuard()

        self.source, self.negative_text = open_training_data(cfg, student.teacher_config, self.device, source,
                                                             negative)
        self.sampler = StepSampler(len(self.source), cfg.batch_size, self.world * cfg.grad_accum_steps, cfg.seed)
        self.chunks = [self.rank * cfg.grad_accum_steps + m for m in range(cfg.grad_accum_steps)]
        self.samples_per_step = self.sampler.global_batch

    # ------------------------------------------------------------------ data
    def batches(self, first_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """For steps ``first_step..cfg.steps``: the list of this process's ``grad_accum_steps``
        chunk batches (on the device, with the negative embedding)."""
        chunk_batches: list[dict[str, torch.Tensor]] = []
        for batch in step_loader(self.source, self.sampler, first_step, self.cfg.steps, self.chunks, collate,
                                 self.cfg.num_workers, self.device):
            batch["negative_text"] = self.negative_text
            chunk_batches.append(batch)
            if len(chunk_batches) == len(self.chunks):
                yield chunk_batches
                chunk_batches = []

    # ------------------------------------------------------------------ one step
    def forward_backward(self, step: int, chunk_batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Accumulate the gradients of one step (no optimizer update). Returns this process's
        mean log values (``values``, in :data:`LOG_KEYS` order) and ``loss_local`` (the loss
        summed over its chunks, for the guard)."""
        logs: list[torch.Tensor] = []
        total = torch.zeros((), dtype=torch.float64)
        accum = len(chunk_batches)
        for micro, (chunk, batch) in enumerate(zip(self.chunks, chunk_batches, strict=True)):
            if self.world > 1:
                self.model.set_requires_gradient_sync(micro == accum - 1)
            gen = seeded_generator(self.cfg.seed, step, chunk, self.device)
            with self.ctx.autocast():
                loss_dict, log = self.model(batch, gen, self.teacher)
            (loss_dict["loss"] / accum).backward()
            total = total + loss_dict["loss"].detach().double().cpu()
            logs.append(torch.stack([log[k].detach().double().cpu() for k in LOG_KEYS]))
        values = torch.nanmean(torch.stack(logs), dim=0) if accum > 1 else logs[0]
        return {"values": values, "loss_local": total}

    def train_step(self, step: int, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward/backward over the chunks, then the guarded update (warm-up learning rate)."""
        fb = self.forward_backward(step, batch)
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup_steps)
        grad_norm, stepped = guarded_update(self.optimizer, self.guard, fb["loss_local"], lr=lr,
                                            max_grad_norm=self.cfg.max_grad_norm, replicated=self.replicated)
        logs = dict(zip(LOG_KEYS, fb["values"].tolist(), strict=True))
        logs.update(grad_norm=grad_norm, lr=lr, stepped=float(stepped))
        return logs

    def counters(self) -> dict[str, float]:
        return {"skipped_steps": float(self.guard.skipped)}

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Unsharded copies of the current gradients of the student (collective under FSDP),
        keyed like the student's parameters."""
        average_gradients(self.replicated)
        return {name[len("student."):]: local_tensor(p.grad).detach().cpu().clone()
                for name, p in self.model.named_parameters() if p.grad is not None}

    # ------------------------------------------------------------------ checkpoints, export
    def sharded_state(self, with_optimizer: bool) -> dict[str, Any]:
        """What a checkpoint holds, as this process holds it (FSDP2 shards, nothing gathered):
        ``{"student": {"model": …, "optim": …}}`` (the optimizer only ``with_optimizer``)."""
        return {"student": module_state(self.model, self.optimizer if with_optimizer else None)}

    def export_spec(self, state: dict[str, Any]) -> ExportSpec:
        """The student folder made from ``state`` (:meth:`sharded_state`): its ``config.json`` and each
        weight's checkpoint entry."""
        weights, files = student_files(self.student)
        tensors = [(k[len("student."):], f"student.model.{k}") for k in state["student"]["model"]
                   if k.startswith("student.")]
        return ExportSpec(weights, tensors, files)

    def save(self, folder: Path, is_main: bool) -> None:
        """``dcp/`` (each process its shards of the model and optimizer) and ``export/``. An optimizer that
        has not stepped is not saved (saving would initialise its state and change the run)."""
        state = self.sharded_state(bool(self.optimizer.state))
        save_sharded(folder, state)
        if is_main:
            self.export_spec(state).write(folder / EXPORT_SPEC_DIR)

    def state(self) -> dict[str, Any]:
        return {"skipped_steps": self.guard.skipped, "optimizer_saved": bool(self.optimizer.state)}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Each process reads its shards from ``dcp/`` into the (sharded) model and optimizer."""
        with_optimizer = bool(state.get("optimizer_saved", True))
        template = self.sharded_state(with_optimizer)
        load_sharded(folder, template)
        restore_module(self.model, template["student"], self.optimizer if with_optimizer else None)
        self.guard.skipped = int(state.get("skipped_steps", 0))

    def export(self, directory: Path) -> None:
        """The final student: a :meth:`TMDStudent.from_pretrained` folder, streamed one weight at a time."""
        state = self.sharded_state(False)
        write_export_live(directory, self.export_spec(state), flatten(state), self.is_main)

    def summary(self) -> str:
        return f"{self.step} steps, {self.guard.skipped} skipped"
