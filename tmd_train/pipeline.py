"""``TMDPipeline``: a diffusers ``DiffusionPipeline`` that samples a distilled model the way ``WanPipeline``
samples Wan (docs/design.md §8).

::

    import torch
    from diffusers.utils import export_to_video
    from tmd_train import TMDPipeline

    pipe = TMDPipeline.from_pretrained("runs/stage2/student", wan="Wan2.1-T2V-1.3B-Diffusers",
                                       torch_dtype=torch.bfloat16).to("cuda")
    video = pipe("a cat surfing a wave", generator=torch.Generator().manual_seed(0)).frames[0]
    export_to_video(video, "cat.mp4", fps=16)

Components: ``transformer`` (a :class:`~tmd_train.models.TMDStudent`, or a ``WanTransformer3DModel``: a DMD2-v
few-step student or the teacher itself), ``vae`` (``AutoencoderKLWan``), ``text_encoder``
(``UMT5EncoderModel``) and ``tokenizer``, plus the sampler settings (``tmd_sampling.json``). The kind of
model decides the sampler (``tmd_train.sampling.sample_model``): Algorithm 1 for a TMD student (the inner flow
through ``tmd_ext.FlowHeadLoop`` on CUDA), the few-step sampler for DMD2-v, Euler with CFG for a teacher.

Folders :meth:`TMDPipeline.from_pretrained` reads:

* a pipeline folder written by :meth:`TMDPipeline.save_pretrained` (``model_index.json`` of class
  ``TMDPipeline``, ``transformer/`` with ``tmd_sampling.json``, and ``vae/``, ``text_encoder/``,
  ``tokenizer/`` copied, or referenced by path from ``model_index.json`` with ``copy_components=False``);
* a student folder written by stage 2 (a TMD student or a DMD2-v transformer folder with
  ``tmd_sampling.json``), which holds no VAE or text encoder: those come from ``wan=`` (a Wan2.1 diffusers
  folder), else from the teacher folder named in the training run's ``config.yaml`` one level up;
* a Wan2.1 diffusers folder (the teacher, sampled with 50 Euler steps and CFG 5 unless told otherwise).

Nothing is downloaded (``local_files_only``). ``pipe.to(...)``, ``enable_model_cpu_offload()`` and
``pipe.vae.enable_tiling()`` (or :meth:`enable_vae_tiling`) behave as in diffusers.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.video_processor import VideoProcessor
from torch import nn

from .errors import MissingFileError
from .sampling.models import resolved_settings, sample_model

SAMPLING_FILE = "tmd_sampling.json"
INDEX_FILE = "model_index.json"
COMPONENTS = ("vae", "text_encoder", "tokenizer")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
#: Wan's VAE compresses time 4x and space 8x (used when a pipeline has no VAE: latent output only).
DEFAULT_SCALE_TEMPORAL, DEFAULT_SCALE_SPATIAL = 4, 8
_UNSET = object()


@dataclass
class TMDPipelineOutput(BaseOutput):
    """``frames``: ``[B, F, H, W, 3]`` floats in [0, 1] (``np``/``pt``), lists of PIL images (``pil``) or the
    latents ``[B, C, F', H', W']`` (``latent``), as ``WanPipelineOutput``; ``nfe``: the measured effective
    NFE of the sampler (docs/design.md §1.3)."""

    frames: Any
    nfe: float


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MissingFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MissingFileError(f"{path} must hold a JSON object")
    return value


def folder_kind(transformer_dir: Path) -> str:
    """``"student"`` (a tmd-student ``config.json``), ``"few_step"`` (a ``WanTransformer3DModel`` folder whose
    ``tmd_sampling.json`` says ``"method": "dmd2v"``) or ``"teacher"`` (any other Wan transformer folder)."""
    cfg_path = transformer_dir / "config.json"
    if not cfg_path.is_file():
        raise MissingFileError(f"{transformer_dir}: no config.json (not a TMD student, DMD2-v or Wan transformer "
                               "folder)")
    cfg = _read_json(cfg_path)
    if cfg.get("format") == "tmd-student":
        return "student"
    if cfg.get("_class_name") != "WanTransformer3DModel":
        raise MissingFileError(f"{cfg_path}: neither a TMD student config (format 'tmd-student') nor a "
                               f"WanTransformer3DModel config (_class_name {cfg.get('_class_name')!r})")
    settings = transformer_dir / SAMPLING_FILE
    if settings.is_file() and _read_json(settings).get("method") == "dmd2v":
        return "few_step"
    return "teacher"


def model_hash(transformer_dir: str | os.PathLike) -> str:
    """SHA-256 over the names and contents of the weight and config files of a transformer folder (``*.json``
    as canonical JSON, ``*.safetensors`` and ``*.bin`` as bytes, sorted by name): one model, one hash, wherever
    it lies."""
    folder = Path(transformer_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    if not files:
        raise MissingFileError(f"{folder}: no weight or config files to hash")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        if p.suffix == ".json":  # the content, not its formatting
            h.update(json.dumps(json.loads(p.read_text()), sort_keys=True, separators=(",", ":")).encode())
            continue
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _run_teacher(folder: Path) -> Path | None:
    """The teacher folder named in the ``config.yaml`` of the training run ``folder`` was written by (stage 2
    writes ``<output_dir>/student`` next to ``<output_dir>/config.yaml``), if it is a Wan diffusers folder."""
    cfg = folder.parent / "config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    try:
        teacher = (yaml.safe_load(cfg.read_text()) or {}).get("teacher")
    except (yaml.YAMLError, AttributeError):
        return None
    if isinstance(teacher, str) and (Path(teacher) / INDEX_FILE).is_file():
        return Path(teacher)
    return None


def _onload(module: nn.Module | None) -> None:
    """Move a model offloaded by ``enable_model_cpu_offload`` to the execution device, as diffusers'
    ``apply_forward_hook`` does for ``vae.decode`` (the samplers call the student's backbone and head, not its
    ``forward``, and read the device before the first forward)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


class TMDPipeline(DiffusionPipeline):
    """Text-to-video with a TMD student, a DMD2-v few-step student or the Wan teacher (see the module docs).

    Args:
        transformer: a :class:`~tmd_train.models.TMDStudent` or a ``WanTransformer3DModel``.
        vae: ``AutoencoderKLWan`` (optional: without it only ``output_type="latent"`` works).
        text_encoder, tokenizer: UMT5 encoder and its tokenizer (optional: pass ``prompt_embeds`` instead).
        sampling: the sampler settings a stage-2 folder records in ``tmd_sampling.json`` (``method``,
            ``outer_steps``, ``outer_shift``, ``t_max`` and for TMD ``inner_steps``, ``inner_shift``, ``s_max``,
            ``head_blocks``); missing ones take the defaults of docs/design.md §1.7.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 tokenizer: Any = None, sampling: dict | None = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(sampling=dict(sampling or {}))
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else \
            DEFAULT_SCALE_TEMPORAL
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else DEFAULT_SCALE_SPATIAL
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._component_sources: dict[str, Path] = {}
        self._source: Path | None = None

    # ------------------------------------------------------------------ what it is
    @property
    def sampling(self) -> dict:
        """The sampler settings (``tmd_sampling.json``)."""
        return dict(self.config.sampling)

    @property
    def kind(self) -> str:
        """``"student"`` (TMD), ``"few_step"`` (DMD2-v) or ``"teacher"``."""
        from .models.student import TMDStudent

        if isinstance(self.transformer, TMDStudent):
            return "student"
        return "few_step" if self.sampling.get("method") == "dmd2v" else "teacher"

    @property
    def wan_transformer(self) -> nn.Module:
        """The ``WanTransformer3DModel`` (a student's own transformer for a TMD student)."""
        return self.transformer.transformer if self.kind == "student" else self.transformer

    def settings(self, **options: Any) -> dict:
        """Every sampler setting a call with ``options`` (``steps``, ``inner_steps``, ``cfg``, ``shift``,
        ``inner_shift``) uses: the options, else :attr:`sampling`, else the defaults."""
        return resolved_settings(self.kind, self.sampling, **options)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, wan: str | os.PathLike | None = None,
                        torch_dtype: torch.dtype | None = None, vae_dtype: torch.dtype = torch.float32,
                        attention_backend: str | None = None, **components: Any) -> TMDPipeline:
        """Load a pipeline folder, a stage-2 student folder or a Wan diffusers folder (see the module docs).

        Args:
            pretrained_model_name_or_path: the folder (local; nothing is downloaded).
            wan: a Wan2.1 diffusers folder supplying ``vae/``, ``text_encoder/`` and ``tokenizer/`` where the
                folder has none.
            torch_dtype: dtype of the transformer and the text encoder (default: as stored). Wan's float32
                modules stay float32.
            vae_dtype: dtype of the VAE (float32 by default, as Wan decodes).
            attention_backend: see :meth:`set_attention_backend` (default: diffusers' default, ``native``).
            **components: ``vae=``, ``text_encoder=``, ``tokenizer=`` (or ``transformer=``) objects to use
                instead of loading them; ``None`` skips a component.
        Raises:
            MissingFileError: the folder is not one of the above, or a component is in none of the places
                searched (the message names them and what to pass).
        """
        from .models import TMDStudent, load_teacher

        unknown = set(components) - {"transformer", *COMPONENTS}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}; components are transformer, "
                            f"{', '.join(COMPONENTS)}")
        root = Path(pretrained_model_name_or_path)
        if not root.is_dir():
            raise MissingFileError(f"{root}: no such folder (a TMDPipeline folder, a stage-2 student folder or a "
                                   "Wan2.1 diffusers folder)")
        index = _read_json(root / INDEX_FILE) if (root / INDEX_FILE).is_file() else None
        transformer_dir = root / "transformer" if index is not None else root
        refs = {k: Path(v) for k, v in (index or {}).get("tmd_components", {}).items()}
        search = [root] if index is not None else []
        if wan is not None:
            if not (Path(wan) / INDEX_FILE).is_file() and not any((Path(wan) / c).is_dir() for c in COMPONENTS):
                raise MissingFileError(f"wan={wan}: not a Wan2.1 diffusers folder (no {INDEX_FILE}, vae/, "
                                       "text_encoder/ or tokenizer/)")
            search.append(Path(wan))
        elif index is None and (teacher := _run_teacher(root)) is not None:
            search.append(teacher)

        sampling = _read_json(transformer_dir / SAMPLING_FILE) if (transformer_dir / SAMPLING_FILE).is_file() \
            else dict((index or {}).get("sampling") or {})
        transformer = components.pop("transformer", _UNSET)
        if transformer is _UNSET:
            kind = folder_kind(transformer_dir)
            if kind == "student":
                transformer = TMDStudent.from_pretrained(transformer_dir, torch_dtype=torch_dtype)
            else:
                transformer = load_teacher(transformer_dir, torch_dtype=torch_dtype)
            transformer.eval()

        loaded: dict[str, Any] = {}
        sources: dict[str, Path] = {}
        for name in COMPONENTS:
            if name in components:
                loaded[name] = components[name]
                continue
            entry = (index or {}).get(name, [None]) if index is not None else None
            if entry is not None and (not entry or entry[0] is None) and name not in refs:
                loaded[name] = None  # saved without it
                continue
            places = [p / name for p in search[:1]] + ([refs[name]] if name in refs else []) + \
                [p / name for p in search[1:]]
            found = next((p for p in places if p.is_dir()), None)
            if found is None:
                tried = ", ".join(str(p) for p in places) or "nowhere"
                raise MissingFileError(
                    f"{root}: no {name}/ (looked in: {tried}); pass wan=<a Wan2.1 diffusers folder> (the "
                    f"teacher's), {name}=<the component>, or {name}=None to go without it")
            loaded[name] = cls._load_component(name, found, torch_dtype, vae_dtype)
            sources[name] = found.resolve()
        pipe = cls(transformer, sampling=sampling, **loaded)
        pipe._component_sources = sources
        pipe._source = transformer_dir.resolve()
        pipe.register_to_config(_name_or_path=str(root))
        if attention_backend is not None:
            pipe.set_attention_backend(attention_backend)
        return pipe

    @staticmethod
    def _load_component(name: str, folder: Path, dtype: torch.dtype | None, vae_dtype: torch.dtype) -> Any:
        try:
            if name == "vae":
                from diffusers import AutoencoderKLWan

                return AutoencoderKLWan.from_pretrained(folder, local_files_only=True, torch_dtype=vae_dtype).eval()
            if name == "text_encoder":
                from transformers import UMT5EncoderModel

                return UMT5EncoderModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).eval()
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MissingFileError(f"{folder}: cannot load the {name} ({e})") from e

    def save_pretrained(self, save_directory: str | os.PathLike, *, copy_components: bool = True,
                        **_: Any) -> None:
        """Write the pipeline folder: ``transformer/`` (the student folder itself, with ``tmd_sampling.json``:
        ``python -m tmd_train.sample`` reads it too), ``vae/``, ``text_encoder/``, ``tokenizer/`` and
        ``model_index.json``. ``copy_components=False`` writes no copy of a component loaded from a folder
        and records that folder's absolute path in ``model_index.json`` (``tmd_components``) instead: a
        small folder that needs the Wan folder to stay where it is."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out / "transformer")
        if self.sampling:
            (out / "transformer" / SAMPLING_FILE).write_text(json.dumps(self.sampling, indent=1) + "\n")
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": _diffusers_version(),
                                 "transformer": ["tmd_train", "TMDStudent"] if self.kind == "student"
                                 else list(self.config.transformer)}
        refs = {}
        for name in COMPONENTS:
            module = getattr(self, name)
            index[name] = list(self.config[name])
            if module is None:
                continue
            if not copy_components and name in self._component_sources:
                refs[name] = str(self._component_sources[name])
            else:
                module.save_pretrained(out / name)
        index["sampling"] = self.sampling
        if refs:
            index["tmd_components"] = refs
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def model_hash(self) -> str:
        """:func:`model_hash` of the transformer folder this pipeline was loaded from."""
        if self._source is None:
            raise ValueError("the pipeline was not loaded from a folder; save it first")
        return model_hash(self._source)

    # ------------------------------------------------------------------ options
    def set_attention_backend(self, name: str) -> None:
        """Run the transformer's attention with ``name`` (``native``, ``flash``, ``_flash_3``, ``flash_hub``,
        ``sage``: :mod:`tmd_train.models.attention`); a ConfigError if its package is missing."""
        from .models.attention import set_attention_backend

        set_attention_backend(self.wan_transformer, name)

    def enable_vae_tiling(self, **kwargs: Any) -> None:
        """``vae.enable_tiling(**kwargs)``: decode in overlapping spatial tiles (less memory)."""
        self.vae.enable_tiling(**kwargs)

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], max_sequence_length: int = 512,
                      device: torch.device | None = None) -> torch.Tensor:
        """``[P, max_sequence_length, D]`` float32 UMT5 states of the prompts, zeros after each prompt's
        tokens (as ``WanPipeline.encode_prompt``)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds, or load it with "
                             "wan=<a Wan2.1 diffusers folder>")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        enc = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                             max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                             return_attention_mask=True, return_tensors="pt")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        hidden = self.text_encoder(ids, mask).last_hidden_state.float()
        keep = torch.arange(max_sequence_length, device=hidden.device)[None, :] < mask.gt(0).sum(1, keepdim=True)
        return torch.where(keep[..., None].to(hidden.device), hidden, torch.zeros_like(hidden))

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(B, C, F', H', W')`` of ``num_frames × height × width`` videos (ValueError naming the argument
        that does not fit the VAE and the patch size)."""
        tc = self.wan_transformer.config
        st, ss = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        if num_frames < 1 or (num_frames - 1) % st:
            raise ValueError(f"num_frames must be {st}k+1 (the VAE compresses time {st}x), got {num_frames}")
        for name, v, p in (("height", height, tc.patch_size[1]), ("width", width, tc.patch_size[2])):
            if v < 1 or v % (ss * p):
                raise ValueError(f"{name} must be a positive multiple of {ss * p} (VAE {ss}x times the patch size "
                                 f"{p}), got {v}")
        f = (num_frames - 1) // st + 1
        if f % tc.patch_size[0]:
            raise ValueError(f"{f} latent frames are not a multiple of the temporal patch size {tc.patch_size[0]}")
        return (batch, tc.in_channels, f, height // ss, width // ss)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, F', H', W']`` -> videos ``[B, 3, F, H, W]`` in [-1, 1] (Wan's
        de-normalisation ``z·std + mean``, then ``vae.decode``, tiled if tiling is enabled)."""
        if self.vae is None:
            raise ValueError("this pipeline has no VAE: use output_type='latent', or load it with wan=<a Wan2.1 "
                             "diffusers folder>")
        vae = self.vae
        device = self._execution_device if hasattr(vae, "_hf_hook") else next(vae.parameters()).device
        z = latents.to(device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=device).view(1, -1, 1, 1, 1)
        return vae.decode(z * std + mean, return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 num_frames: int = 81, height: int = 480, width: int = 832, outer_steps: int | None = None,
                 inner_steps: int | None = None, guidance_scale: float | None = None, shift: float | None = None,
                 inner_shift: float | None = None, num_videos_per_prompt: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "np",
                 return_dict: bool = True, max_sequence_length: int = 512, use_flow_head_loop: bool | None = None,
                 num_inference_steps: int | None = None) -> TMDPipelineOutput | tuple:
        """Generate videos.

        Args:
            prompt: one prompt or a list (or ``prompt_embeds [P, L, D]`` instead).
            negative_prompt: the teacher's CFG negative prompt (default ``""``); a distilled student uses none.
            num_frames, height, width: the video size (Wan: 81 frames of 480×832; frames 4k+1).
            outer_steps: outer steps M of a student, Euler steps of a teacher (``num_inference_steps`` is an
                alias); inner_steps: N of a TMD student. Default: the folder's ``tmd_sampling.json``.
            guidance_scale: the teacher's CFG scale (default 5); shift, inner_shift: the grid shifts.
            num_videos_per_prompt: videos per prompt (consecutive rows of one noise draw).
            generator: the noise's ``torch.Generator`` (one; its device decides where noise is drawn, so one
                seed gives the same video on CPU and GPU).
            latents: the start noise ``[B, C, F', H', W']`` instead of drawing it.
            output_type: ``"np"`` (default), ``"pil"``, ``"pt"`` or ``"latent"``.
            use_flow_head_loop: a TMD student's inner flow through ``tmd_ext.FlowHeadLoop`` (default: on CUDA).
        Returns:
            :class:`TMDPipelineOutput` (``frames``, ``nfe``), or ``(frames,)`` with ``return_dict=False``.
        """
        kind = self.kind
        if num_inference_steps is not None:
            if outer_steps is not None:
                raise ValueError("pass outer_steps or num_inference_steps (an alias), not both")
            outer_steps = num_inference_steps
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if kind != "teacher" and guidance_scale is not None:
            raise ValueError("guidance_scale applies to a teacher only (a distilled student is distilled with "
                             "guidance)")
        if kind != "student" and (inner_steps is not None or inner_shift is not None):
            raise ValueError("inner_steps and inner_shift apply to a TMD student only")
        for name, v in (("outer_steps", outer_steps), ("inner_steps", inner_steps),
                        ("num_videos_per_prompt", num_videos_per_prompt)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if isinstance(generator, (list, tuple)):
            if len(generator) != 1:
                raise ValueError("pass one torch.Generator (the batch's noise is one draw from it)")
            generator = generator[0]
        device = self._execution_device

        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, max_sequence_length, device)
        elif prompt_embeds.dim() != 3:
            raise ValueError(f"prompt_embeds must be [P, L, D], got {tuple(prompt_embeds.shape)}")
        num_prompts = prompt_embeds.shape[0]
        text = prompt_embeds.repeat_interleave(num_videos_per_prompt, 0)
        options = {"steps": outer_steps, "inner_steps": inner_steps, "cfg": guidance_scale, "shift": shift,
                   "inner_shift": inner_shift}
        settings = self.settings(**options)
        negative = None
        if kind == "teacher" and settings["cfg"] != 1.0:
            if negative_prompt_embeds is None:
                negs = negative_prompt if negative_prompt is not None else ""
                negative_prompt_embeds = self.encode_prompt(negs, max_sequence_length, device)
            negative = negative_prompt_embeds
            if negative.shape[0] == num_prompts and num_prompts > 1:
                negative = negative.repeat_interleave(num_videos_per_prompt, 0)
            elif negative.shape[0] != 1:
                raise ValueError(f"negative prompts: {negative.shape[0]} for {num_prompts} prompts")

        shape = self.latent_shape(text.shape[0], num_frames, height, width)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (batch, channels, frames, height, width), got "
                             f"{tuple(latents.shape)}")
        _onload(self.transformer)
        run_device = self.wan_transformer.patch_embedding.weight.device
        loop = use_flow_head_loop if use_flow_head_loop is not None else run_device.type == "cuda"
        show = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        result, _, _ = sample_model(self.transformer, kind, self.sampling, text.to(run_device),
                                    shape=None if latents is not None else shape, noise=latents,
                                    generator=generator, negative=None if negative is None else negative.to(run_device),
                                    loop=loop and kind == "student", show=show, **options)
        if output_type == "latent":
            video = result.x0
        else:
            video = self.video_processor.postprocess_video(self.decode_latents(result.x0), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return TMDPipelineOutput(frames=video, nfe=result.nfe)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
