"""The TMD student: a Wan transformer split into a backbone and a recurrent flow head
(docs/design.md §1–§2; paper §3, App. A.1).

* ``backbone(x_t, t, text)``: patch embedding + rope + condition embedder + ``blocks[:L-H]``, run
  once per outer step -> :class:`Features`.
* ``head(y_s, s, r, feats)``: fusion of ``m`` with ``PatchEmbed(y_s)`` (the teacher's own Conv3d)
  + ``blocks[L-H:]`` + output norm/modulation + ``proj_out`` + unpatchify, run N times per outer
  step. ``u = y1 - head`` is the mean velocity of one inner step ``y_r = y_s - (s-r)·u``.

Every public method takes flow times ``t, s, r ∈ [0, 1]`` as per-sample ``[B]`` tensors; the Wan
modules receive ``1000·t`` internally.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import tmd_ext

from ..errors import ConfigError, MissingFileError
from .fusion import ConcatFusion, GatedFusion
from .teacher import cast_keeping_fp32, wan_timestep
from .time_embed import SmoothTimeEmbedding

FUSIONS = ("gated", "concat")
HEAD_TIMES = ("outer", "inner")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "tmd-student"
FORMAT_VERSION = 1
STUDENT_FOLDER = ("a TMD student folder (config.json + model.safetensors, written by stage 1 or by stage 2 "
                  "with method=tmd)")


def check_student_folder(directory: Path) -> Path:
    """``directory / config.json`` if ``directory`` can be a student folder; otherwise a
    :class:`~tmd_train.errors.MissingFileError` that says what ``directory`` is instead."""
    if not directory.exists():
        raise MissingFileError(f"student folder not found: {directory}; expected {STUDENT_FOLDER}")
    if not directory.is_dir():
        raise MissingFileError(f"{directory} is a file, not {STUDENT_FOLDER}")
    config_path = directory / CONFIG_NAME
    if config_path.is_file():
        return config_path
    if (directory / "student" / CONFIG_NAME).is_file():
        raise MissingFileError(f"{directory} is a training run's output folder, not {STUDENT_FOLDER}; "
                               f"its final student is {directory / 'student'}")
    if (directory / "transformer" / CONFIG_NAME).is_file():
        raise MissingFileError(f"{directory} is a Wan diffusers model folder (a teacher), not {STUDENT_FOLDER}")
    raise MissingFileError(f"{directory} has no {CONFIG_NAME}: it is not {STUDENT_FOLDER}")


def _plain_model_kind(directory: Path, cfg: dict) -> str:
    """What a folder holding a diffusers ``config.json`` (``_class_name``) is, in words."""
    name = cfg["_class_name"]
    sampling = directory / "tmd_sampling.json"
    method = None
    if sampling.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            method = json.loads(sampling.read_text()).get("method")
    if method == "dmd2v":
        return f"a DMD2-v few-step generator (stage 2 with method=dmd2v: a plain {name} folder)"
    if name == "WanTransformer3DModel":
        return f"a plain {name} folder (a teacher transformer or a method=dmd2v generator)"
    return f"a diffusers {name} folder"


@dataclass
class StudentConfig:
    """Architecture options of the student (saved in ``config.json`` next to the teacher config).

    Attributes:
        head_blocks: H, the number of final teacher blocks in the flow head (1 <= H <= L).
        fusion: ``"gated"`` (default; exact teacher at init) or ``"concat"`` (paper App. B.3).
        head_time: ``"outer"`` (default): head temb = teacher temb(t) + zero-init emb(s) +
            zero-init emb(s-r), exact teacher at init. ``"inner"`` (the paper's wording, ablation):
            head temb = teacher temb(1000·s) + zero-init emb(s-r).
        time_num_freqs, time_min_freq, time_max_freq: sinusoids of the low-frequency embeddings
            of ``s``, ``s-r`` and of the fusion's ``temb_f(s)`` (rad per unit of time). The FD
            derivative of stage 1 has relative error ≈ (time_max_freq·δ)²/6: the default 4 rad/unit
            gives ≈ 7e-5 at δ = 5e-3 (under the 1e-4 target); 10 (docs/design.md's ceiling) gives ≈ 4e-4.
        fusion_hidden_dim: width of the gated fusion MLP (default: the hidden size D).
        concat_init_std: std of the ``e`` half of the concat Linear at init.
    """

    head_blocks: int = 5
    fusion: str = "gated"
    head_time: str = "outer"
    time_num_freqs: int = 32
    time_min_freq: float = 0.1
    time_max_freq: float = 4.0
    fusion_hidden_dim: int | None = None
    concat_init_std: float = 0.01

    def validate(self, num_layers: int) -> None:
        """Raise ValueError on options that cannot build a student of an L-block teacher."""
        if not isinstance(self.head_blocks, int) or not 1 <= self.head_blocks <= num_layers:
            raise ValueError(f"head_blocks must be an int in [1, {num_layers}] (the teacher has "
                             f"{num_layers} blocks), got {self.head_blocks!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.head_time not in HEAD_TIMES:
            raise ValueError(f"head_time must be one of {HEAD_TIMES}, got {self.head_time!r}")


@dataclass
class Features:
    """What the backbone hands to the flow head for one outer step (``B`` samples).

    Attributes:
        m: ``[B, N, D]`` backbone tokens after ``blocks[:L-H]`` (N = F'·H'·W' patches).
        temb: ``[B, D]`` the teacher's time embedding of the outer ``t``.
        timestep_proj: ``[B, 6, D]`` its block modulation ``time_proj(SiLU(temb))``.
        text: ``[B, L_text, D]`` projected text states (the blocks' cross-attention context).
        rotary_emb: ``(cos, sin)``, each ``[1, N, 1, head_dim]``.
        grid: ``(F', H', W')`` token grid, for unpatchify.
        t: ``[B]`` the outer flow time.
    """

    m: torch.Tensor
    temb: torch.Tensor
    timestep_proj: torch.Tensor
    text: torch.Tensor
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int, int]
    t: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.m.shape[0]

    def repeat(self, n: int) -> Features:
        """The features of ``n`` stacked copies of the batch (``[n·B, …]``, copy-major), for one
        batched head pass over several inputs that share ``m`` (e.g. the fused FD pass)."""
        def rep(x: torch.Tensor) -> torch.Tensor:
            return x.repeat((n,) + (1,) * (x.dim() - 1))
        return Features(rep(self.m), rep(self.temb), rep(self.timestep_proj), rep(self.text),
                        self.rotary_emb, self.grid, rep(self.t))

    def detach(self) -> Features:
        """The same features cut from the autograd graph."""
        return Features(self.m.detach(), self.temb.detach(), self.timestep_proj.detach(),
                        self.text.detach(), self.rotary_emb, self.grid, self.t.detach())


def _check_time(x: torch.Tensor, batch: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point [B] tensor of flow times, got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one flow time per sample), "
                         f"got {tuple(x.shape)}")


def unpatchify(h: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, F'·H'·W', C·pt·ph·pw]`` tokens -> ``[B, C, F'·pt, H'·ph, W'·pw]`` latents (Wan's layout)."""
    f, hh, w = grid
    pt, ph, pw = patch
    h = h.reshape(h.shape[0], f, hh, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class TMDStudent(nn.Module):
    """Backbone + flow head built on a (copied) teacher ``WanTransformer3DModel``.

    Modules: ``transformer`` (the Wan model; its blocks ``[:L-H]`` form the backbone and
    ``[L-H:]`` the head), ``fusion`` (:class:`GatedFusion` or :class:`ConcatFusion`),
    ``time_embed_s`` (zero-init emb(s), ``head_time="outer"`` only) and ``time_embed_delta``
    (zero-init emb(s-r)). Build with :meth:`from_teacher` or :meth:`from_pretrained`.
    """

    def __init__(self, transformer: WanTransformer3DModel, config: StudentConfig) -> None:
        super().__init__()
        tc = transformer.config
        if tc.image_dim is not None or tc.added_kv_proj_dim is not None:
            raise ValueError("only text-to-video Wan teachers are supported")
        config.validate(tc.num_layers)
        self.config = config
        self.transformer = transformer
        dim = tc.num_attention_heads * tc.attention_head_dim
        tkw = {"num_freqs": config.time_num_freqs, "min_freq": config.time_min_freq,
               "max_freq": config.time_max_freq}
        if config.fusion == "gated":
            self.fusion: nn.Module = GatedFusion(dim, config.fusion_hidden_dim, tc.eps,
                                                 time_num_freqs=config.time_num_freqs,
                                                 time_min_freq=config.time_min_freq,
                                                 time_max_freq=config.time_max_freq)
        else:
            self.fusion = ConcatFusion(dim, config.concat_init_std)
        self.time_embed_s = SmoothTimeEmbedding(dim, zero_init=True, **tkw) if config.head_time == "outer" else None
        self.time_embed_delta = SmoothTimeEmbedding(dim, zero_init=True, **tkw)
        ref = transformer.patch_embedding.weight
        for mod in (self.fusion, self.time_embed_s, self.time_embed_delta):
            if mod is not None:  # a transformer on the meta device (filled later) leaves the new layers on CPU
                mod.to(device=None if ref.is_meta else ref.device, dtype=ref.dtype)

    # ---------------------------------------------------------------- construction / io
    @classmethod
    def from_teacher(cls, teacher: WanTransformer3DModel, head_blocks: int = 5, fusion: str = "gated",
                     head_time: str = "outer", *, copy: bool = True, **options) -> TMDStudent:
        """A student initialised from ``teacher``.

        Args:
            teacher: the teacher transformer; deep-copied (``copy=True``) so it stays frozen and
                unchanged, or adopted as is (``copy=False``, saves memory).
            head_blocks: H, the number of last blocks that form the flow head.
            fusion: ``"gated"`` | ``"concat"``.
            head_time: ``"outer"`` | ``"inner"`` (see :class:`StudentConfig`).
            **options: the other :class:`StudentConfig` fields.
        """
        config = StudentConfig(head_blocks=head_blocks, fusion=fusion, head_time=head_time, **options)
        transformer = copy_module.deepcopy(teacher) if copy else teacher
        return cls(transformer, config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (the student options and the teacher transformer's config) and
        ``model.safetensors`` (every weight) into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = {"format": FORMAT, "version": FORMAT_VERSION,
               "student": dataclasses.asdict(self.config), "transformer": self.teacher_config}
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, torch_dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> TMDStudent:
        """Load a student written by :meth:`save_pretrained` (no teacher folder needed).

        Args:
            directory: the student folder (``config.json`` + ``model.safetensors``).
            torch_dtype: dtype of the weights (default: as stored, float32). As for the teacher
                (:func:`~tmd_train.models.teacher.load_teacher`), the modules Wan keeps in float32
                (RoPE tables, time embedder, ``scale_shift_table``, float32 LayerNorms) stay float32
                (:func:`~tmd_train.models.teacher.cast_keeping_fp32`); the student's own layers
                take ``torch_dtype``.
            device: where to put the student (default: CPU); ``"meta"``: build it without reading
                the weights (every parameter on the meta device; ``torch_dtype`` applies).
        Raises:
            MissingFileError (a ``FileNotFoundError``): ``directory`` does not exist, is not a
                student folder (the message says what it is instead: a run's output folder, a Wan
                diffusers model folder, a plain ``WanTransformer3DModel`` folder such as a
                ``method=dmd2v`` generator, or anything else) or lacks ``model.safetensors``.
            ConfigError (a ``ValueError``): ``config.json`` is not JSON or not a tmd student config
                of a known version.
        """
        directory = Path(directory)
        config_path = check_student_folder(directory)
        try:
            cfg = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path} is not valid JSON ({e}); expected {STUDENT_FOLDER}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{config_path} is not a JSON object; expected {STUDENT_FOLDER}")
        if "_class_name" in cfg:
            raise MissingFileError(f"{directory} is {_plain_model_kind(directory, cfg)}, not {STUDENT_FOLDER}")
        if cfg.get("format") != FORMAT or cfg.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{config_path} is not a '{FORMAT}' v{FORMAT_VERSION} config "
                              f"(format={cfg.get('format')!r}, version={cfg.get('version')!r})")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise MissingFileError(f"student folder incomplete: {weights} not found")
        tcfg = dict(cfg["transformer"])
        tcfg["patch_size"] = tuple(tcfg["patch_size"])
        with init_empty_weights(include_buffers=False):
            transformer = WanTransformer3DModel.from_config(tcfg)
            student = cls(transformer, StudentConfig(**cfg["student"]))
        if str(device) == "meta":
            return cast_keeping_fp32(student, torch_dtype)
        student.load_state_dict(load_file(str(weights)), strict=True, assign=True)
        cast_keeping_fp32(student, torch_dtype)
        if device is not None:
            student.to(device=device)
        return student

    # ---------------------------------------------------------------- properties
    @property
    def teacher_config(self) -> dict:
        """The transformer's ``WanTransformer3DModel`` config (JSON-serialisable)."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in self.transformer.config.items() if not k.startswith("_")}

    @property
    def num_layers(self) -> int:
        """L, the teacher's number of blocks."""
        return self.transformer.config.num_layers

    @property
    def head_blocks(self) -> int:
        """H, the number of blocks in the flow head."""
        return self.config.head_blocks

    @property
    def backbone_blocks(self) -> int:
        """L - H, the number of blocks in the backbone."""
        return self.num_layers - self.config.head_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every transformer block in backbone and head (diffusers' mechanism)."""
        self.transformer.enable_gradient_checkpointing()

    # ---------------------------------------------------------------- forward pieces
    def _run_blocks(self, h: torch.Tensor, text: torch.Tensor, tproj: torch.Tensor,
                    rotary: tuple[torch.Tensor, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        tr = self.transformer
        ckpt = torch.is_grad_enabled() and tr.gradient_checkpointing
        for block in tr.blocks[start:stop]:
            if ckpt:
                h = tr._gradient_checkpointing_func(block, h, text, tproj, rotary)
            else:
                h = block(h, text, tproj, rotary)
        return h

    def _patch_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``[B, C, F, H, W]`` -> tokens ``[B, N, D]`` and the grid ``(F', H', W')``."""
        if x.dim() != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        pt, ph, pw = self.transformer.config.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent (F, H, W) = {tuple(x.shape[2:])} must be divisible by the patch "
                             f"size {(pt, ph, pw)}")
        h = self.transformer.patch_embedding(x)
        grid = (h.shape[2], h.shape[3], h.shape[4])
        return h.flatten(2).transpose(1, 2).contiguous(), grid

    def backbone(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> Features:
        """Run the backbone once for an outer step.

        Args:
            x_t: ``[B, C, F, H, W]`` latents at flow time ``t``.
            t: ``[B]`` outer flow times in ``[0, 1]`` (the condition embedder sees ``1000·t``).
            text: ``[B, L_text, text_dim]`` text-encoder states.
        Returns:
            :class:`Features` with ``m [B, N, D]``; gradients flow through it (not detached).
        """
        B = x_t.shape[0]
        _check_time(t, B, "t")
        if text.dim() != 3 or text.shape[0] != B:
            raise ValueError(f"text must be [B={B}, L_text, text_dim], got {tuple(text.shape)}")
        tr = self.transformer
        x = x_t.to(self.dtype)
        rotary = tr.rope(x)
        h, grid = self._patch_embed(x)
        temb, tproj, text_h, _ = tr.condition_embedder(wan_timestep(t), text.to(self.dtype), None)
        tproj = tproj.unflatten(1, (6, -1))
        m = self._run_blocks(h, text_h, tproj, rotary, 0, self.backbone_blocks)
        return Features(m=m, temb=temb, timestep_proj=tproj, text=text_h, rotary_emb=rotary, grid=grid, t=t)

    def head_temb(self, s: torch.Tensor, r: torch.Tensor, feats: Features) -> torch.Tensor:
        """The head's time embedding ``[B, D]`` that feeds its blocks' ``time_proj`` and the output
        norm modulation: ``temb(t) + emb(s) + emb(s-r)`` (``"outer"``) or
        ``temb(1000·s) + emb(s-r)`` (``"inner"``); emb(·) zero-initialised."""
        delta = self.time_embed_delta(s - r).to(feats.temb.dtype)
        if self.time_embed_s is not None:
            return feats.temb + self.time_embed_s(s).to(feats.temb.dtype) + delta
        ce = self.transformer.condition_embedder
        ts = ce.timesteps_proj(wan_timestep(s))
        ts = ts.to(next(iter(ce.time_embedder.parameters())).dtype)
        return ce.time_embedder(ts).type_as(feats.text) + delta

    def head(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, feats: Features) -> torch.Tensor:
        """The flow head: one evaluation at inner time ``s`` towards ``r``.

        Args:
            y_s: ``[B, C, F, H, W]`` inner state at ``s`` (the same latent shape as ``x_t``).
            s, r: ``[B]`` inner flow times, ``0 <= r <= s <= 1``.
            feats: the backbone's :class:`Features` for these B samples.
        Returns:
            ``[B, C, F, H, W]`` head output in the model dtype (≈ the teacher velocity; with the
            default options an untrained student returns exactly ``teacher(x_t, 1000·t, text)``).
        """
        B = feats.batch_size
        if y_s.shape[0] != B:
            raise ValueError(f"y_s has batch {y_s.shape[0]} but the features have batch {B}")
        _check_time(s, B, "s")
        _check_time(r, B, "r")
        tr = self.transformer
        e, grid = self._patch_embed(y_s.to(self.dtype))
        if grid != feats.grid:
            raise ValueError(f"y_s token grid {grid} differs from the backbone's {feats.grid}")
        temb = self.head_temb(s, r, feats)
        h = self.fusion(feats.m, e, s)
        ce = tr.condition_embedder
        tproj = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
        h = self._run_blocks(h, feats.text, tproj, feats.rotary_emb, self.backbone_blocks, self.num_layers)
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (tr.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        return unpatchify(tr.proj_out(h), feats.grid, tuple(tr.config.patch_size))

    def velocity(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, feats: Features,
                 y1: torch.Tensor) -> torch.Tensor:
        """The mean inner velocity ``u = y1 - head(y_s, s, r; m)`` ``[B, C, F, H, W]`` (dtype of
        ``y1``), so that ``y_r = y_s - (s-r)·u`` (docs/design.md §1.2, Eq. 14 with the sign fixed)."""
        return y1 - self.head(y_s, s, r, feats).to(y1.dtype)

    def _inner_step(self, y: torch.Tensor, s: torch.Tensor, r: torch.Tensor, feats: Features,
                    y1: torch.Tensor) -> torch.Tensor:
        head_out = self.head(y, s, r, feats).to(y.dtype)
        return tmd_ext.flow_step(y, head_out, y1, s, r)

    def inner_flow(self, feats: Features, y1: torch.Tensor, s_grid: torch.Tensor, grad: bool = False,
                   checkpoint: bool = False) -> torch.Tensor:
        """The inner flow of one outer step: ``y = y1``; for ``j = N..1``:
        ``y = y - (s_j - s_{j-1})·(y1 - head(y, s_j, s_{j-1}; m))`` (``tmd_ext.flow_step``).

        Args:
            feats: backbone :class:`Features` (B samples).
            y1: ``[B, C, F, H, W]`` inner start noise (fixed for the whole roll-out).
            s_grid: ``[N+1]`` (shared) or ``[B, N+1]`` ascending inner times, ``s_grid[..., 0]``
                the end time (normally 0) and ``s_grid[..., N]`` the start (≈1, e.g. 0.999).
            grad: keep the autograd graph through all N steps (stage 2 roll-out); with
                ``grad=False`` the loop runs under ``torch.no_grad()``.
            checkpoint: with ``grad=True``, recompute each step in backward
                (``torch.utils.checkpoint``) instead of storing its activations.
        Returns:
            ``y0 [B, C, F, H, W]`` in the dtype of ``y1`` — the sampled transition ``ŷ ≈ x1 - x``.
        """
        B = y1.shape[0]
        if s_grid.dim() == 1:
            s_grid = s_grid[None, :].expand(B, -1)
        if s_grid.dim() != 2 or s_grid.shape[0] != B or s_grid.shape[1] < 2:
            raise ValueError(f"s_grid must be [N+1] or [B={B}, N+1] with N >= 1, got {tuple(s_grid.shape)}")
        grid = s_grid.to(device=y1.device, dtype=torch.float64)
        if bool((grid[:, 1:] < grid[:, :-1]).any()):
            raise ValueError("s_grid must be ascending (s_grid[..., 0] is the end time of the inner flow)")
        y = y1
        with contextlib.nullcontext() if grad else torch.no_grad():
            for j in range(grid.shape[1] - 1, 0, -1):
                s, r = grid[:, j].contiguous(), grid[:, j - 1].contiguous()
                if checkpoint and grad and torch.is_grad_enabled():
                    step = functools.partial(self._inner_step, feats=feats, y1=y1)
                    y = torch_checkpoint(step, y, s, r, use_reentrant=False)
                else:
                    y = self._inner_step(y, s, r, feats, y1)
        return y
