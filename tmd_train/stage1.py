"""Stage 1 trainer: TM-MeanFlow pretraining of the flow head (DESIGN.md §1).

    python -m tmd_train.stage1 [--config cfg.yaml] [key=value ...] [--resume latest|DIR]
    torchrun --nproc_per_node 8 -m tmd_train.stage1 ...        # FSDP2 over 8 processes

The student (backbone + flow head, initialised from the teacher) is trained on
:func:`~tmd_train.objectives.tm_meanflow.tm_meanflow` with AdamW. Output folder::

    config.yaml              the resolved config
    metrics.jsonl, logs/     scalars (JSON lines; TensorBoard)
    checkpoint-{step:07d}/   student/ (TMDStudent.from_pretrained), optimizer.pt,
                             rng_state_{rank}.pt, config.yaml, state.json (step, skipped steps)
    student/                 the final student, loadable by TMDStudent.from_pretrained

With more than one process, every student block and the root are FSDP2 units (``fully_shard``;
gloo on CPU) and so is the frozen teacher. Each step processes ``batch_size`` samples per process
and accumulation step; chunk ``c = rank·grad_accum_steps + micro`` takes slice ``c`` of the step's
global batch and draws its randomness from a generator seeded by ``(seed, step, c)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .config import check_fields, config_from_dict, save_config
from .data.sources import DataSource, collate, masked_text, open_source
from .models.student import FUSIONS, HEAD_TIMES, TMDStudent
from .models.teacher import _cast_keeping_fp32 as cast_keeping_fp32
from .models.teacher import load_teacher
from .objectives.tm_meanflow import TMMeanFlowConfig, config_from, tm_meanflow
from .training import (
    CheckpointWriter,
    NonFiniteGuard,
    ScalarLogger,
    StepBatches,
    StepSampler,
    Throughput,
    all_reduce_mean,
    average_gradients,
    clip_grad_norm,
    finish_process_group,
    gather_state,
    load_state,
    local_tensor,
    lr_at,
    parse_stage_args,
    read_checkpoint_state,
    resolve_resume,
    rng_state,
    seeded_generator,
    set_rng_state,
    shard_fsdp2,
)

MIXED_PRECISIONS = ("auto", "bf16", "no")
#: The no-argument run (on top of :func:`tmd_train.toy.toy_defaults`): the toy teacher's N2H1 student
#: (H = 1 of L = 6 blocks), a few CPU minutes.
TOY_STAGE1: dict[str, Any] = dict(
    outer_steps=2, inner_steps=2, head_blocks=1, synthetic_samples=4096, batch_size=8, steps=200, lr=1e-4,
    checkpoint_every=100, log_every=10, output_dir="runs/stage1-toy")
LOG_KEYS = ("loss", "mse", "loss_fd", "loss_tm", "frac_fd", "frac_dropped", "t_mean", "s_mean")


@dataclass
class Stage1Config:
    """Stage-1 options (YAML + ``key=value`` overrides; see :func:`tmd_train.config.load_config`).

    Model: ``teacher`` (a Wan2.1 diffusers folder / transformer folder, or a
    ``WanTransformer3DModel`` config mapping for a random teacher seeded by ``seed``),
    ``init_student`` (optional: start from this ``TMDStudent`` folder instead of the teacher),
    ``head_blocks`` H, ``fusion``, ``head_time``.
    Data: ``data`` (a dataset folder, DESIGN.md §5, or ``"synthetic"``: ``synthetic_samples``
    samples of ``synthetic_latent_size`` (F, H, W) and ``synthetic_text_len`` tokens),
    ``num_workers`` (DataLoader workers).
    Objective: the fields of :class:`~tmd_train.objectives.tm_meanflow.TMMeanFlowConfig`
    (``objective``, ``inner_steps`` N, ``outer_steps`` M, ``cfg_scale``, ``cfg_source``,
    ``cond_dropout``, ``equal_fraction`` (r = s fraction), ``c_scale`` (c = c_scale·d), ``delta``, …).
    Optimisation: ``batch_size`` (per process and accumulation step), ``grad_accum_steps``,
    ``lr``, ``weight_decay``, ``adam_betas``, ``adam_eps``, ``warmup_steps``, ``max_grad_norm``
    (<= 0: no clipping), ``steps``, ``mixed_precision`` (``auto``: bf16 autocast on GPU, off on
    CPU), ``gradient_checkpointing``, ``seed``.
    Output: ``output_dir``, ``checkpoint_every``, ``keep_last``, ``log_every``.
    """

    teacher: str | dict | None = None
    init_student: str | None = None
    head_blocks: int = 5
    fusion: str = "gated"
    head_time: str = "outer"

    data: str = "synthetic"
    synthetic_samples: int = 64
    synthetic_latent_size: tuple[int, int, int] = (3, 8, 8)
    synthetic_text_len: int = 8
    num_workers: int = 0

    objective: str = "tm_meanflow"
    outer_steps: int = 2
    inner_steps: int = 2
    outer_shift: float = 10.0
    inner_shift: float = 10.0
    t_max: float = 0.999
    s_max: float = 0.999
    s_shift: float = 3.0
    s_min: float = 0.001
    s_max_clip: float = 0.999
    equal_fraction: float = 0.75
    delta: float = 5e-3
    cfg_scale: float = 3.0
    cfg_source: str = "teacher"
    cond_dropout: float = 0.1
    c_scale: float = 1.0
    fd_autocast: bool = False

    batch_size: int = 1
    grad_accum_steps: int = 1
    lr: float = 3e-5
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    steps: int = 1000
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0

    output_dir: str = "runs/stage1"
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.teacher is None:
            raise ValueError("teacher is required: a Wan2.1 diffusers folder or a WanTransformer3DModel config")
        if isinstance(self.teacher, str) and not self.teacher:
            raise ValueError("teacher must not be empty")
        if not self.data:
            raise ValueError("data must be a dataset folder or 'synthetic'")
        check_fields(self, choices={"fusion": FUSIONS, "head_time": HEAD_TIMES, "mixed_precision": MIXED_PRECISIONS},
                     positive=("head_blocks", "batch_size", "grad_accum_steps", "steps", "checkpoint_every",
                               "keep_last", "log_every", "synthetic_samples", "synthetic_text_len"),
                     non_negative=("num_workers", "warmup_steps", "seed"))
        if min(self.synthetic_latent_size) < 1:
            raise ValueError(f"synthetic_latent_size must be positive, got {self.synthetic_latent_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        config_from(self)  # the objective's own checks

    @property
    def objective_config(self) -> TMMeanFlowConfig:
        return config_from(self)


# ---------------------------------------------------------------------------- model pieces
class Stage1Model(nn.Module):
    """The FSDP root: holds the student; ``forward`` evaluates the objective, so every student
    call of a step (backbone, head with grad, the no-grad FD and CFG passes) runs inside one
    root forward."""

    def __init__(self, student: TMDStudent, objective: TMMeanFlowConfig) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                teacher: WanTransformer3DModel | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return tm_meanflow(self.student, batch, self.objective, generator, teacher=teacher)


def _load_teacher(teacher: str | dict) -> WanTransformer3DModel:
    if isinstance(teacher, dict):
        tcfg = dict(teacher)
        if "patch_size" in tcfg:
            tcfg["patch_size"] = tuple(tcfg["patch_size"])
        return load_teacher(tcfg, torch_dtype=torch.float32)
    return load_teacher(teacher, torch_dtype=torch.float32)


def build_models(teacher: str | dict, seed: int, *, need_teacher: bool, init_student: str | None = None,
                 **student_options: Any) -> tuple[WanTransformer3DModel | None, TMDStudent]:
    """``(teacher, student)`` on CPU in float32.

    The teacher is loaded from a folder (or random from a config). The student is built from it
    (on a deep copy when the frozen teacher is needed later, else adopting its modules), or, with
    ``init_student``, loaded from that :meth:`TMDStudent.from_pretrained` folder (its options and
    teacher architecture must match; the teacher is then loaded only if ``need_teacher``).
    Every random initialisation (a random teacher; the student's new layers) draws from the
    global RNG seeded by ``seed`` inside a forked RNG state, so all processes and every restart
    build the same models.

    Raises:
        ValueError: ``init_student`` does not match the configured student or teacher.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _load_teacher(teacher) if (need_teacher or init_student is None) else None
        if init_student is None:
            return (model if need_teacher else None), TMDStudent.from_teacher(model, copy=need_teacher,
                                                                              **student_options)
    student = TMDStudent.from_pretrained(init_student, torch_dtype=torch.float32)
    for key, value in student_options.items():
        if getattr(student.config, key) != value:
            raise ValueError(f"init_student {init_student} has {key}={getattr(student.config, key)!r}, "
                             f"the config says {value!r}")
    if model is not None:
        ref = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
        if student.teacher_config != ref:
            raise ValueError(f"init_student {init_student} was built on another teacher architecture")
    return model, student


def write_student(student: TMDStudent, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a :meth:`TMDStudent.from_pretrained` folder from a full state dict of ``student``
    (which may be FSDP-sharded: a fresh, weightless copy of its architecture does the writing)."""
    tcfg = dict(student.teacher_config)
    tcfg["patch_size"] = tuple(tcfg["patch_size"])
    with init_empty_weights(include_buffers=False):
        copy = TMDStudent(WanTransformer3DModel.from_config(tcfg), dataclasses.replace(student.config))
    copy.load_state_dict(state_dict, strict=True, assign=True)
    copy.save_pretrained(directory)


def _strip(prefix: str, sd: dict[str, Any]) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- trainer
class Stage1Trainer:
    """Holds the run: accelerator, teacher, student (FSDP2-sharded with > 1 process), AdamW, data.

    Args:
        cfg: a validated :class:`Stage1Config`.
        source: a data source to use instead of ``cfg.data`` (with its negative embedding
            ``negative = (text_emb [L, D], text_mask [L])``); for tests.
    """

    def __init__(self, cfg: Stage1Config, source: DataSource | None = None,
                 negative: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if amp else None

        objective = cfg.objective_config
        needs_teacher = objective.cfg_source == "teacher" and objective.cfg_scale != 1.0
        teacher, student = build_models(cfg.teacher, cfg.seed, need_teacher=needs_teacher,
                                        init_student=cfg.init_student, head_blocks=cfg.head_blocks,
                                        fusion=cfg.fusion, head_time=cfg.head_time)
        student.to(self.device).train()
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.student = student
        self.model = Stage1Model(student, objective)
        self.teacher: WanTransformer3DModel | None = None
        if teacher is not None:
            teacher.requires_grad_(False)
            if amp:  # the frozen teacher runs in bf16 (Wan's float32 modules stay float32)
                cast_keeping_fp32(teacher, torch.bfloat16)
            teacher.to(self.device)
            self.teacher = teacher
        self.replicated: list[nn.Parameter] = []
        if self.world > 1:
            self.replicated = shard_fsdp2(self.model, student.transformer.blocks, self.device.type)
            if self.teacher is not None:
                shard_fsdp2(self.teacher, self.teacher.blocks, self.device.type)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)

        if source is None:
            source, negative = open_source(cfg.data, teacher_config=student.teacher_config,
                                           synthetic_samples=cfg.synthetic_samples,
                                           synthetic_latent_size=cfg.synthetic_latent_size,
                                           synthetic_text_len=cfg.synthetic_text_len, seed=cfg.seed)
        elif negative is None:
            raise ValueError("a custom source needs its negative embedding (negative=(text_emb, text_mask))")
        self.source = source
        self.negative_text = masked_text(negative[0].float(), negative[1]).to(self.device)
        self.sampler = StepSampler(len(source), cfg.batch_size, self.world * cfg.grad_accum_steps, cfg.seed)
        self.chunks = [self.rank * cfg.grad_accum_steps + m for m in range(cfg.grad_accum_steps)]
        self.guard = NonFiniteGuard()
        self.step = 0

    # ------------------------------------------------------------------ data
    def batches(self, first_step: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """For steps ``first_step..cfg.steps``: the list of this process's ``grad_accum_steps``
        chunk batches (on the device, with the negative embedding)."""
        loader = torch.utils.data.DataLoader(
            self.source, batch_sampler=StepBatches(self.sampler, first_step, self.cfg.steps, self.chunks),
            collate_fn=collate, num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        chunk_batches: list[dict[str, torch.Tensor]] = []
        for batch in loader:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            batch["negative_text"] = self.negative_text
            chunk_batches.append(batch)
            if len(chunk_batches) == len(self.chunks):
                yield chunk_batches
                chunk_batches = []

    # ------------------------------------------------------------------ one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, step: int, chunk_batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Accumulate the gradients of one step (no optimizer update). Returns this process's
        mean log values and ``loss_local`` (the loss summed over its chunks, for the guard)."""
        logs: list[torch.Tensor] = []
        total = torch.zeros((), dtype=torch.float64)
        accum = len(chunk_batches)
        for micro, (chunk, batch) in enumerate(zip(self.chunks, chunk_batches, strict=True)):
            if self.world > 1:
                self.model.set_requires_gradient_sync(micro == accum - 1)
            gen = seeded_generator(self.cfg.seed, step, chunk, self.device)
            with self._autocast():
                loss_dict, log = self.model(batch, gen, self.teacher)
            (loss_dict["loss"] / accum).backward()
            total = total + loss_dict["loss"].detach().double().cpu()
            logs.append(torch.stack([log[k].detach().double().cpu() for k in LOG_KEYS]))
        values = torch.nanmean(torch.stack(logs), dim=0) if accum > 1 else logs[0]
        return {"values": values, "loss_local": total}

    def optimizer_step(self, step: int, loss_local: torch.Tensor) -> tuple[float, bool]:
        """Clip, check for non-finite values, then update (or skip and count). Returns
        ``(grad_norm, stepped)``."""
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        average_gradients(self.replicated)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)
        stepped = self.guard.ok(loss_local, grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), stepped

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Unsharded copies of the current gradients of the student (collective under FSDP),
        keyed like the student's parameters."""
        average_gradients(self.replicated)
        return {name[len("student."):]: local_tensor(p.grad).detach().cpu().clone()
                for name, p in self.model.named_parameters() if p.grad is not None}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, writer: CheckpointWriter, step: int) -> Path:
        def write(folder: Path, is_main: bool) -> None:
            torch.save(rng_state(), folder / f"rng_state_{self.rank}.pt")
            model_sd, optim_sd = gather_state(self.model, self.optimizer)
            if is_main:
                write_student(self.student, _strip("student.", model_sd), folder / "student")
                torch.save(optim_sd, folder / "optimizer.pt")
                save_config(self.cfg, folder / "config.yaml")
        return writer.save(step, write, {"skipped_steps": self.guard.skipped, "world_size": self.world})

    def load_checkpoint(self, folder: Path) -> int:
        """Restore student, optimizer, RNG states and counters; returns the step."""
        state = read_checkpoint_state(folder)
        model_sd = {"student." + k: v for k, v in load_file(str(folder / "student" / "model.safetensors")).items()}
        optim_sd = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        load_state(self.model, model_sd, self.optimizer, optim_sd)
        rng_file = folder / f"rng_state_{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.guard.skipped = int(state.get("skipped_steps", 0))
        self.step = int(state["step"])
        return self.step

    def save_final(self, directory: Path) -> None:
        model_sd, _ = gather_state(self.model)
        if self.is_main:
            write_student(self.student, _strip("student.", model_sd), directory)

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None) -> Path:
        """Train to ``cfg.steps`` (resuming from ``resume``: ``"latest"`` or a checkpoint folder);
        returns the final student folder."""
        cfg = self.cfg
        out = Path(cfg.output_dir)
        start = resolve_resume(resume, out)
        if start is not None:
            self.load_checkpoint(start)
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        writer = CheckpointWriter(out, cfg.keep_last, self.is_main)
        logger = ScalarLogger(out, self.is_main, resume_step=self.step)
        speed = Throughput()
        progress = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, desc="stage1")
        global_batch = self.sampler.global_batch
        try:
            for step, chunk_batches in zip(range(self.step + 1, cfg.steps + 1), self.batches(self.step + 1),
                                           strict=True):
                fb = self.forward_backward(step, chunk_batches)
                grad_norm, stepped = self.optimizer_step(step, fb["loss_local"])
                values = all_reduce_mean(fb["values"])
                self.step = step
                speed.add(global_batch)
                scalars = dict(zip(LOG_KEYS, values.tolist(), strict=True))
                progress.update(1)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", skipped=self.guard.skipped)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    logger.log(step, {**scalars, "grad_norm": grad_norm, "lr": lr_at(step, cfg.lr, cfg.warmup_steps),
                                      "samples_per_s": speed.rate(), "skipped_steps": float(self.guard.skipped),
                                      "stepped": float(stepped)})
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    self.save_checkpoint(writer, step)
            final = out / "student"
            self.save_final(final)
        finally:
            progress.close()
            logger.close()
        return final


# ---------------------------------------------------------------------------- CLI
def default_config() -> Stage1Config:
    """The no-argument run: the toy world (:func:`tmd_train.toy.toy_defaults` with :data:`TOY_STAGE1`).
    Raises FileNotFoundError (saying what to pass) without the toy teacher."""
    from .toy import toy_defaults
    return config_from_dict(Stage1Config, toy_defaults(**TOY_STAGE1))


def parse_args(argv: Sequence[str] | None = None) -> tuple[Stage1Config, str | None]:
    return parse_stage_args("stage1", Stage1Config, default_config, __doc__.split("\n\n")[0], argv)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    trainer = Stage1Trainer(cfg)
    final = trainer.fit(resume)
    if trainer.is_main:
        print(f"stage1: {trainer.step} steps, {trainer.guard.skipped} skipped; student written to {final}")
    finish_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
