"""Stage 2: DMD2-v distillation (docs/design.md §1.5), the part every stage-2 method
shares; the generator network is the method's (``tmd``: :mod:`.tmd`, ``dmd2v``: :mod:`.dmd2v`).

Models: the generator (the method's), the real score (the frozen teacher, CFG ``dmd.cfg_scale``
with the data's negative-prompt embedding), the fake score (a trainable copy of the teacher) and
the discriminator (Conv3D heads on unpatchified frozen-teacher features, ``disc_blocks``).

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

Checkpoint files: ``generator.safetensors``, ``generator_ema.safetensors``,
``fake_score.safetensors``, ``discriminator.safetensors``, ``optimizers.pt``; the export
(``<output_dir>/student``) is the EMA generator plus ``tmd_sampling.json`` (method, M, N, shifts),
which ``python -m tmd_train.sample`` reads.

Randomness: every draw of a step comes from the generator seeded by ``(seed, step, rank)``, in a
fixed order (generator sample: t, x1, [y1]; generator update: DMD τ, ε, GAN τ, ε; fake score τ, ε;
discriminator τ, ε); the data order is a function of the iteration. So a resumed run repeats the
uninterrupted one exactly. With more than one process, the generator, the fake score and the
frozen teacher are FSDP2-sharded (every block a unit; gloo on CPU); the small discriminator is
replicated (its gradients averaged). Each process draws ``batch_size`` samples per step.
"""
from __future__ import annotations

import abc
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from torch import nn

from ..data.format import LatentDataset
from ..data.sources import DataSource, collate, masked_text
from ..engine.checkpoint import gather_state, load_state, save_tensors, strip_prefix
from ..engine.config import TrainConfig, check_fields, check_learning_rates
from ..engine.data import StepSampler, open_training_data, step_loader
from ..engine.distributed import shard_fsdp2
from ..engine.ema import EMA
from ..engine.logging import ScalarLogger
from ..engine.optim import NonFiniteGuard, adamw, guarded_update
from ..engine.seeding import derive_seed, seeded_generator
from ..engine.trainer import Method
from ..errors import DataError
from ..models.discriminator import (
    Conv3DDiscriminator,
    gan_discriminator_loss,
    gan_generator_loss,
    teacher_block_features,
)
from ..models.student import FUSIONS, HEAD_TIMES
from ..models.teacher import cast_keeping_fp32
from ..objectives.dmd import DMDConfig, dmd_loss, fake_score_loss, gan_inputs
from ..objectives.tm_meanflow import sample_outer_time
from ..schedules import normal
from .registry import METHODS, check_method

SAMPLING_FILE = "tmd_sampling.json"


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
                               "disc_groups"),
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
        raise DataError(f"kd_pairs {folder} holds {ds.kind!r} samples; it must be a 'kd' dataset "
                        "(python -m tmd_train.kd_pairs)")
    if ds.shapes["noise"][0] != teacher_config["in_channels"] or ds.shapes["text_emb"][1] != teacher_config["text_dim"]:
        raise DataError(f"kd_pairs {folder}: noise {ds.shapes['noise']} / text_emb {ds.shapes['text_emb']} do not "
                        f"fit the teacher (in_channels={teacher_config['in_channels']}, "
                        f"text_dim={teacher_config['text_dim']})")
    return ds


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
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.disc: Conv3DDiscriminator | None = None
        if cfg.gan_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(cfg.seed, "discriminator"))
                self.disc = Conv3DDiscriminator.for_teacher(teacher, blocks=cfg.disc_blocks, width=cfg.disc_width,
                                                            depth=cfg.disc_depth, groups=cfg.disc_groups)
        teacher.requires_grad_(False).eval()
        if self.autocast_dtype is not None:  # the frozen teacher runs in bf16 (Wan's fp32 modules stay fp32)
            cast_keeping_fp32(teacher, self.autocast_dtype)
        generator.to(self.device).train()
        fake.to(self.device)
        teacher.to(self.device)
        if cfg.gradient_checkpointing:
            generator.enable_gradient_checkpointing()
            fake.enable_gradient_checkpointing()
        self.generator = generator
        self.gen_model = self.generator_root(generator)
        self.fake_score = fake
        self.teacher = FrozenTeacher(teacher)
        self.replicated: dict[str, list[nn.Parameter]] = {"generator": [], "fake_score": []}
        if self.world > 1:
            self.replicated["generator"] = shard_fsdp2(self.gen_model, gen_blocks, self.device.type)
            self.replicated["fake_score"] = shard_fsdp2(self.fake_score, self.fake_score.blocks, self.device.type)
            shard_fsdp2(self.teacher, teacher.blocks, self.device.type)
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
        self.sampler = StepSampler(len(self.source), cfg.batch_size, self.world, cfg.seed)
        self.kd_source: LatentDataset | None = None
        if cfg.kd_steps > 0:
            self.kd_source = open_kd(cfg.kd_pairs, self.teacher_config)
            self.kd_sampler = StepSampler(len(self.kd_source), cfg.batch_size, self.world,
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
    def batches(self, first_step: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of steps ``first_step..total_steps`` (KD batches, then data batches of
        DMD iterations ``first - kd_steps ..``), on the device."""
        cfg = self.cfg
        if first_step <= cfg.kd_steps:
            yield from step_loader(self.kd_source, self.kd_sampler, first_step, cfg.kd_steps, [self.rank],
                                   kd_collate, cfg.num_workers, self.device)
        first_iter = max(first_step - cfg.kd_steps, 1)
        yield from step_loader(self.source, self.sampler, first_iter, cfg.steps, [self.rank], collate,
                               cfg.num_workers, self.device)

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

    def kd_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One KD warm-up step: the generator's one-step output from ``noise`` at ``t_max``
        regressed onto the teacher sample: ``mean((x̂ - target)²)``."""
        cfg = self.cfg
        gen = seeded_generator(cfg.seed, step, self.rank, self.device)
        noise, target, text = batch["noise"], batch["target"], batch["text"]
        t = torch.full((noise.shape[0],), cfg.t_max, dtype=torch.float64, device=self.device)
        y1 = self.inner_noise(tuple(noise.shape), gen, noise.dtype)
        with self.ctx.autocast():
            x_hat = self.gen_model(noise, noise, t, text, y1)
            loss = F.mse_loss(x_hat.float(), target.float())
        loss.backward()
        grad_norm, _ = self._update("generator", loss, cfg.kd_lr or cfg.lr)
        self.ema.update()
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
            with self.ctx.autocast():
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
            self.ema.update()
            x_hat = x_hat.detach()
            logs.update(loss_g=float(loss.detach()), loss_dmd=float(dlog["loss"]), loss_gan_g=float(gan.detach()),
                        dmd_grad=float(dlog["grad_norm"]), normaliser=float(dlog["normaliser"]),
                        grad_norm_g=grad_norm)
        else:
            with torch.no_grad(), self.ctx.autocast():
                x_hat = self.gen_model(x0, x1, t, text, y1)
        with self.ctx.autocast():
            fl, _ = fake_score_loss(self.fake_score, x_hat, text, self.dmd, gen)
        fl["loss"].backward()
        logs["grad_norm_fake"], _ = self._update("fake_score", fl["loss"])
        logs["loss_fake"] = float(fl["loss"].detach())
        if self.disc is not None:
            with self.ctx.autocast():
                real_t, fake_t, tau = gan_inputs(x0, x_hat, self.dmd, gen)
                dl = gan_discriminator_loss(self.disc, None, real_t, fake_t, tau, text, features=self.teacher.features)
            dl.backward()
            logs["grad_norm_d"], _ = self._update("discriminator", dl)
            logs["loss_d"] = float(dl.detach())
        return logs

    def counters(self) -> dict[str, float]:
        out = {f"skipped_{k}": float(g.skipped) for k, g in self.guards.items()}
        out["generator_updates"] = float(self.gen_updates)
        return out

    # ------------------------------------------------------------------ state
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's full state dict (prefix stripped) with the EMA weights (collective)."""
        model_sd, _ = gather_state(self.gen_model)
        model_sd.update(self.ema.full())
        return strip_prefix("generator.", model_sd)

    def save(self, folder: Path, is_main: bool) -> None:
        optim: dict[str, Any] = {}
        for name, root in self.roots.items():
            # An optimizer that has not stepped yet is saved as None: gathering its state would
            # initialise it (torch.distributed.checkpoint runs a zero-lr step), so a checkpoint
            # would change the run (AdamW's step count).
            opt = self.optimizers[name] if self.optimizers[name].state else None
            model_sd, optim[name] = gather_state(root, opt)
            if is_main:
                save_tensors(model_sd, folder / f"{name}.safetensors")
        ema = self.ema.full()
        if is_main:
            save_tensors(ema, folder / "generator_ema.safetensors")
            torch.save(optim, folder / "optimizers.pt")

    def state(self) -> dict[str, Any]:
        return {"generator_updates": self.gen_updates,
                "skipped_steps": {name: g.skipped for name, g in self.guards.items()}}

    def load(self, folder: Path, state: dict[str, Any]) -> None:
        optim = torch.load(folder / "optimizers.pt", map_location="cpu", weights_only=False)
        for name, root in self.roots.items():
            opt = self.optimizers[name] if optim[name] is not None else None
            load_state(root, load_file(str(folder / f"{name}.safetensors")), opt, optim[name])
        self.ema.load(load_file(str(folder / "generator_ema.safetensors")))
        for name, n in state.get("skipped_steps", {}).items():
            self.guards[name].skipped = int(n)
        self.ema.updates = int(state.get("generator_updates", 0))

    def export(self, directory: Path) -> None:
        """The EMA generator folder with ``tmd_sampling.json``."""
        sd = self.ema_state_dict()
        if self.is_main:
            self.write_generator(sd, directory)

    # ------------------------------------------------------------------ samples
    def ema_generator(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """An unsharded generator with the EMA weights (on this device, eval mode)."""
        model = self.empty_generator()
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(self.device).eval()

    @torch.no_grad()
    def sample_grid(self, n: int = 4) -> torch.Tensor | None:
        """``[3, H, n·W]`` image in [0, 1]: the middle frame of EMA samples for the first ``n``
        prompts of the data (fixed noise); None on other processes (collective)."""
        sd = self.ema_state_dict()
        if not self.is_main:
            return None
        items = [self.source[i] for i in range(min(n, len(self.source)))]
        batch = collate(items)
        text = batch["text"].to(self.device)
        shape = tuple(batch["latents"].shape)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "samples"))
        x = self.sample(self.ema_generator(sd), text, shape, g)
        frames = x[:, :, x.shape[2] // 2].float().cpu()                          # [n, C, H, W]
        if frames.shape[1] == 3:
            frames = (frames.clamp(-1, 1) + 1) / 2                               # pixel clips in [-1, 1]
        else:
            frames = frames[:, :3] if frames.shape[1] >= 3 else frames[:, :1].expand(-1, 3, -1, -1)
            lo, hi = frames.amin(dim=(1, 2, 3), keepdim=True), frames.amax(dim=(1, 2, 3), keepdim=True)
            frames = (frames - lo) / (hi - lo).clamp(min=1e-6)
        return torch.cat(list(frames), dim=2)

    def after_step(self, step: int, logger: ScalarLogger) -> None:
        """EMA sample grids to TensorBoard every ``sample_every`` steps (and at the last)."""
        every = self.cfg.sample_every
        if every and (step % every == 0 or step == self.total_steps):
            grid = self.sample_grid()
            if grid is not None and logger.writer is not None:
                logger.writer.add_image("samples_ema", grid, step)

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {g.skipped}" for k, g in self.guards.items())
        return (f"{self.step} steps ({self.gen_updates} generator updates), skipped: {skipped}; "
                f"{self.timing_summary()}")
