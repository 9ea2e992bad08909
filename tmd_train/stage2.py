"""Stage 2 trainer: DMD2-v distillation with flow-head roll-out (DESIGN.md §1 "Stage 2").

    python -m tmd_train.stage2 [--config cfg.yaml] [key=value ...] [--resume latest|DIR]
    python -m tmd_train.stage2                      # the toy world (shipped toy teacher, data=shapes)
    torchrun --nproc_per_node 8 -m tmd_train.stage2 ...        # FSDP2 over 8 processes

Models: the generator (``method=tmd``: a :class:`~tmd_train.models.TMDStudent`, from a stage-1
folder ``init_student`` or built from the teacher; ``method=dmd2v``: a trainable copy of the
teacher, the plain few-step baseline), the real score (the frozen teacher, CFG ``cfg_scale`` with
the data's negative-prompt embedding), the fake score (a trainable copy of the teacher) and the
discriminator (Conv3D heads on unpatchified frozen-teacher features, ``disc_blocks``).

Iterations (the step counter counts both phases): steps ``1..kd_steps`` are the KD warm-up
(``outer_steps == 1`` only: the one-step output from noise, ``x̂ = x - t_max·InnerFlow`` or
``x - t_max·v``, regressed (MSE) onto the teacher's ODE samples of the ``kd_pairs`` dataset; only
the generator's optimizer steps, at ``kd_lr``); steps ``kd_steps+1 .. kd_steps+steps`` are the DMD
iterations ``i = 1..steps``. Each DMD iteration draws a generator sample ``x̂`` (student-grid ``t``
with shift ``outer_shift``, ``x_t`` noised from data; see :mod:`tmd_train.objectives.dmd`); when
``i % generator_every == 0`` the generator takes a step on ``L_dmd + gan_weight·L_gan`` (and the
EMA is updated); then, every iteration, the fake score steps on its flow-matching loss on
``sg(x̂)`` and the discriminator on its GAN loss (real = noised data, fake = noised ``sg(x̂)``).
The critics see the ``x̂`` drawn before the generator's update, as in DMD2. Each of the three
AdamW optimizers has its own non-finite guard (skip and count).

EMA (``ema_decay``, default 0.99): updated after every generator update, ``ema ← d·ema + (1-d)·w``;
during the first ``ema_start`` generator updates it just copies the weights. The EMA weights are
what ``student/`` and the sample grids use.

Output folder::

    config.yaml, metrics.jsonl, logs/    resolved config; scalars (JSON lines; TensorBoard, + sample grids)
    checkpoint-{step:07d}/               generator.safetensors, generator_ema.safetensors,
                                         fake_score.safetensors, discriminator.safetensors,
                                         optimizers.pt, rng_state_{rank}.pt, config.yaml, state.json
    student/                             the EMA generator: a TMDStudent folder (tmd) or a diffusers
                                         WanTransformer3DModel folder (dmd2v), plus tmd_sampling.json
                                         (method, M, N, shifts) that ``python -m tmd_train.sample`` reads

Randomness: every draw of a step comes from the generator seeded by ``(seed, step, rank)``, in a
fixed order (generator sample: t, x1, y1; generator update: DMD τ, ε, GAN τ, ε; fake score τ, ε;
discriminator τ, ε); the data order is a function of the iteration. So a resumed run repeats the
uninterrupted one exactly. With more than one process, the generator, the fake score and the
frozen teacher are FSDP2-sharded (every block a unit; gloo on CPU); the small discriminator is
replicated (its gradients averaged). Each process draws ``batch_size`` samples per step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import check_fields, config_from_dict, save_config
from .data.format import LatentDataset
from .data.sources import DataSource, collate, masked_text, open_source
from .models.discriminator import (
    Conv3DDiscriminator,
    gan_discriminator_loss,
    gan_generator_loss,
    teacher_block_features,
)
from .models.student import FUSIONS, HEAD_TIMES, TMDStudent
from .models.teacher import _cast_keeping_fp32 as cast_keeping_fp32
from .objectives.dmd import (
    FAKE_TIMES,
    DMDConfig,
    dmd_loss,
    fake_score_loss,
    gan_inputs,
    generator_sample,
    generator_sample_plain,
)
from .objectives.tm_meanflow import sample_outer_time
from .sampling import sample_few_step, sample_tmd
from .schedules import normal, shifted_grid
from .stage1 import _load_teacher, build_models, write_student
from .training import (
    CheckpointWriter,
    NonFiniteGuard,
    ScalarLogger,
    StepBatches,
    StepSampler,
    all_reduce_mean,
    average_gradients,
    clip_grad_norm,
    derive_seed,
    finish_process_group,
    gather_state,
    load_state,
    local_tensor,
    parse_stage_args,
    read_checkpoint_state,
    resolve_resume,
    rng_state,
    seeded_generator,
    set_rng_state,
    shard_fsdp2,
)

METHODS = ("tmd", "dmd2v")
MIXED_PRECISIONS = ("auto", "bf16", "no")
SAMPLING_FILE = "tmd_sampling.json"
OPTIMIZERS = ("generator", "fake_score", "discriminator")
GEN_KEYS = ("loss_g", "loss_dmd", "loss_gan_g", "dmd_grad", "normaliser")
CRITIC_KEYS = ("loss_fake", "loss_d")
KD_KEYS = ("loss_kd",)

#: The no-argument run (the toy world): small enough for a few minutes on CPU.
TOY_STAGE2: dict[str, Any] = dict(
    method="tmd", outer_steps=2, inner_steps=2, head_blocks=1, synthetic_samples=4096, batch_size=4, steps=200,
    lr=1e-4, disc_width=64, disc_groups=16, ema_decay=0.95, checkpoint_every=100, log_every=10, sample_every=50,
    output_dir="runs/stage2-toy")


@dataclass
class Stage2Config:
    """Stage-2 options (YAML + ``key=value`` overrides; see :func:`tmd_train.config.load_config`).

    Model: ``teacher`` (Wan2.1 diffusers folder / transformer folder, or a ``WanTransformer3DModel``
    config mapping for a random teacher seeded by ``seed``), ``method`` (``"tmd"`` | ``"dmd2v"``),
    ``init_student`` (tmd only: a stage-1 ``TMDStudent`` folder; None builds the student from the
    teacher with ``head_blocks``/``fusion``/``head_time``).
    Generator: ``outer_steps`` M, ``inner_steps`` N, ``outer_shift`` γ of the student grid (10),
    ``t_max`` its top (0.999), ``inner_shift``, ``s_max``; ``unroll`` (True: gradients through
    all N inner steps; False: only the last inner step ``s_1 → s_0`` carries gradient, see
    :func:`~tmd_train.objectives.dmd.generator_sample`), ``unroll_checkpoint`` (recompute each
    inner step in backward).
    DMD: ``cfg_scale`` (5), ``t_shift`` γ of τ (5), ``dmd_t_min``/``dmd_t_max`` its clip range,
    ``fake_time``. GAN: ``gan_weight`` λ (0.03; 0 turns the discriminator off), ``disc_blocks``
    (0-based teacher blocks; None: ``default_blocks(L)``), ``disc_width``, ``disc_depth``,
    ``disc_groups``.
    KD warm-up (M = 1 only): ``kd_pairs`` (a ``kd`` dataset from ``python -m tmd_train.kd_pairs``),
    ``kd_steps``, ``kd_lr`` (default ``lr``).
    Data: ``data`` (``"shapes"``, ``"synthetic"`` or a latents dataset folder),
    ``synthetic_samples``, ``synthetic_latent_size``, ``synthetic_text_len``, ``num_workers``.
    Optimisation: ``batch_size`` (per process), ``steps`` (DMD iterations, after ``kd_steps``),
    ``generator_every`` (5), ``lr`` (1e-5, the generator), ``fake_lr``/``disc_lr`` (default ``lr``),
    ``weight_decay``, ``adam_betas``, ``adam_eps``, ``max_grad_norm`` (<= 0: no clipping),
    ``ema_decay``, ``ema_start``, ``mixed_precision`` (``auto``: bf16 autocast on GPU),
    ``gradient_checkpointing``, ``seed``, ``cpu_threads`` (CPU runs: ``torch.set_num_threads``;
    0 keeps torch's default — on a busy machine 1 can be many times faster than oversubscribed
    threads).
    Output: ``output_dir``, ``checkpoint_every``, ``keep_last``, ``log_every``, ``sample_every``
    (sample grid of the EMA generator to TensorBoard every that many steps; 0 = off).
    """

    teacher: str | dict | None = None
    init_student: str | None = None
    method: str = "tmd"
    head_blocks: int = 5
    fusion: str = "gated"
    head_time: str = "outer"

    outer_steps: int = 2
    inner_steps: int = 2
    outer_shift: float = 10.0
    inner_shift: float = 10.0
    t_max: float = 0.999
    s_max: float = 0.999
    unroll: bool = True
    unroll_checkpoint: bool = False

    cfg_scale: float = 5.0
    t_shift: float = 5.0
    dmd_t_min: float = 0.001
    dmd_t_max: float = 0.999
    fake_time: str = "shifted"
    gan_weight: float = 0.03
    disc_blocks: list[int] | None = None
    disc_width: int = 256
    disc_depth: int = 2
    disc_groups: int = 32

    kd_pairs: str | None = None
    kd_steps: int = 0
    kd_lr: float | None = None

    data: str = "synthetic"
    synthetic_samples: int = 64
    synthetic_latent_size: tuple[int, int, int] = (3, 8, 8)
    synthetic_text_len: int = 8
    num_workers: int = 0

    batch_size: int = 1
    steps: int = 1000
    generator_every: int = 5
    lr: float = 1e-5
    fake_lr: float | None = None
    disc_lr: float | None = None
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay: float = 0.99
    ema_start: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    cpu_threads: int = 0

    output_dir: str = "runs/stage2"
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.teacher is None:
            raise ValueError("teacher is required: a Wan2.1 diffusers folder or a WanTransformer3DModel config")
        if isinstance(self.teacher, str) and not self.teacher:
            raise ValueError("teacher must not be empty")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "dmd2v" and self.init_student is not None:
            raise ValueError("init_student applies to method=tmd only (the dmd2v generator is a copy of the teacher)")
        if not self.data:
            raise ValueError("data must be 'shapes', 'synthetic' or a dataset folder")
        check_fields(self, choices={"fusion": FUSIONS, "head_time": HEAD_TIMES, "mixed_precision": MIXED_PRECISIONS,
                                    "fake_time": FAKE_TIMES},
                     positive=("head_blocks", "outer_steps", "inner_steps", "batch_size", "steps", "generator_every",
                               "checkpoint_every", "keep_last", "log_every", "synthetic_samples",
                               "synthetic_text_len", "disc_width", "disc_groups"),
                     non_negative=("num_workers", "seed", "kd_steps", "ema_start", "sample_every", "disc_depth",
                                   "cpu_threads"))
        if self.disc_width % self.disc_groups:
            raise ValueError(f"disc_width ({self.disc_width}) must be divisible by disc_groups ({self.disc_groups})")
        if min(self.synthetic_latent_size) < 1:
            raise ValueError(f"synthetic_latent_size must be positive, got {self.synthetic_latent_size}")
        for name in ("outer_shift", "inner_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("t_max", "s_max"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("lr", "fake_lr", "disc_lr", "kd_lr"):
            v = getattr(self, name)
            if v is not None and (not v > 0 or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.gan_weight >= 0:
            raise ValueError(f"gan_weight must be >= 0, got {self.gan_weight}")
        if self.kd_steps > 0:
            if self.outer_steps != 1:
                raise ValueError(f"kd_steps > 0 (KD warm-up) is only allowed with outer_steps == 1, "
                                 f"got outer_steps={self.outer_steps}")
            if not self.kd_pairs:
                raise ValueError("kd_steps > 0 needs kd_pairs (a 'kd' dataset from python -m tmd_train.kd_pairs)")
        _ = self.dmd_config  # DMDConfig's own checks

    @property
    def dmd_config(self) -> DMDConfig:
        return DMDConfig(t_shift=self.t_shift, t_min=self.dmd_t_min, t_max=self.dmd_t_max,
                         cfg_scale=self.cfg_scale, fake_time=self.fake_time)

    @property
    def total_steps(self) -> int:
        """KD warm-up steps + DMD iterations."""
        return self.kd_steps + self.steps


def default_config() -> Stage2Config:
    """The no-argument run: the toy world (:func:`tmd_train.toy.toy_defaults` with
    :data:`TOY_STAGE2`). Raises FileNotFoundError (saying what to pass) without the toy teacher."""
    from .toy import toy_defaults
    return config_from_dict(Stage2Config, toy_defaults(**TOY_STAGE2))


# ---------------------------------------------------------------------------- model wrappers
class GeneratorModel(nn.Module):
    """The generator's FSDP root: ``forward(x0, x1, t, text, y1)`` returns ``x̂`` (every module call
    of the generator runs inside this root forward)."""

    def __init__(self, generator: TMDStudent | WanTransformer3DModel, method: str, s_grid: torch.Tensor,
                 unroll: bool, checkpoint: bool) -> None:
        super().__init__()
        self.generator = generator
        self.method = method
        self.register_buffer("s_grid", s_grid, persistent=False)
        self.unroll = unroll
        self.checkpoint = checkpoint

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                y1: torch.Tensor | None) -> torch.Tensor:
        if self.method == "tmd":
            return generator_sample(self.generator, x0, x1, t, text, y1, self.s_grid, checkpoint=self.checkpoint,
                                    unroll=self.unroll)
        return generator_sample_plain(self.generator, x0, x1, t, text)


class FrozenTeacher(nn.Module):
    """The frozen teacher's FSDP root. Called like a ``WanTransformer3DModel`` it is one (so
    :func:`~tmd_train.objectives.dmd.dmd_loss` uses it as the real score); :meth:`features`
    returns the discriminator's block features through the same root forward."""

    def __init__(self, teacher: WanTransformer3DModel) -> None:
        super().__init__()
        self.teacher = teacher

    @property
    def patch_embedding(self) -> nn.Module:
        return self.teacher.patch_embedding

    def forward(self, *args: Any, blocks: Sequence[int] | None = None, **kwargs: Any) -> Any:
        if blocks is None:
            return self.teacher(*args, **kwargs)
        return teacher_block_features(self.teacher, *args, blocks)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 blocks: Sequence[int]) -> list[torch.Tensor]:
        return self(x_t, t, text, blocks=tuple(blocks))


def _prefixed(prefix: str, sd: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in sd.items()}


def _strip(prefix: str, sd: dict[str, Any]) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _save_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def write_plain(config: dict, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """A diffusers ``WanTransformer3DModel`` folder from a full state dict (a weightless copy of
    the architecture does the writing)."""
    tcfg = dict(config)
    tcfg["patch_size"] = tuple(tcfg["patch_size"])
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(tcfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.save_pretrained(directory)


def sampling_settings(cfg: Stage2Config) -> dict[str, Any]:
    """What ``tmd_sampling.json`` records: method and the few-step sampler's settings."""
    out = {"method": cfg.method, "outer_steps": cfg.outer_steps, "outer_shift": cfg.outer_shift, "t_max": cfg.t_max}
    if cfg.method == "tmd":
        out.update(inner_steps=cfg.inner_steps, inner_shift=cfg.inner_shift, s_max=cfg.s_max,
                   head_blocks=cfg.head_blocks)
    return out


# ---------------------------------------------------------------------------- trainer
class Stage2Trainer:
    """Holds the run: accelerator, frozen teacher, generator (+ EMA), fake score, discriminator,
    their three AdamW optimizers and the data.

    Args:
        cfg: a :class:`Stage2Config` (validated here).
        source: a data source to use instead of ``cfg.data`` (tests), with its ``negative``
            embedding ``(text_emb [L, D], text_mask [L])``.
    """

    def __init__(self, cfg: Stage2Config, source: DataSource | None = None,
                 negative: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if amp else None
        self.dmd = cfg.dmd_config

        # ---- models (every random init seeded: all processes and restarts build the same)
        if cfg.method == "tmd":
            teacher, generator = build_models(cfg.teacher, cfg.seed, need_teacher=True, init_student=cfg.init_student,
                                              head_blocks=cfg.head_blocks, fusion=cfg.fusion, head_time=cfg.head_time)
            self.teacher_config = generator.teacher_config
            gen_blocks = generator.transformer.blocks
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                teacher = _load_teacher(cfg.teacher)
            generator = copy.deepcopy(teacher)
            self.teacher_config = {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in teacher.config.items() if not k.startswith("_")}
            gen_blocks = generator.blocks
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.disc: Conv3DDiscriminator | None = None
        if cfg.gan_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(cfg.seed, "discriminator"))
                self.disc = Conv3DDiscriminator.for_teacher(teacher, blocks=cfg.disc_blocks, width=cfg.disc_width,
                                                            depth=cfg.disc_depth, groups=cfg.disc_groups)
        teacher.requires_grad_(False).eval()
        if amp:  # the frozen teacher runs in bf16 (Wan's float32 modules stay float32)
            cast_keeping_fp32(teacher, torch.bfloat16)
        generator.to(self.device).train()
        fake.to(self.device)
        teacher.to(self.device)
        if cfg.gradient_checkpointing:
            generator.enable_gradient_checkpointing()
            fake.enable_gradient_checkpointing()
        self.generator = generator
        s_grid = shifted_grid(cfg.inner_steps, cfg.inner_shift, cfg.s_max, device=self.device)
        self.gen_model = GeneratorModel(generator, cfg.method, s_grid, cfg.unroll, cfg.unroll_checkpoint)
        self.fake_score = fake
        self.teacher = FrozenTeacher(teacher)
        self.replicated: list[nn.Parameter] = []
        if self.world > 1:
            self.replicated = shard_fsdp2(self.gen_model, gen_blocks, self.device.type)
            self.replicated += shard_fsdp2(self.fake_score, self.fake_score.blocks, self.device.type)
            shard_fsdp2(self.teacher, teacher.blocks, self.device.type)
        if self.disc is not None:
            self.disc.to(self.device).train()

        # ---- optimizers, EMA, guards
        def adamw(params: Any, lr: float) -> torch.optim.AdamW:
            return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(cfg.adam_betas),
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

        self.roots: dict[str, nn.Module] = {"generator": self.gen_model, "fake_score": self.fake_score}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "generator": adamw(self.gen_model.parameters(), cfg.lr),
            "fake_score": adamw(self.fake_score.parameters(), cfg.fake_lr or cfg.lr)}
        if self.disc is not None:
            self.roots["discriminator"] = self.disc
            self.optimizers["discriminator"] = adamw(self.disc.parameters(), cfg.disc_lr or cfg.lr)
        self.ema = {n: p.detach().clone() for n, p in self.gen_model.named_parameters()}
        self.guards = {name: NonFiniteGuard() for name in self.optimizers}
        self.gen_updates = 0
        self.step = 0

        # ---- data
        if source is None:
            source, negative = open_source(cfg.data, teacher_config=self.teacher_config,
                                           synthetic_samples=cfg.synthetic_samples,
                                           synthetic_latent_size=cfg.synthetic_latent_size,
                                           synthetic_text_len=cfg.synthetic_text_len, seed=cfg.seed)
        elif negative is None:
            raise ValueError("a custom source needs its negative embedding (negative=(text_emb, text_mask))")
        self.source = source
        self.negative_text = masked_text(negative[0].float(), negative[1]).to(self.device)
        self.sampler = StepSampler(len(source), cfg.batch_size, self.world, cfg.seed)
        self.kd_source: LatentDataset | None = None
        if cfg.kd_steps > 0:
            self.kd_source = open_kd(cfg.kd_pairs, self.teacher_config)
            self.kd_sampler = StepSampler(len(self.kd_source), cfg.batch_size, self.world,
                                          derive_seed(cfg.seed, "kd"))

    # ------------------------------------------------------------------ data
    def _loader(self, sampler: StepSampler, first: int, last: int, collate_fn: Any,
                source: Any) -> Iterator[dict[str, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            source, batch_sampler=StepBatches(sampler, first, last, [self.rank]), collate_fn=collate_fn,
            num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def batches(self, first_step: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of steps ``first_step..cfg.total_steps`` (KD batches, then data batches of
        DMD iterations ``first - kd_steps ..``), on the device."""
        cfg = self.cfg
        if first_step <= cfg.kd_steps:
            yield from self._loader(self.kd_sampler, first_step, cfg.kd_steps, kd_collate, self.kd_source)
        first_iter = max(first_step - cfg.kd_steps, 1)
        yield from self._loader(self.sampler, first_iter, cfg.steps, collate, self.source)

    # ------------------------------------------------------------------ pieces
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def is_generator_step(self, step: int) -> bool:
        """Whether DMD step ``step`` (global counter) updates the generator."""
        i = step - self.cfg.kd_steps
        return i >= 1 and i % self.cfg.generator_every == 0

    def _update(self, name: str, loss: torch.Tensor, lr: float | None = None) -> tuple[float, bool]:
        """Backward has run: average replicated grads, clip, guard, step (or skip), zero grads."""
        opt = self.optimizers[name]
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        params = [p for g in opt.param_groups for p in g["params"]]
        if name == "discriminator":
            average_gradients(params)
        else:
            average_gradients([p for p in self.replicated if any(p is q for q in params)])
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = clip_grad_norm(params, max_norm)
        stepped = self.guards[name].ok(loss.detach().double().cpu(), grad_norm)
        if stepped:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(grad_norm), stepped

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema ← d·ema + (1-d)·w`` (a copy during the first ``ema_start`` generator updates)."""
        self.gen_updates += 1
        copy_only = self.gen_updates <= self.cfg.ema_start
        for n, p in self.gen_model.named_parameters():
            if copy_only:
                self.ema[n].copy_(p.detach())
            else:
                self.ema[n].lerp_(p.detach(), 1.0 - self.cfg.ema_decay)

    def generator_draws(self, x0: torch.Tensor, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(t, x1, y1)`` of the generator sample (``t`` on the M-step student grid)."""
        cfg = self.cfg
        t = sample_outer_time(x0.shape[0], cfg.outer_steps, cfg.outer_shift, cfg.t_max, gen, self.device)
        x1 = normal(tuple(x0.shape), gen, self.device, x0.dtype)
        y1 = normal(tuple(x0.shape), gen, self.device, x0.dtype) if cfg.method == "tmd" else None
        return t, x1, y1

    # ------------------------------------------------------------------ steps
    def kd_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One KD warm-up step: ``x̂ = noise - t_max·InnerFlow(backbone(noise, t_max))`` (or
        ``- t_max·v``) regressed onto the teacher sample: ``mean((x̂ - target)²)``."""
        cfg = self.cfg
        gen = seeded_generator(cfg.seed, step, self.rank, self.device)
        noise, target, text = batch["noise"], batch["target"], batch["text"]
        t = torch.full((noise.shape[0],), cfg.t_max, dtype=torch.float64, device=self.device)
        y1 = normal(tuple(noise.shape), gen, self.device, noise.dtype) if cfg.method == "tmd" else None
        with self._autocast():
            x_hat = self.gen_model(noise, noise, t, text, y1)
            loss = F.mse_loss(x_hat.float(), target.float())
        loss.backward()
        grad_norm, _ = self._update("generator", loss, cfg.kd_lr or cfg.lr)
        self.update_ema()
        return {"loss_kd": float(loss.detach()), "grad_norm_g": grad_norm}

    def dmd_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One DMD iteration (module docstring): generator update when due, then fake score and
        discriminator updates. Returns this process's scalars."""
        cfg = self.cfg
        gen = seeded_generator(cfg.seed, step, self.rank, self.device)
        x0, text = batch["latents"], batch["text"]
        t, x1, y1 = self.generator_draws(x0, gen)
        logs: dict[str, float] = {}
        if self.is_generator_step(step):
            with self._autocast():
                x_hat = self.gen_model(x0, x1, t, text, y1)
                dmd, dlog = dmd_loss(x_hat, self.teacher, self.fake_score, text, self.negative_text, self.dmd, gen)
                loss = dmd["loss"]
                gan = torch.zeros((), device=self.device)
                if self.disc is not None:
                    _, fake_t, tau = gan_inputs(x0, x_hat, self.dmd, gen)
                    gan = gan_generator_loss(self.disc, None, fake_t, tau, text, features=self.teacher.features)
                    loss = loss + cfg.gan_weight * gan
            loss.backward()
            grad_norm, _ = self._update("generator", loss, cfg.lr)
            self.update_ema()
            x_hat = x_hat.detach()
            logs.update(loss_g=float(loss.detach()), loss_dmd=float(dlog["loss"]), loss_gan_g=float(gan.detach()),
                        dmd_grad=float(dlog["grad_norm"]), normaliser=float(dlog["normaliser"]),
                        grad_norm_g=grad_norm)
        else:
            with torch.no_grad(), self._autocast():
                x_hat = self.gen_model(x0, x1, t, text, y1)
        with self._autocast():
            fl, _ = fake_score_loss(self.fake_score, x_hat, text, self.dmd, gen)
        fl["loss"].backward()
        logs["grad_norm_fake"], _ = self._update("fake_score", fl["loss"])
        logs["loss_fake"] = float(fl["loss"].detach())
        if self.disc is not None:
            with self._autocast():
                real_t, fake_t, tau = gan_inputs(x0, x_hat, self.dmd, gen)
                dl = gan_discriminator_loss(self.disc, None, real_t, fake_t, tau, text, features=self.teacher.features)
            dl.backward()
            logs["grad_norm_d"], _ = self._update("discriminator", dl)
            logs["loss_d"] = float(dl.detach())
        return logs

    # ------------------------------------------------------------------ state
    def full_ema(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies of the EMA weights, keyed like the generator's parameters
        (``generator.…``; collective under FSDP)."""
        return {n: local_tensor(v).detach().cpu().clone() for n, v in self.ema.items()}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's full state dict (prefix stripped) with the EMA weights (collective)."""
        model_sd, _ = gather_state(self.gen_model)
        model_sd.update(self.full_ema())
        return _strip("generator.", model_sd)

    def _set_ema(self, full: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor
        for n, p in self.gen_model.named_parameters():
            value = full[n].to(device=self.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements)
            self.ema[n] = value.detach().clone()

    def save_checkpoint(self, writer: CheckpointWriter, step: int) -> Path:
        def write(folder: Path, is_main: bool) -> None:
            torch.save(rng_state(), folder / f"rng_state_{self.rank}.pt")
            optim: dict[str, Any] = {}
            for name, root in self.roots.items():
                # An optimizer that has not stepped yet is saved as None: gathering its state would
                # initialise it (torch.distributed.checkpoint runs a zero-lr step), so a checkpoint
                # would change the run (AdamW's step count).
                opt = self.optimizers[name] if self.optimizers[name].state else None
                model_sd, optim[name] = gather_state(root, opt)
                if is_main:
                    _save_tensors(model_sd, folder / f"{name}.safetensors")
            ema = self.full_ema()
            if is_main:
                _save_tensors(ema, folder / "generator_ema.safetensors")
                torch.save(optim, folder / "optimizers.pt")
                save_config(self.cfg, folder / "config.yaml")
        state = {"world_size": self.world, "generator_updates": self.gen_updates,
                 "skipped_steps": {name: g.skipped for name, g in self.guards.items()}}
        return writer.save(step, write, state)

    def load_checkpoint(self, folder: Path) -> int:
        """Restore all models, the EMA, the optimizers, RNG states and counters; returns the step."""
        state = read_checkpoint_state(folder)
        optim = torch.load(folder / "optimizers.pt", map_location="cpu", weights_only=False)
        for name, root in self.roots.items():
            opt = self.optimizers[name] if optim[name] is not None else None
            load_state(root, load_file(str(folder / f"{name}.safetensors")), opt, optim[name])
        self._set_ema(load_file(str(folder / "generator_ema.safetensors")))
        rng_file = folder / f"rng_state_{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        for name, n in state.get("skipped_steps", {}).items():
            self.guards[name].skipped = int(n)
        self.gen_updates = int(state.get("generator_updates", 0))
        self.step = int(state["step"])
        return self.step

    def write_generator(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        """The generator folder (main process): TMDStudent (tmd) or Wan transformer (dmd2v), plus
        ``tmd_sampling.json``."""
        if self.cfg.method == "tmd":
            write_student(self.generator, state_dict, directory)
        else:
            write_plain(self.teacher_config, state_dict, directory)
        (directory / SAMPLING_FILE).write_text(json.dumps(sampling_settings(self.cfg), indent=1) + "\n")

    def save_final(self, directory: Path) -> None:
        sd = self.ema_state_dict()
        if self.is_main:
            self.write_generator(sd, directory)

    # ------------------------------------------------------------------ samples
    def ema_generator(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """An unsharded generator with the EMA weights (on this device, eval mode)."""
        tcfg = dict(self.teacher_config)
        tcfg["patch_size"] = tuple(tcfg["patch_size"])
        with init_empty_weights(include_buffers=False):
            model: nn.Module = WanTransformer3DModel.from_config(tcfg)
            if self.cfg.method == "tmd":
                model = TMDStudent(model, dataclasses.replace(self.generator.config))
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(self.device).eval()

    @torch.no_grad()
    def sample_grid(self, n: int = 4) -> torch.Tensor | None:
        """``[3, H, n·W]`` image in [0, 1]: the middle frame of EMA samples for the first ``n``
        prompts of the data (fixed noise); None on other processes (collective)."""
        sd = self.ema_state_dict()
        if not self.is_main:
            return None
        cfg = self.cfg
        items = [self.source[i] for i in range(min(n, len(self.source)))]
        batch = collate(items)
        text = batch["text"].to(self.device)
        shape = tuple(batch["latents"].shape)
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "samples"))
        model = self.ema_generator(sd)
        if cfg.method == "tmd":
            x = sample_tmd(model, text, shape=shape, generator=g, M=cfg.outer_steps, N=cfg.inner_steps,
                           outer_shift=cfg.outer_shift, inner_shift=cfg.inner_shift, t_max=cfg.t_max,
                           s_max=cfg.s_max).x0
        else:
            x = sample_few_step(model, text, shape=shape, generator=g, steps=cfg.outer_steps, shift=cfg.outer_shift,
                                t_max=cfg.t_max).x0
        frames = x[:, :, x.shape[2] // 2].float().cpu()                          # [n, C, H, W]
        if frames.shape[1] == 3:
            frames = (frames.clamp(-1, 1) + 1) / 2                               # pixel clips in [-1, 1]
        else:
            frames = frames[:, :3] if frames.shape[1] >= 3 else frames[:, :1].expand(-1, 3, -1, -1)
            lo, hi = frames.amin(dim=(1, 2, 3), keepdim=True), frames.amax(dim=(1, 2, 3), keepdim=True)
            frames = (frames - lo) / (hi - lo).clamp(min=1e-6)
        return torch.cat(list(frames), dim=2)

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None) -> Path:
        """Train to ``cfg.total_steps`` (resuming from ``resume``: ``"latest"`` or a checkpoint
        folder); returns the final student folder."""
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
        total = cfg.total_steps
        progress = tqdm(total=total, initial=self.step, disable=not self.is_main, desc=f"stage2 {cfg.method}")
        self.timings: dict[str, list[float]] = {"kd": [], "generator": [], "critic": []}
        try:
            for step, batch in zip(range(self.step + 1, total + 1), self.batches(self.step + 1), strict=True):
                t0 = time.perf_counter()
                if step <= cfg.kd_steps:
                    kind, logs = "kd", self.kd_step(step, batch)
                else:
                    kind = "generator" if self.is_generator_step(step) else "critic"
                    logs = self.dmd_step(step, batch)
                self.timings[kind].append(time.perf_counter() - t0)
                keys = sorted(logs)
                values = all_reduce_mean(torch.tensor([logs[k] for k in keys], dtype=torch.float64))
                scalars = dict(zip(keys, values.tolist(), strict=True))
                self.step = step
                progress.update(1)
                progress.set_postfix({k: f"{v:.4f}" for k, v in scalars.items() if k.startswith("loss")})
                if step % cfg.log_every == 0 or step == total or kind == "generator":
                    scalars.update({f"skipped_{k}": float(g.skipped) for k, g in self.guards.items()})
                    scalars["generator_updates"] = float(self.gen_updates)
                    logger.log(step, scalars)
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == total):
                    grid = self.sample_grid()
                    if grid is not None and logger.writer is not None:
                        logger.writer.add_image("samples_ema", grid, step)
                if step % cfg.checkpoint_every == 0 or step == total:
                    self.save_checkpoint(writer, step)
            final = out / "student"
            self.save_final(final)
        finally:
            progress.close()
            logger.close()
        return final

    def timing_summary(self) -> str:
        """Mean seconds per iteration of each kind run by the last :meth:`fit`."""
        parts = [f"{k} {sum(v) / len(v):.3f} s/iter ({len(v)})" for k, v in getattr(self, "timings", {}).items() if v]
        return ", ".join(parts) or "no iterations"


# ---------------------------------------------------------------------------- KD data
def kd_collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``kd`` dataset items: ``noise``, ``target`` ``[B, C, F, H, W]`` (float32), ``text``."""
    return {"noise": torch.stack([it["noise"] for it in items]).float(),
            "target": torch.stack([it["target"] for it in items]).float(),
            "text": masked_text(torch.stack([it["text_emb"] for it in items]).float(),
                                torch.stack([it["text_mask"] for it in items]))}


def open_kd(folder: str, teacher_config: dict) -> LatentDataset:
    """The ``kd`` dataset of ``kd_pairs`` (checked against the teacher's channels and text width)."""
    ds = LatentDataset(folder)
    if ds.kind != "kd":
        raise ValueError(f"kd_pairs {folder} holds {ds.kind!r} samples; it must be a 'kd' dataset "
                         "(python -m tmd_train.kd_pairs)")
    if ds.shapes["noise"][0] != teacher_config["in_channels"] or ds.shapes["text_emb"][1] != teacher_config["text_dim"]:
        raise ValueError(f"kd_pairs {folder}: noise {ds.shapes['noise']} / text_emb {ds.shapes['text_emb']} do not "
                         f"fit the teacher (in_channels={teacher_config['in_channels']}, "
                         f"text_dim={teacher_config['text_dim']})")
    return ds


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> tuple[Stage2Config, str | None]:
    return parse_stage_args("stage2", Stage2Config, default_config, __doc__.split("\n\n")[0], argv,
                            usage="[init_student=<stage-1 student>] [method=tmd|dmd2v] ")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    trainer = Stage2Trainer(cfg)
    final = trainer.fit(resume)
    if trainer.is_main:
        skipped = ", ".join(f"{k} {g.skipped}" for k, g in trainer.guards.items())
        print(f"stage2 ({cfg.method}): {trainer.step} steps ({trainer.gen_updates} generator updates), "
              f"skipped: {skipped}; {trainer.timing_summary()}; student written to {final}")
    finish_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
