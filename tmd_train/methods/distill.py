"""Stage 2: DMD2-v distillation (docs/design.md §1.5), the part every stage-2 method
shares; the generator network is the method's (``tmd``: :mod:`.tmd`, ``dmd2v``: :mod:`.dmd2v`).

Models: the generator (the method's), the real score (the frozen teacher, CFG ``dmd.cfg_scale``
with the data's negative-prompt embedding), the fake score (a trainable copy of the teacher, or
with ``fake_score.kind=lora`` LoRA adapters on the frozen teacher: docs/design.md §7.3) and the
discriminator (Conv3D heads on unpatchified frozen-teacher features, ``disc_blocks``).

Iterations (the step counter counts both phases): steps ``1..kd_steps`` are the KD warm-up
(``outer_steps == 1`` only: the one-step output from noise, ``x̂ = x - t_max·(generator velocity)``,
regressed (MSE) onto the teacher's ODE samples of the ``kd_pairs`` dataset; only the generator's
optimizer steps, at ``kd_lr``); steps ``kd_steps+1 .. kd_steps+steps`` are the DMD iterations
``i = 1..steps``. Each DMD iteration draws a generator sample ``x̂`` (student-grid ``t`` with shift
``outer_shift``, ``x_t`` noised from data; see :mod:`tmd_train.objectives.dmd`); when
``i % generator_every == 0`` the generator takes a step on ``L_dmd + gan_weight·L_gan`` (and the
EMA is updated); then, every iteration, the fake score steps on its flow-matching loss on
``sg(x̂)`` and the discriminator on its GAN loss (real = noised data, fake = noised ``sg(x̂)``).
The critics see the ``x̂`` drawn before the generator's update, as in DMD2. Each of the three
AdamW optimizers has its own non-finite guard (skip and count).

EMA (``ema_decay``, default 0.99): updated after every generator update, ``ema ← d·ema + (1-d)·w``;
during the first ``ema_start`` generator updates it just copies the weights. The EMA weights are
what ``student/`` and the sample grids use.

Checkpoint files: ``dcp/`` (generator, EMA, fake score, discriminator and the optimizers that have
stepped, each process its shards; docs/design.md §6.5) and ``export/``; the export
(``<output_dir>/student``, streamed one weight at a time) is the EMA generator plus
``tmd_sampling.json`` (method, M, N, shifts), which ``python -m tmd_train.sample`` reads.

Randomness: every draw of a micro-batch comes from the generator seeded by ``(seed, step, c)``,
``c = rank·grad_accum_steps + micro`` (``c = rank`` without accumulation), in a fixed order
(generator sample: t, x1, [y1]; generator update: DMD τ, ε, GAN τ, ε; fake score τ, ε;
discriminator τ, ε); the data order is a function of the iteration. So a resumed run repeats the
uninterrupted one exactly. With more than one process, the generator, the fake score and the
frozen teacher are FSDP2-sharded (every block a unit; gloo on CPU); the small discriminator is
replicated (its gradients averaged). Each process draws ``grad_accum_steps`` micro-batches of
``batch_size`` samples per step; every update accumulates over them (docs/design.md §7.4).
Memory features (bf16 FSDP2 all-gathers, teacher checkpointing, the LoRA fake score, meta-device
loading of folder teachers): docs/design.md §7.
"""
from __future__ import annotations

import abc
import copy
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..data.format import LatentDataset
from ..data.sources import DataSource, collate, masked_text
from ..engine.checkpoint import EXPORT_SPEC_DIR, load_sharded, module_state, restore_module, save_sharded
from ..engine.config import TrainConfig, check_fields, check_learning_rates
from ..engine.consolidate import ExportSpec, flatten, write_export_live
from ..engine.data import StepSampler, open_training_data, step_loader
from ..engine.distributed import local_tensor, materialize, replicated_parameters, shard_fsdp2
from ..engine.ema import EMA
from ..engine.logging import ScalarLogger, warn
from ..engine.optim import NonFiniteGuard, adamw, guarded_update
from ..engine.seeding import derive_seed, seeded_generator
from ..engine.trainer import Method
from ..errors import DataError
from ..models.attention import set_attention_backend
from ..models.discriminator import (
    Conv3DDiscriminator,
    gan_discriminator_loss,
    gan_generator_loss,
    teacher_block_features,
)
from ..models.student import FUSIONS, HEAD_TIMES, TMDStudent
from ..models.teacher import cast_keeping_fp32
from ..objectives.dmd import DMDConfig, dmd_loss, fake_score_loss, gan_inputs
from ..objectives.tm_meanflow import sample_outer_time
from ..schedules import normal
from .exporting import plain_files, student_files
from .networks import FakeScoreConfig, add_lora, is_adapter_name, set_adapters, to_device
from .registry import METHODS, check_method

SAMPLING_FILE = "tmd_sampling.json"
COLLAPSE_FILE = "collapse_checks.jsonl"  # the sample grids' collapse checks, one JSON line per check


@dataclass
class Stage2Config(TrainConfig):
    """Stage-2 options: the shared :class:`~tmd_train.engine.config.TrainConfig` fields, plus these
    (the DMD loss's as ``dmd.<key>``, see :class:`~tmd_train.objectives.dmd.DMDConfig`).

    Attributes:
        method: "tmd" (DMD2-v with the TMD student) or "dmd2v" (the plain few-step baseline).
        init_student: tmd only: a stage-1 TMDStudent folder (None: build it from the teacher).
        head_blocks: H, the teacher's last blocks that form the flow head (without init_student).
        fusion: "gated" or "concat" (without init_student).
        head_time: "outer" or "inner" (without init_student).
        outer_steps: M, the generator's outer steps.
        inner_steps: N, the flow head's inner steps.
        outer_shift: shift γ of the student's outer time grid.
        inner_shift: shift γ of the inner grid.
        t_max: top of the outer grid.
        s_max: top of the inner grid.
        unroll: gradients through all N inner steps (false: only the last inner step carries gradient).
        unroll_checkpoint: recompute each inner step in backward (less memory).
        dmd: the DMD and fake-score losses' options.
        fake_score: the fake score's form (full copy or LoRA on the teacher), see FakeScoreConfig.
        teacher_checkpointing: recompute each frozen-teacher block in backward in the GAN
            generator loss's feature pass (the only teacher pass with gradients; null: as
            gradient_checkpointing).
        grad_accum_steps: micro-batches of batch_size samples per process that every update
            (generator, fake score, discriminator, KD) accumulates; global batch = processes ×
            batch_size × grad_accum_steps.
        gan_weight: λ of the GAN loss (0 turns the discriminator off).
        disc_blocks: 0-based teacher blocks feeding the discriminator (null: default_blocks(L)).
        disc_width: channels of every discriminator head.
        disc_depth: strided conv layers per discriminator head.
        disc_groups: GroupNorm groups of the discriminator (must divide disc_width).
        kd_pairs: a "kd" dataset from python -m tmd_train.kd_pairs (the KD warm-up, M = 1 only).
        kd_steps: KD warm-up steps before the DMD iterations.
        kd_lr: learning rate of the KD warm-up (null: lr).
        steps: DMD iterations (after kd_steps).
        generator_every: one generator update every that many iterations.
        lr: the generator's AdamW learning rate.
        fake_lr: the fake score's learning rate (null: lr).
        disc_lr: the discriminator's learning rate (null: lr).
        ema_decay: decay of the generator's EMA (the exported weights).
        ema_start: generator updates before the EMA starts.
        sample_every: steps between EMA sample grids in TensorBoard (0: off).
    """

    method: str = "tmd"
    init_student: str | None = None
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

    dmd: DMDConfig = field(default_factory=DMDConfig)
    fake_score: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    teacher_checkpointing: bool | None = None
    grad_accum_steps: int = 1
    gan_weight: float = 0.03
    disc_blocks: list[int] | None = None
    disc_width: int = 256
    disc_depth: int = 2
    disc_groups: int = 32

    kd_pairs: str | None = None
    kd_steps: int = 0
    kd_lr: float | None = None

    generator_every: int = 5
    lr: float = 1e-5
    fake_lr: float | None = None
    disc_lr: float | None = None
    ema_decay: float = 0.99
    ema_start: int = 0
    output_dir: str = "runs/stage2"
    sample_every: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        super().validate()
        check_method(self)
        METHODS[self.method].check_config(self)
        check_fields(self, choices={"fusion": FUSIONS, "head_time": HEAD_TIMES},
                     positive=("head_blocks", "outer_steps", "inner_steps", "generator_every", "disc_width",
                               "disc_groups", "grad_accum_steps"),
                     non_negative=("kd_steps", "ema_start", "sample_every", "disc_depth"))
        if self.disc_width % self.disc_groups:
            raise ValueError(f"disc_width ({self.disc_width}) must be divisible by disc_groups ({self.disc_groups})")
        for name in ("outer_shift", "inner_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("t_max", "s_max"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        check_learning_rates(self, ("fake_lr", "disc_lr", "kd_lr"))
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

    @property
    def total_steps(self) -> int:
        """KD warm-up steps + DMD iterations."""
        return self.kd_steps + self.steps

    @property
    def checkpoint_teacher(self) -> bool:
        """Whether the teacher's GAN feature pass recomputes its blocks in backward."""
        return self.gradient_checkpointing if self.teacher_checkpointing is None else self.teacher_checkpointing


class FrozenTeacher(nn.Module):
    """The frozen teacher's FSDP root. Called like a ``WanTransformer3DModel`` it is one (so
    :func:`~tmd_train.objectives.dmd.dmd_loss` uses it as the real score); :meth:`features`
    returns the discriminator's block features through the same root forward.

    With LoRA adapters (``fake_score.kind=lora``) every call states whether they are on
    (``adapters=True``: the fake score, see :class:`LoRAFakeScore`) or off (the real score, the
    features); outside a call they are off. ``checkpoint``: the feature pass recomputes each block
    in backward. Every recomputation in backward (this one and diffusers' gradient checkpointing
    of the teacher's own forward) runs with the adapters as they were in the forward."""

    def __init__(self, teacher: WanTransformer3DModel, checkpoint: bool = False) -> None:
        super().__init__()
        self.teacher = teacher
        self.checkpoint = checkpoint
        self.has_adapters = any(is_adapter_name(n) for n, _ in teacher.named_parameters())
        self._adapters_on = False
        if self.has_adapters:
            self._switch(False)

    @property
    def patch_embedding(self) -> nn.Module:
        return self.teacher.patch_embedding

    def _switch(self, on: bool) -> None:
        set_adapters(self.teacher, on)
        self._adapters_on = on

    def recompute(self, function: Callable[..., Any], *args: Any) -> Any:
        """``torch.utils.checkpoint`` of ``function(*args)`` (non-reentrant) whose recomputation
        switches the adapters as they are now."""
        on = self._adapters_on

        def run(*inputs: Any) -> Any:
            before = self._adapters_on
            if self.has_adapters:
                self._switch(on)
            try:
                return function(*inputs)
            finally:
                if self.has_adapters:
                    self._switch(before)
        return torch_checkpoint(run, *args, use_reentrant=False)

    def forward(self, *args: Any, blocks: Sequence[int] | None = None, adapters: bool = False, **kwargs: Any) -> Any:
        if adapters and not self.has_adapters:
            raise ValueError("this teacher has no LoRA adapters")
        before = self._adapters_on
        if self.has_adapters:
            self._switch(adapters)
        try:
            if blocks is None:
                return self.teacher(*args, **kwargs)
            return teacher_block_features(self.teacher, *args, blocks,
                                          checkpoint=self.recompute if self.checkpoint else False)
        finally:
            if self.has_adapters:
                self._switch(before)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 blocks: Sequence[int]) -> list[torch.Tensor]:
        return self(x_t, t, text, blocks=tuple(blocks))


class LoRAFakeScore(nn.Module):
    """The fake score of ``fake_score.kind=lora``: the shared frozen teacher (its FSDP root
    ``root``, a :class:`FrozenTeacher`) with its LoRA adapters on. Called like a
    ``WanTransformer3DModel`` it runs ``root(..., adapters=True)``; its parameters and state dict
    are the adapters' only (what the fake score's optimizer trains and the checkpoints hold),
    registered as ``adapters.<module path with '-' for '.'>-lora_A`` / ``-lora_B``."""

    def __init__(self, root: FrozenTeacher) -> None:
        super().__init__()
        object.__setattr__(self, "root", root)  # not a submodule: the teacher's weights are not the fake score's
        adapters = nn.ModuleDict()
        for name, module in root.named_modules():
            for part in ("lora_A", "lora_B"):
                sub = getattr(module, part, None)
                if isinstance(sub, nn.ModuleDict) and len(sub):
                    adapters[f"{name.replace('.', '-')}-{part}"] = sub
        self.adapters = adapters

    @property
    def patch_embedding(self) -> nn.Module:
        return self.root.patch_embedding

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.root(*args, adapters=True, **kwargs)


# ---------------------------------------------------------------------------- KD data
def kd_collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``kd`` dataset items: ``noise``, ``target`` ``[B, C, F, H, W]`` (float32), ``text``."""
    return {"noise": torch.stack([it["noise"] for it in items]).float(),
            "target": torch.stack([it["target"] for it in items]).float(),
            "text": masked_text(torch.stack([it["text_emb"] for it in items]).float(),
                                torch.stack([it["text_mask"] for it in items]))}


def open_kd(folder: str, teacher_config: dict, t_max: float | None = None) -> Any:
    """The KD pairs of ``kd_pairs``: a ``kd`` dataset (``python -m tmd_train.kd_pairs``) or a
    teacher-synthesised ``latents`` dataset that stores each clip's start noise (``python -m
    tmd_train.prepare synthetic``), read as ``{"noise", "target", "text_emb", "text_mask"}`` items
    (:class:`~tmd_train.data.sources.KDView`); checked against the teacher's channels and text width and,
    given the student's ``t_max``, against the time the teacher's ODE started from (the dataset's
    ``metadata.t_max``; data without it are accepted)."""
    from ..data.sources import KDView

    ds = LatentDataset(folder)
    if ds.kind != "kd" and "noise" not in ds.tensor_keys:
        raise DataError(f"kd_pairs {folder} holds {ds.kind!r} samples without their start noise; it must be a 'kd' "
                        "dataset (python -m tmd_train.kd_pairs) or a teacher-synthesised dataset (python -m "
                        "tmd_train.prepare synthetic)")
    view = KDView(ds)
    if view.shapes["noise"][0] != teacher_config["in_channels"] or \
            view.shapes["text_emb"][1] != teacher_config["text_dim"]:
        raise DataError(f"kd_pairs {folder}: noise {view.shapes['noise']} / text_emb {view.shapes['text_emb']} do "
                        f"not fit the teacher (in_channels={teacher_config['in_channels']}, "
                        f"text_dim={teacher_config['text_dim']})")
    start = ds.metadata.get("t_max")
    if t_max is not None and start is not None and abs(float(start) - float(t_max)) > 1e-9:
        raise DataError(f"kd_pairs {folder}: the teacher's ODE started at t = {start:g} but the student takes the "
                        f"noise as x at t_max = {t_max:g}; write the pairs with --t-max {t_max:g} (or set "
                        f"t_max={start:g})")
    return view


# ---------------------------------------------------------------------------- accumulation
def _backward(loss: torch.Tensor, micro_batches: int) -> None:
    """Backward of one micro-batch's loss, scaled by ``1 / micro_batches`` (unscaled for one)."""
    (loss / micro_batches if micro_batches > 1 else loss).backward()


def _mean(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the micro-batches' detached losses (the loss itself for one)."""
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


# ---------------------------------------------------------------------------- the shared method
class Distillation(Method):
    """What the stage-2 methods share: frozen teacher, fake score, discriminator, the three AdamW
    optimizers with their guards, the generator's EMA, the data (+ KD pairs), the DMD/KD steps,
    checkpoints, sample grids and the export. A subclass supplies the generator network:

    * :meth:`build_generator` -> ``(teacher, generator, generator blocks, teacher config)``;
    * :meth:`generator_root` -> the generator's FSDP root, ``forward(x0, x1, t, text, y1) -> x̂``;
    * :meth:`inner_noise` -> the generator's extra noise ``y1`` (or None);
    * :meth:`empty_generator`, :meth:`write_generator`, :meth:`sample` and :meth:`sampling_settings`.

    Args:
        cfg: a :class:`Stage2Config` (validated here).
        source: a data source to use instead of ``cfg.data`` (tests), with its ``negative``
            embedding ``(text_emb [L, D], text_mask [L])``.
    """

    config_cls = Stage2Config

    def __init__(self, cfg: Stage2Config, source: DataSource | None = None,
                 negative: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(cfg)
        self.dmd = cfg.dmd

        # ---- models (every random init seeded: all processes and restarts build the same)
        teacher, generator, gen_blocks, self.teacher_config = self.build_generator()
        lora = cfg.fake_score.kind == "lora"
        fake = None if lora else copy.deepcopy(teacher).train().requires_grad_(True)
        self.disc: Conv3DDiscriminator | None = None
        if cfg.gan_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(cfg.seed, "discriminator"))
                self.disc = Conv3DDiscriminator.for_teacher(teacher, blocks=cfg.disc_blocks, width=cfg.disc_width,
                                                            depth=cfg.disc_depth, groups=cfg.disc_groups)
        teacher.requires_grad_(False).eval()
        if self.autocast_dtype is not None:  # the frozen teacher runs in bf16 (Wan's fp32 modules stay fp32)
            cast_keeping_fp32(teacher, self.autocast_dtype)
        if lora:  # the fake score: float32 adapters on the frozen teacher (B = 0: the teacher at init)
            add_lora(teacher, cfg.fake_score, cfg.seed)
        to_device(generator, self.device).train()
        to_device(teacher, self.device)
        self.teacher = FrozenTeacher(teacher, checkpoint=cfg.checkpoint_teacher)
        if lora:
            fake = LoRAFakeScore(self.teacher)
        else:
            to_device(fake, self.device)
        if cfg.gradient_checkpointing:
            generator.enable_gradient_checkpointing()
            if lora:  # the fake score's forward is the teacher's: recompute with the adapters on
                teacher.enable_gradient_checkpointing(self.teacher.recompute)
            else:
                fake.enable_gradient_checkpointing()
        for net in (generator, teacher) if lora else (generator, teacher, fake):
            set_attention_backend(net, cfg.attention_backend, device=self.device)
        self.generator = generator
        self.gen_model = self.generator_root(generator)
        self.fake_score = fake
        self.replicated: dict[str, list[nn.Parameter]] = {"generator": [], "fake_score": []}
        if self.world > 1:
            # trainable networks: bf16 all-gathers and compute, float32 gradient reduction (docs/design.md §7);
            # the frozen teacher all-gathers as stored (bf16 with Wan's float32 modules, + float32 adapters)
            mp = {}
            if self.autocast_dtype is not None:
                mp = {"param_dtype": self.autocast_dtype, "reduce_dtype": torch.float32}
            mesh = self.ctx.mesh
            self.replicated["generator"] = shard_fsdp2(self.gen_model, gen_blocks, self.device.type, mesh=mesh, **mp)
            if not lora:
                self.replicated["fake_score"] = shard_fsdp2(self.fake_score, self.fake_score.blocks,
                                                            self.device.type, mesh=mesh, **mp)
            shard_fsdp2(self.teacher, teacher.blocks, self.device.type, mesh=mesh)
        # models of a folder were built on the meta device: each process reads its shards now
        for root in (self.gen_model, self.teacher) if lora else (self.gen_model, self.fake_score, self.teacher):
            materialize(root, self.device)
        if self.world > 1:
            self.replicated["generator"] = replicated_parameters(self.gen_model)
            if not lora:
                self.replicated["fake_score"] = replicated_parameters(self.fake_score)
        if self.disc is not None:
            self.disc.to(self.device).train()

        # ---- optimizers, EMA, guards
        self.roots: dict[str, nn.Module] = {"generator": self.gen_model, "fake_score": self.fake_score}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "generator": adamw(self.gen_model.parameters(), cfg, cfg.lr),
            "fake_score": adamw(self.fake_score.parameters(), cfg, cfg.fake_lr or cfg.lr)}
        if self.disc is not None:
            self.roots["discriminator"] = self.disc
            self.optimizers["discriminator"] = adamw(self.disc.parameters(), cfg, cfg.disc_lr or cfg.lr)
            self.replicated["discriminator"] = list(self.disc.parameters())
        self.ema = EMA(self.gen_model, cfg.ema_decay, cfg.ema_start)
        self.guards = {name: NonFiniteGuard() for name in self.optimizers}

        # ---- data
        self.source, self.negative_text = open_training_data(cfg, self.teacher_config, self.device, source, negative)
        self.sampler = StepSampler(len(self.source), cfg.batch_size, self.world * cfg.grad_accum_steps, cfg.seed)
        self.chunks = [self.rank * cfg.grad_accum_steps + m for m in range(cfg.grad_accum_steps)]
        self.kd_source: LatentDataset | None = None
        if cfg.kd_steps > 0:
            self.kd_source = open_kd(cfg.kd_pairs, self.teacher_config, t_max=cfg.t_max)
            self.kd_sampler = StepSampler(len(self.kd_source), cfg.batch_size, self.world * cfg.grad_accum_steps,
                                          derive_seed(cfg.seed, "kd"))

    # ------------------------------------------------------------------ the generator (subclasses)
    @classmethod
    def check_config(cls, cfg: Stage2Config) -> None:
        """Method-specific config checks (ValueError naming the key)."""

    @abc.abstractmethod
    def build_generator(self) -> tuple[WanTransformer3DModel, nn.Module, nn.ModuleList, dict[str, Any]]:
        """``(teacher, generator, generator's transformer blocks, teacher config)`` on CPU, float32."""

    @abc.abstractmethod
    def generator_root(self, generator: nn.Module) -> nn.Module:
        """The generator's FSDP root: ``forward(x0, x1, t, text, y1)`` returns ``x̂``."""

    def inner_noise(self, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor | None:
        """The generator's extra noise of a sample (drawn after ``t`` and ``x1``), or None."""
        return None

    @abc.abstractmethod
    def empty_generator(self) -> nn.Module:
        """A weightless copy of the generator's architecture (to load a full state dict into)."""

    def write_generator(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        """The generator folder (main process) plus ``tmd_sampling.json``."""
        (directory / SAMPLING_FILE).write_text(json.dumps(self.sampling_settings(), indent=1) + "\n")

    @abc.abstractmethod
    def sample(self, model: nn.Module, text: torch.Tensor, shape: tuple[int, ...],
               generator: torch.Generator) -> torch.Tensor:
        """Few-step samples ``x0`` of the (unsharded) generator ``model``."""

    def sampling_settings(self) -> dict[str, Any]:
        """What ``tmd_sampling.json`` records: method and the few-step sampler's settings."""
        cfg = self.cfg
        return {"method": cfg.method, "outer_steps": cfg.outer_steps, "outer_shift": cfg.outer_shift,
                "t_max": cfg.t_max}

    # ------------------------------------------------------------------ data
    def batches(self, first_step: int) -> Iterator[dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]]:
        """The batches of steps ``first_step..total_steps`` (KD batches, then data batches of
        DMD iterations ``first - kd_steps ..``), on the device: one batch per step, or with
        ``grad_accum_steps > 1`` the list of this process's micro-batches (chunks
        ``rank·grad_accum_steps + micro`` of the step's global batch)."""
        cfg = self.cfg
        if first_step <= cfg.kd_steps:
            yield from self._grouped(step_loader(self.kd_source, self.kd_sampler, first_step, cfg.kd_steps,
                                                 self.chunks, kd_collate, cfg.num_workers, self.device))
        first_iter = max(first_step - cfg.kd_steps, 1)
        yield from self._grouped(step_loader(self.source, self.sampler, first_iter, cfg.steps, self.chunks, collate,
                                             cfg.num_workers, self.device))

    def _grouped(self, loader: Iterator[dict[str, torch.Tensor]]
                 ) -> Iterator[dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]]:
        if len(self.chunks) == 1:
            yield from loader
            return
        group: list[dict[str, torch.Tensor]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == len(self.chunks):
                yield group
                group = []

    def micro_batches(self, step: int, batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]
                      ) -> list[tuple[dict[str, torch.Tensor], torch.Generator]]:
        """``(micro-batch, its generator seeded by (seed, step, chunk))`` of a step's batch (one
        batch, or the list of :meth:`batches`)."""
        group = [batch] if isinstance(batch, dict) else list(batch)
        if len(group) != len(self.chunks):
            raise ValueError(f"expected {len(self.chunks)} micro-batches (grad_accum_steps), got {len(group)}")
        return [(b, seeded_generator(self.cfg.seed, step, c, self.device)) for b, c in zip(group, self.chunks,
                                                                                          strict=True)]

    # ------------------------------------------------------------------ pieces
    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps

    @property
    def gen_updates(self) -> int:
        """Generator updates so far (= EMA updates)."""
        return self.ema.updates

    def is_generator_step(self, step: int) -> bool:
        """Whether DMD step ``step`` (global counter) updates the generator."""
        i = step - self.cfg.kd_steps
        return i >= 1 and i % self.cfg.generator_every == 0

    def step_kind(self, step: int) -> str:
        if step <= self.cfg.kd_steps:
            return "kd"
        return "generator" if self.is_generator_step(step) else "critic"

    def log_now(self, step: int) -> bool:
        return self.is_generator_step(step)

    def _update(self, name: str, loss: torch.Tensor, lr: float | None = None) -> tuple[float, bool]:
        """Backward has run: the guarded update of optimizer ``name``."""
        return guarded_update(self.optimizers[name], self.guards[name], loss, lr=lr,
                              max_grad_norm=self.cfg.max_grad_norm, replicated=self.replicated[name])

    def generator_draws(self, x0: torch.Tensor, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(t, x1, y1)`` of the generator sample (``t`` on the M-step student grid)."""
        cfg = self.cfg
        t = sample_outer_time(x0.shape[0], cfg.outer_steps, cfg.outer_shift, cfg.t_max, gen, self.device)
        x1 = normal(tuple(x0.shape), gen, self.device, x0.dtype)
        return t, x1, self.inner_noise(tuple(x0.shape), gen, x0.dtype)

    # ------------------------------------------------------------------ steps
    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """A KD warm-up step (``step <= kd_steps``) or a DMD iteration."""
        if step <= self.cfg.kd_steps:
            return self.kd_step(step, batch)
        return self.dmd_step(step, batch)

    def kd_step(self, step: int, batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]
                ) -> dict[str, float]:
        """One KD warm-up step: the generator's one-step output from ``noise`` at ``t_max``
        regressed onto the teacher sample: ``mean((x̂ - target)²)`` (averaged over micro-batches)."""
        cfg = self.cfg
        micro = self.micro_batches(step, batch)
        losses = []
        for b, gen in micro:
            noise, target, text = b["noise"], b["target"], b["text"]
            t = torch.full((noise.shape[0],), cfg.t_max, dtype=torch.float64, device=self.device)
            y1 = self.inner_noise(tuple(noise.shape), gen, noise.dtype)
            with self.ctx.autocast():
                x_hat = self.gen_model(noise, noise, t, text, y1)
                loss = F.mse_loss(x_hat.float(), target.float())
            _backward(loss, len(micro))
            losses.append(loss.detach())
        loss = _mean(losses)
        grad_norm, _ = self._update("generator", loss, cfg.kd_lr or cfg.lr)
        self.ema.update()
        return {"loss_kd": float(loss), "grad_norm_g": grad_norm}

    def dmd_step(self, step: int, batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]
                 ) -> dict[str, float]:
        """One DMD iteration (module docstring): generator update when due, then fake score and
        discriminator updates, each accumulated over the micro-batches (every micro-batch draws
        from its own generator, in the documented order). Returns this process's scalars (means
        over the micro-batches)."""
        cfg = self.cfg
        micro = self.micro_batches(step, batch)
        n = len(micro)
        draws = [self.generator_draws(b["latents"], gen) for b, gen in micro]
        logs: dict[str, float] = {}
        x_hats: list[torch.Tensor] = []
        if self.is_generator_step(step):
            rows: list[dict[str, float]] = []
            losses = []
            for (b, gen), (t, x1, y1) in zip(micro, draws, strict=True):
                x0, text = b["latents"], b["text"]
                with self.ctx.autocast():
                    x_hat = self.gen_model(x0, x1, t, text, y1)
                    dmd, dlog = dmd_loss(x_hat, self.teacher, self.fake_score, text, self.negative_text, self.dmd,
                                         gen)
                    loss = dmd["loss"]
                    gan = torch.zeros((), device=self.device)
                    if self.disc is not None:
                        _, fake_t, tau = gan_inputs(x0, x_hat, self.dmd, gen)
                        gan = gan_generator_loss(self.disc, None, fake_t, tau, text, features=self.teacher.features)
                        loss = loss + cfg.gan_weight * gan
                _backward(loss, n)
                x_hats.append(x_hat.detach())
                losses.append(loss.detach())
                rows.append({"loss_g": float(loss.detach()), "loss_dmd": float(dlog["loss"]),
                             "loss_gan_g": float(gan.detach()), "dmd_grad": float(dlog["grad_norm"]),
                             "normaliser": float(dlog["normaliser"])})
            grad_norm, _ = self._update("generator", _mean(losses), cfg.lr)
            self.ema.update()
            logs.update({k: sum(r[k] for r in rows) / n for k in rows[0]}, grad_norm_g=grad_norm)
        else:
            with torch.no_grad(), self.ctx.autocast():
                x_hats = [self.gen_model(b["latents"], x1, t, b["text"], y1)
                          for (b, _), (t, x1, y1) in zip(micro, draws, strict=True)]
        losses = []
        for (b, gen), x_hat in zip(micro, x_hats, strict=True):
            with self.ctx.autocast():
                fl, _ = fake_score_loss(self.fake_score, x_hat, b["text"], self.dmd, gen)
            _backward(fl["loss"], n)
            losses.append(fl["loss"].detach())
        loss = _mean(losses)
        logs["grad_norm_fake"], _ = self._update("fake_score", loss)
        logs["loss_fake"] = float(loss)
        if self.disc is not None:
            losses = []
            for (b, gen), x_hat in zip(micro, x_hats, strict=True):
                with self.ctx.autocast():
                    real_t, fake_t, tau = gan_inputs(b["latents"], x_hat, self.dmd, gen)
                    dl = gan_discriminator_loss(self.disc, None, real_t, fake_t, tau, b["text"],
                                                features=self.teacher.features)
                _backward(dl, n)
                losses.append(dl.detach())
            loss = _mean(losses)
            logs["grad_norm_d"], _ = self._update("discriminator", loss)
            logs["loss_d"] = float(loss)
        return logs

    def counters(self) -> dict[str, float]:
        out = {f"skipped_{k}": float(g.skipped) for k, g in self.guards.items()}
        out["generator_updates"] = float(self.gen_updates)
        return out

    # ------------------------------------------------------------------ state
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's full state dict (prefix stripped) with the EMA weights, on the main process
        (collective: gathered one tensor at a time; other processes get an empty dict)."""
        state = self.sharded_state(())
        flat = flatten(state)
        out: dict[str, torch.Tensor] = {}
        for name, key in self.export_spec(state).tensors:
            full = local_tensor(flat[key])
            if self.is_main:
                out[name] = full.detach().cpu().clone()
        return out

    def stepped_optimizers(self) -> list[str]:
        """The optimizers that have stepped (have a state). One that has not is not saved: saving
        would initialise it (torch.distributed.checkpoint runs a zero-lr step), so a checkpoint would
        change the run (AdamW's step count)."""
        return [name for name, opt in self.optimizers.items() if opt.state]

    def sharded_state(self, optimizers: Sequence[str]) -> dict[str, Any]:
        """What a checkpoint holds, as this process holds it (FSDP2 shards, nothing gathered):
        ``{root name: {"model": …[, "optim": …]}, "generator_ema": {param name: average}}`` with the
        optimizers named in ``optimizers``. The generator is saved whole (the export needs every
        weight); the other networks only their trainable parameters (frozen ones are rebuilt)."""
        out: dict[str, Any] = {
            name: module_state(root, self.optimizers[name] if name in optimizers else None,
                               trainable_only=name != "generator")
            for name, root in self.roots.items()}
        out["generator_ema"] = self.ema.state_dict()
        return out

    def export_spec(self, state: dict[str, Any]) -> ExportSpec:
        """The student folder made from ``state`` (:meth:`sharded_state`): the EMA generator (EMA
        weights, the generator's buffers), its ``config.json`` and ``tmd_sampling.json``."""
        if isinstance(self.generator, TMDStudent):
            weights, files = student_files(self.generator)
        else:
            weights, files = plain_files(self.teacher_config)
        files[SAMPLING_FILE] = json.dumps(self.sampling_settings(), indent=1) + "\n"
        ema = state["generator_ema"]
        tensors = [(k[len("generator."):], f"generator_ema.{k}" if k in ema else f"generator.model.{k}")
                   for k in state["generator"]["model"] if k.startswith("generator.")]
        return ExportSpec(weights, tensors, files)

    def save(self, folder: Path, is_main: bool) -> None:
        """``dcp/`` (each process its shards of the networks, the stepped optimizers and the EMA) and
        ``export/``."""
        state = self.sharded_state(self.stepped_optimizers())
        save_sharded(folder, state)
        if is_main:
            self.export_spec(state).write(folder / EXPORT_SPEC_DIR)

    def state(self) -> dict[str, Any]:
        return {"generator_updates": self.gen_updates,
                "skipped_steps": {name: g.skipped for name, g in self.guards.items()},
                "optimizers": self.stepped_optimizers()}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Each process reads its shards from ``dcp/`` into the (sharded) networks, optimizers and EMA."""
        saved = [name for name in state.get("optimizers", list(self.optimizers)) if name in self.optimizers]
        template = self.sharded_state(saved)
        load_sharded(folder, template)                                       # the EMA: in place
        for name, root in self.roots.items():
            restore_module(root, template[name], self.optimizers[name] if name in saved else None,
                           trainable_only=name != "generator")
        for name, n in state.get("skipped_steps", {}).items():
            self.guards[name].skipped = int(n)
        self.ema.updates = int(state.get("generator_updates", 0))

    def export(self, directory: Path) -> None:
        """The EMA generator folder with ``tmd_sampling.json``, streamed one weight at a time."""
        state = self.sharded_state(())
        write_export_live(directory, self.export_spec(state), flatten(state), self.is_main)

    # ------------------------------------------------------------------ samples
    def ema_generator(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """An unsharded generator with the EMA weights (on this device, eval mode)."""
        model = self.empty_generator()
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(self.device).eval()

    @torch.no_grad()
    def sample_clips(self, n: int = 4) -> torch.Tensor | None:
        """``[n, C, F, H, W]`` EMA samples (float32, CPU) for the first ``n`` prompts of the data, from fixed
        noise; None on other processes (collective)."""
        sd = self.ema_state_dict()
        if not self.is_main:
            return None
        items = [self.source[i] for i in range(min(n, len(self.source)))]
        batch = collate(items)
        text = batch["text"].to(self.device)
        shape = tuple(batch["latents"].shape)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "samples"))
        return self.sample(self.ema_generator(sd), text, shape, g).float().cpu()

    @staticmethod
    def grid_image(clips: torch.Tensor) -> torch.Tensor:
        """``[3, H, n·W]`` image in [0, 1]: the middle frame of each clip side by side. Pixel clips
        (3 channels) are mapped from [-1, 1]; latents show their first 3 channels, min-max scaled per clip."""
        frames = clips[:, :, clips.shape[2] // 2]                                # [n, C, H, W]
        if frames.shape[1] == 3:
            frames = (frames.clamp(-1, 1) + 1) / 2                               # pixel clips in [-1, 1]
        else:
            frames = frames[:, :3] if frames.shape[1] >= 3 else frames[:, :1].expand(-1, 3, -1, -1)
            lo, hi = frames.amin(dim=(1, 2, 3), keepdim=True), frames.amax(dim=(1, 2, 3), keepdim=True)
            frames = (frames - lo) / (hi - lo).clamp(min=1e-6)
        return torch.cat(list(frames), dim=2)

    def sample_grid(self, n: int = 4) -> torch.Tensor | None:
        """``[3, H, n·W]`` image in [0, 1]: the middle frame of EMA samples for the first ``n``
        prompts of the data (fixed noise); None on other processes (collective)."""
        clips = self.sample_clips(n)
        return None if clips is None else self.grid_image(clips)

    @staticmethod
    def collapse_report(clips: torch.Tensor) -> dict:
        """The collapse checks (``tmd_train.evaluation.checks``, docs/design.md §8.3) of a sample grid's clips:
        ``constant`` and ``static`` per clip, and ``duplicate`` across the grid — its clips come from different
        prompts, so two equal clips mean the generator ignores the prompt. Pixel clips are checked as they are;
        latent clips (≈ unit variance) on their first 3 channels mapped ±3 → [-1, 1], where the same thresholds
        separate a flat or frozen latent from a living one."""
        from ..evaluation.checks import check_clips

        if clips.shape[1] != 3:
            rgb = clips[:, :3] if clips.shape[1] >= 3 else clips[:, :1].expand(-1, 3, -1, -1, -1)
            clips = rgb / 3.0
        return check_clips(clips, prompts=["grid"] * clips.shape[0])

    def after_step(self, step: int, logger: ScalarLogger) -> None:
        """Every ``sample_every`` steps (and at the last): EMA samples of the first prompts, their grid to
        TensorBoard (``samples_ema``) and their collapse checks — flag counts as TensorBoard scalars
        (``collapse/constant``, ``collapse/static``, ``collapse/duplicate``), one JSON line per check in
        ``<output_dir>/collapse_checks.jsonl`` and a warning when any clip is flagged."""
        every = self.cfg.sample_every
        if not (every and (step % every == 0 or step == self.total_steps)):
            return
        clips = self.sample_clips()
        if clips is None:
            return
        report = self.collapse_report(clips)
        if logger.writer is not None:
            logger.writer.add_image("samples_ema", self.grid_image(clips), step)
            for flag, count in report["counts"].items():
                logger.writer.add_scalar(f"collapse/{flag}", count, step)
        if logger.enabled:
            row = {"step": step, "num_clips": report["num_videos"], "num_flagged": report["num_flagged"],
                   "counts": report["counts"],
                   "flags": {v["name"]: v["flags"] for v in report["videos"] if v["flags"]}}
            with (Path(self.cfg.output_dir) / COLLAPSE_FILE).open("a") as f:
                f.write(json.dumps(row) + "\n")
        if report["num_flagged"]:
            from ..evaluation.checks import summary

            warn(f"step {step}: the EMA sample grid looks collapsed — {summary(report)}")

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {g.skipped}" for k, g in self.guards.items())
        return (f"{self.step} steps ({self.gen_updates} generator updates), skipped: {skipped}; "
                f"{self.timing_summary()}")
