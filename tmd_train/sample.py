"""Sampling CLI: ``python -m tmd_train.sample --model DIR --prompt "..." [options]``.

``--model`` is either

* a TMD student folder (``config.json`` of format ``tmd-student`` + ``model.safetensors``, written
  by ``TMDStudent.save_pretrained``): Algorithm 1 with ``--steps`` outer steps M and
  ``--inner-steps`` N (the inner flow through ``tmd_ext.FlowHeadLoop`` with ``--loop``, the default
  on CUDA); or
* a Wan2.1 diffusers folder (``model_index.json`` + ``transformer/``) or a plain transformer folder
  (``config.json`` of a ``WanTransformer3DModel``), the teacher baseline: flow-matching Euler with
  ``--steps`` steps and classifier-free guidance ``--cfg``; or
* a stage-2 DMD2-v student (a Wan transformer folder with ``tmd_sampling.json`` saying
  ``"method": "dmd2v"``): the plain few-step sampler (no CFG).

A ``tmd_sampling.json`` in the folder (written by ``python -m tmd_train.stage2``) supplies the
defaults of a distilled model: outer steps M, inner steps N and the grid shifts it was trained for.

**Wan world** models are sampled through :class:`tmd_train.TMDPipeline` (docs/design.md §8.1), loaded with
only the components the run needs. ``--prompts FILE`` (one prompt per line) writes one mp4 per prompt into
the folder ``--out`` (default ``samples/``), named ``<prompt>-0.mp4`` as VBench names videos, the i-th
prompt (from 0) with seed ``--seed + i``. ``--attention-backend`` picks diffusers' attention kernel
(:mod:`tmd_train.models.attention`).

**Wan world.** The prompt is encoded with ``text_encoder/`` (``UMT5EncoderModel``) and ``tokenizer/``
found in the model folder or in ``--components DIR`` (a Wan diffusers folder) by
:class:`~tmd_train.text.umt5.PromptEncoder`, as diffusers' ``WanPipeline`` does (padded to
``--max-text-len`` tokens, zeros after the prompt), or read from ``--prompt-embeds FILE.safetensors``
(key ``text_emb`` ``[L, D]``). The latents are decoded with ``vae/`` (``AutoencoderKLWan``) into an
mp4 (imageio-ffmpeg); ``--out X.safetensors`` (the only choice without a VAE) writes the latents
instead (key ``latents`` ``[1, C, F, H, W]``).

**Toy world** (docs/design.md §4.5: the shipped toy teacher ``tmd_train/toy/assets/toy_teacher`` and the
students trained from it; recognised from the model's config, or forced with ``--world toy``). Every
``--prompt`` (repeat it for several) must be a toy prompt such as ``"a red circle moving left"``; it is
encoded by :mod:`tmd_train.toy.text_encoder` and the negative prompt is the empty one. The model samples
pixel clips ``[3, 8, 32, 32]`` in [-1, 1] directly (no VAE), written as a PNG grid (``--out X.png``: a row
per prompt, frames left to right), an animated GIF (``--out X.gif``: every prompt side by side) and/or the
clips (``--out X.safetensors``, key ``latents`` ``[P, 3, 8, 32, 32]``); ``--out`` may be repeated.

Everything is loaded with ``local_files_only``: nothing is downloaded. Prints the measured NFE and the
sampling time. A user error prints one line ``error: …`` and exits with status 2 (``--debug``: traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ArgumentParser, OutputError, UserError, run_main
from .evaluation.vbench import video_name
from .files import normalize_permissions
from .models import TMDStudent, load_teacher
from .models.attention import ATTENTION_BACKENDS, set_attention_backend
from .models.student import CONFIG_NAME, FORMAT
from .sampling.models import TEACHER_CFG, TEACHER_STEPS, sample_model, sampler_label
from .toy import TOY_CLIP_SHAPE, text_encoder, toy_config_mismatch
from .toy.clips import COLOURS, DIRECTIONS, SHAPES, parse_prompt

SAMPLING_FILE = "tmd_sampling.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORLDS = ("auto", "toy", "wan")
# Wan's VAE: 4x temporal, 8x spatial compression (used when the folder has no VAE config).
DEFAULT_SCALE_TEMPORAL = 4
DEFAULT_SCALE_SPATIAL = 8
# Wan video defaults (480p, 81 frames at 16 fps); the toy world's clips are fixed at 8 x 32 x 32.
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FRAMES, DEFAULT_FPS = 480, 832, 81, 16
DEFAULT_GIF_FPS = 6
TOY_SUFFIXES = (".png", ".gif", ".safetensors")
TOY_GRAMMAR = ("a toy prompt is 'a <colour> <shape> moving <direction>', optionally followed by ' and a <colour> "
               f"<shape> moving <direction>'; colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; "
               f"directions: {', '.join(DIRECTIONS)}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tmd_train.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="TMD student folder, Wan2.1 diffusers folder or transformer folder (Wan or toy world)")
    p.add_argument("--world", choices=WORLDS, default="auto",
                   help="toy: the moving-shapes world (pixel clips, toy prompts); wan: Wan2.1 latents; auto: toy "
                        "when the model's config fits the toy world")
    p.add_argument("--prompt", action="append", default=None,
                   help="text prompt (Wan: one, needs a text encoder; toy: repeat for several clips)")
    p.add_argument("--prompts", default=None,
                   help="a text file of prompts, one per line: one video each, written into the folder --out as "
                        "'<prompt>-0.mp4' (VBench's naming), the i-th (from 0) with seed --seed + i")
    p.add_argument("--prompt-embeds", default=None,
                   help="precomputed prompt embedding: .safetensors with key text_emb [L, D] (Wan world)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (teacher CFG)")
    p.add_argument("--negative-prompt-embeds", default=None,
                   help="precomputed negative-prompt embedding (.safetensors, key text_emb [L, D]; Wan world)")
    p.add_argument("--components", default=None,
                   help="Wan diffusers folder supplying text_encoder/, tokenizer/ and vae/ when --model lacks them")
    p.add_argument("--steps", type=int, default=None,
                   help="outer steps M of a student (default: its tmd_sampling.json, else 2; a DMD2-v student "
                        f"else 4) or Euler steps of the teacher (default {TEACHER_STEPS})")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="inner flow-head steps N (student; default: its tmd_sampling.json, else 2)")
    p.add_argument("--cfg", type=float, default=None, help=f"guidance scale of the teacher (default {TEACHER_CFG})")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift of the grid (default: 10 student outer grid, 5 teacher)")
    p.add_argument("--inner-shift", type=float, default=None,
                   help="timestep shift of the inner grid (student; default 10)")
    p.add_argument("--height", type=int, default=None, help=f"video height in pixels (Wan; default {DEFAULT_HEIGHT})")
    p.add_argument("--width", type=int, default=None, help=f"video width in pixels (Wan; default {DEFAULT_WIDTH})")
    p.add_argument("--frames", type=int, default=None,
                   help=f"video frames (Wan; 4k+1 for Wan's VAE; default {DEFAULT_FRAMES})")
    p.add_argument("--fps", type=int, default=None,
                   help=f"frame rate of the mp4 (default {DEFAULT_FPS}) or GIF (default {DEFAULT_GIF_FPS})")
    p.add_argument("--scale", type=int, default=4, help="toy world: pixel upscaling of the PNG grid and the GIF")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", action="append", default=None,
                   help="Wan: output .mp4 (needs a VAE) or .safetensors latents (default sample.mp4 / "
                        "sample.safetensors); toy: .png grid, .gif and/or .safetensors clips, repeatable "
                        "(default sample.png)")
    p.add_argument("--max-text-len", type=int, default=512, help="tokens the prompt is padded/truncated to (Wan)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="transformer and text-encoder dtype (default bfloat16 on CUDA, float32 on CPU and in the "
                        "toy world)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="inner flow through tmd_ext.FlowHeadLoop (default: on with CUDA)")
    p.add_argument("--attention-backend", choices=tuple(ATTENTION_BACKENDS), default="native",
                   help="attention kernel of the transformer (diffusers' attention dispatcher; flash needs "
                        "pip install '.[flash]')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------ folders
def _read_json(path: Path, folder: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--model {folder}: {path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise UserError(f"--model {folder}: {path} must hold a JSON object")
    return value


def sampling_settings(folder: Path) -> dict:
    """The folder's ``tmd_sampling.json`` (stage 2's record of method and sampler settings), or {}."""
    path = folder / SAMPLING_FILE
    return _read_json(path, folder) if path.is_file() else {}


def model_kind(folder: Path) -> str:
    """``"student"`` (a tmd-student config.json), ``"few_step"`` (a DMD2-v transformer folder, per
    its tmd_sampling.json) or ``"teacher"`` (a Wan diffusers folder or a transformer folder) — a folder with its
    own config.json is judged by :func:`tmd_train.pipeline.folder_kind`, the rule the pipeline loads by."""
    from .pipeline import folder_kind

    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder")
    cfg = folder / CONFIG_NAME
    if cfg.is_file():
        _read_json(cfg, folder)  # an unreadable config.json is named as --model's
        try:
            return folder_kind(folder)
        except UserError:
            pass
    elif (folder / "model_index.json").is_file() or (folder / "transformer" / CONFIG_NAME).is_file():
        return "teacher"
    raise UserError(f"--model {folder}: neither a TMD student folder ({cfg} with format '{FORMAT}') nor a "
                    "Wan diffusers folder (model_index.json + transformer/) nor a transformer folder (config.json "
                    "of a WanTransformer3DModel)")


@dataclass(frozen=True)
class ModelFolder:
    """What ``--model`` is, read from its JSON files (no weights loaded)."""

    path: Path
    kind: str  #: "student" | "few_step" | "teacher" (see :func:`model_kind`)
    settings: dict  #: tmd_sampling.json, or {}
    transformer_config: dict  #: the WanTransformer3DModel config


def inspect_model(folder: str | Path) -> ModelFolder:
    """Kind, sampling settings and transformer config of a model folder (user errors as :class:`UserError`)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file() and _read_json(index, folder).get("_class_name") == "TMDPipeline":
        from .pipeline import folder_kind  # a TMDPipeline folder: its transformer/ decides

        inner = inspect_model(folder / "transformer")
        return ModelFolder(folder, folder_kind(folder / "transformer"), inner.settings, inner.transformer_config)
    kind = model_kind(folder)
    if kind == "student":
        config = _read_json(folder / CONFIG_NAME, folder).get("transformer")
        if not isinstance(config, dict):
            raise UserError(f"--model {folder}: {folder / CONFIG_NAME} has no 'transformer' object")
    elif (folder / "transformer" / CONFIG_NAME).is_file() and not (folder / CONFIG_NAME).is_file():
        config = _read_json(folder / "transformer" / CONFIG_NAME, folder)
    elif (folder / CONFIG_NAME).is_file():
        config = _read_json(folder / CONFIG_NAME, folder)
    else:
        raise UserError(f"--model {folder}: no transformer/{CONFIG_NAME}")
    return ModelFolder(folder, kind, sampling_settings(folder), config)


def resolve_world(world: str, model: ModelFolder) -> str:
    """``"toy"`` or ``"wan"``: ``world`` itself, or for ``"auto"`` whether the model fits the toy world."""
    mismatch = toy_config_mismatch(model.transformer_config)
    if world == "toy" and mismatch is not None:
        raise UserError(f"--world toy: --model {model.path} is not a toy-world model ({mismatch})")
    if world == "auto":
        return "toy" if mismatch is None else "wan"
    return world


def load_model(model: ModelFolder, dtype: torch.dtype, device: str) -> nn.Module:
    """The :class:`TMDStudent` (kind ``student``) or the ``WanTransformer3DModel`` of ``model``, in eval mode."""
    try:
        if model.kind == "student":
            return TMDStudent.from_pretrained(model.path, torch_dtype=dtype, device=device).eval()
        return load_teacher(model.path, torch_dtype=dtype, device=device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model.path}: cannot load the {model.kind.replace('_', '-')} model ({e})") from e


def find_component(name: str, folders: Sequence[Path]) -> Path | None:
    """The first ``folder/name`` that exists among ``folders``."""
    for f in folders:
        if (f / name).is_dir():
            return f / name
    return None


# ------------------------------------------------------------------------------ text
def load_embedding(path: str, what: str) -> torch.Tensor:
    """``[1, L, D]`` float32 from a .safetensors file with key ``text_emb`` ``[L, D]`` (or ``[1, L, D]``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    tensors = load_file(str(p))
    if "text_emb" not in tensors:
        raise UserError(f"{what} {p}: no key 'text_emb' (keys: {sorted(tensors)})")
    emb = tensors["text_emb"].float()
    if emb.dim() == 2:
        emb = emb[None]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise UserError(f"{what} {p}: text_emb must be [L, D], got {tuple(tensors['text_emb'].shape)}")
    return emb


def check_toy_prompt(prompt: str, what: str = "--prompt") -> None:
    """Raise :class:`UserError` (what is wrong, and the toy grammar with every valid word) unless
    ``prompt`` is a prompt of the toy world."""
    words = prompt.lower().split()
    unknown = [w for w in words if w not in text_encoder.VOCAB[1:]]
    if unknown:
        reason = f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
    elif not words:
        reason = "empty"
    else:
        try:
            parse_prompt(prompt)
            text_encoder.tokenize(prompt)
            return
        except ValueError:
            reason = "not of the grammar"
    raise UserError(f"{what} {prompt!r}: {reason}; {TOY_GRAMMAR}")


def encode_toy(prompts: Sequence[str], negative: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Toy text embeddings ``[P, 12, 32]`` of ``prompts`` and ``[1, 12, 32]`` of ``negative`` (both checked)."""
    for p in prompts:
        check_toy_prompt(p)
    if negative:
        unknown = [w for w in negative.lower().split() if w not in text_encoder.VOCAB[1:]]
        if unknown:
            raise UserError(f"--negative-prompt {negative!r}: unknown words {', '.join(map(repr, unknown))} "
                            f"(the toy vocabulary: {', '.join(text_encoder.VOCAB[1:])})")
    return text_encoder.encode(list(prompts))[0], text_encoder.encode([negative])[0]


# ------------------------------------------------------------------------------ video
def latent_shape(frames: int, height: int, width: int, channels: int, patch: Sequence[int],
                 scale_t: int, scale_s: int) -> tuple[int, int, int, int, int]:
    """``[1, C, F, H, W]`` latents of a ``frames × height × width`` video."""
    if frames < 1 or (frames - 1) % scale_t:
        raise UserError(f"--frames must be {scale_t}k+1 (the VAE compresses time {scale_t}x), got {frames}")
    for name, v in (("--height", height), ("--width", width)):
        if v < 1 or v % (scale_s * patch[1 if name == "--height" else 2]):
            raise UserError(f"{name} must be a positive multiple of {scale_s * patch[1 if name == '--height' else 2]} "
                            f"(VAE {scale_s}x times the patch size), got {v}")
    f = (frames - 1) // scale_t + 1
    if f % patch[0]:
        raise UserError(f"{f} latent frames are not a multiple of the temporal patch size {patch[0]}")
    return (1, channels, f, height // scale_s, width // scale_s)


def write_mp4(path: Path, frames: torch.Tensor, fps: int) -> None:
    """``[F, H, W, 3]`` uint8 -> H.264 mp4 through imageio-ffmpeg."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1) as w:
        for f in frames.numpy():
            w.append_data(f)


GRID_PAD = 2  # white pixels between the clips of a grid (before upscaling)


def clip_grid(clips: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """``[P, 3, F, H, W]`` clips in [-1, 1] -> ``[P·(H+2)-2, F·(W+2)-2, 3]·scale`` uint8: a row per clip,
    frames left to right, 2 white pixels apart, upscaled ``scale``× (nearest)."""
    c = clips.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    P, _, F, H, W = c.shape
    img = torch.full((P * (H + GRID_PAD) - GRID_PAD, F * (W + GRID_PAD) - GRID_PAD, 3), 255, dtype=torch.uint8)
    for r in range(P):
        for f in range(F):
            img[r * (H + GRID_PAD):r * (H + GRID_PAD) + H, f * (W + GRID_PAD):f * (W + GRID_PAD) + W] = \
                c[r, :, f].permute(1, 2, 0)
    return img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def clip_animation(clips: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """``[P, 3, F, H, W]`` clips in [-1, 1] -> ``[F, H·scale, (P·(W+2)-2)·scale, 3]`` uint8 frames: every clip
    side by side, 2 white pixels apart, upscaled ``scale``× (nearest)."""
    return torch.stack([clip_grid(clips[:, :, f:f + 1].transpose(0, 2), scale)
                        for f in range(clips.shape[2])])


def write_toy_outputs(outs: Sequence[Path], clips: torch.Tensor, prompts: Sequence[str], fps: int, scale: int,
                      meta: dict[str, str]) -> None:
    """Write ``clips [P, 3, 8, 32, 32]`` to each path of ``outs`` by its suffix (.png grid, .gif, .safetensors)."""
    import imageio.v3 as iio

    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".png":
            iio.imwrite(out, clip_grid(clips, scale).numpy())
        elif out.suffix == ".gif":
            iio.imwrite(out, clip_animation(clips, scale).numpy(), duration=1000 / fps, loop=0)
        else:
            save_file({"latents": clips.float().cpu().contiguous()}, str(out),
                      metadata={**meta, "prompts": json.dumps(list(prompts))})
            normalize_permissions(out)


# ------------------------------------------------------------------------------ sampling
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_steps(kind: str, steps: int | None, inner_steps: int | None, cfg: float | None) -> None:
    """User errors in the sampler options of a model of ``kind``."""
    if kind in ("student", "few_step"):
        if cfg is not None:
            raise UserError("--cfg applies to the teacher only (a distilled student is distilled with guidance)")
        for name, v in (("--steps", steps), ("--inner-steps", inner_steps)):
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {v}")
    elif steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")


def _options(args: argparse.Namespace, device: str) -> dict:
    return {"steps": args.steps, "inner_steps": args.inner_steps, "cfg": args.cfg, "shift": args.shift,
            "inner_shift": args.inner_shift, "show": not args.no_progress,
            "loop": args.loop if args.loop is not None else device.startswith("cuda")}


def run_toy(args: argparse.Namespace, model_folder: ModelFolder) -> dict:
    """The toy world: toy prompts -> pixel clips -> PNG grid / GIF / safetensors."""
    device = args.device
    for flag, value in (("--prompt-embeds", args.prompt_embeds), ("--negative-prompt-embeds",
                                                                   args.negative_prompt_embeds),
                        ("--components", args.components), ("--height", args.height), ("--width", args.width),
                        ("--frames", args.frames)):
        if value is not None:
            raise UserError(f"{flag} does not apply to the toy world (toy prompts are encoded by "
                            f"tmd_train.toy.text_encoder; clips are {'x'.join(map(str, TOY_CLIP_SHAPE[1:]))} pixels, "
                            "no VAE)")
    if not args.prompt:
        raise UserError(f"pass --prompt (repeat it for several clips); {TOY_GRAMMAR}")
    if args.scale < 1:
        raise UserError(f"--scale must be >= 1, got {args.scale}")
    outs = [Path(o) for o in (args.out or ["sample.png"])]
    for out in outs:
        if out.suffix not in TOY_SUFFIXES:
            raise UserError(f"--out must end in {', '.join(TOY_SUFFIXES)} in the toy world (no VAE), got {out}")
        if out.is_dir():
            raise OutputError(f"--out {out} is a folder; name a file")
    fps = args.fps or DEFAULT_GIF_FPS
    if fps < 1:
        raise UserError(f"--fps must be >= 1, got {fps}")
    check_steps(model_folder.kind, args.steps, args.inner_steps, args.cfg)
    text, negative = encode_toy(args.prompt, args.negative_prompt)
    dtype = DTYPES[args.dtype or "float32"]
    model = load_model(model_folder, dtype, device)
    if args.attention_backend != "native":
        set_attention_backend(model, args.attention_backend, key="--attention-backend")
    generator = torch.Generator().manual_seed(args.seed)
    shape = (len(args.prompt), *TOY_CLIP_SHAPE)
    _sync(device)
    t0 = time.perf_counter()
    result, label, _ = sample_model(model, model_folder.kind, model_folder.settings, text.to(dtype), shape=shape,
                                 generator=generator, negative=negative.to(dtype), **_options(args, device))
    _sync(device)
    seconds = time.perf_counter() - t0
    clips = result.x0.float().cpu().clamp(-1, 1)
    meta = {"model": str(model_folder.path), "kind": model_folder.kind, "nfe": f"{result.nfe:.6g}",
            "seed": str(args.seed)}
    try:
        write_toy_outputs(outs, clips, args.prompt, fps, args.scale, meta)
    except OSError as e:
        raise OutputError(f"--out {e.filename or ', '.join(map(str, outs))}: cannot write ({e.strerror or e})") from e
    print(f"{label}: NFE {result.nfe:.3f}, sampling {seconds:.2f} s -> {', '.join(map(str, outs))}")
    return {"kind": model_folder.kind, "world": "toy", "label": label, "nfe": result.nfe, "seconds": seconds,
            "out": [str(o) for o in outs], "latent_shape": list(shape)}


def read_prompt_file(path: str) -> list[str]:
    """The prompts of ``--prompts FILE``: one per line, blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {p}: no such file")
    try:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts {p}: not UTF-8 text ({e})") from e
    if not prompts:
        raise UserError(f"--prompts {p}: no prompts (one per line)")
    return prompts


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; returns a summary dict (also printed)."""
    device = args.device
    folder = Path(args.model)
    model_folder = inspect_model(folder)
    if args.prompts is not None:
        if args.prompt:
            raise UserError("pass --prompt or --prompts, not both")
        args.prompt = read_prompt_file(args.prompts)
    if resolve_world(args.world, model_folder) == "toy":
        return run_toy(args, model_folder)
    kind = model_folder.kind
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    folders = [folder] + ([Path(args.components)] if args.components else [])
    if args.components and not Path(args.components).is_dir():
        raise UserError(f"--components {args.components}: no such folder")
    check_steps(kind, args.steps, args.inner_steps, args.cfg)

    if args.prompt_embeds is None and not args.prompt:
        raise UserError("pass --prompt or --prompt-embeds")
    many = args.prompts is not None
    if args.prompt and len(args.prompt) > 1 and not many:
        raise UserError(f"one --prompt per Wan video, got {len(args.prompt)} (several: --prompts FILE --out DIR)")
    if many and args.prompt_embeds is not None:
        raise UserError("--prompts takes text prompts (encoded by the text encoder), not --prompt-embeds")
    if args.out and len(args.out) > 1:
        raise UserError(f"one --out per Wan video, got {len(args.out)}")
    vae_dir = find_component("vae", folders)
    if many:
        out = Path(args.out[0]) if args.out else Path("samples")
        if out.suffix in (".mp4", ".safetensors") or out.is_file():
            raise UserError(f"--out {out}: with --prompts, --out is the folder the videos are written to")
        if vae_dir is None:
            raise UserError(f"no vae/ in {', '.join(map(str, folders))}: --prompts writes mp4s, which need a VAE; "
                            "pass --components")
    else:
        out = Path(args.out[0]) if args.out else Path("sample.mp4" if vae_dir else "sample.safetensors")
        if out.suffix not in (".mp4", ".safetensors"):
            raise UserError(f"--out must end in .mp4 or .safetensors, got {out}")
        if out.suffix == ".mp4" and vae_dir is None:
            raise UserError(f"no vae/ in {', '.join(map(str, folders))}: an mp4 needs a VAE; "
                            "write the latents with --out FILE.safetensors or pass --components")
    write_video = many or out.suffix == ".mp4"

    # Text conditioning: [1, L, D] embeddings of the prompt (and of the negative prompt).
    needs_negative = kind == "teacher" and (args.cfg if args.cfg is not None else TEACHER_CFG) != 1.0
    needs_encoder = args.prompt_embeds is None or (needs_negative and args.negative_prompt_embeds is None)
    if needs_encoder and (find_component("text_encoder", folders) is None
                          or find_component("tokenizer", folders) is None):
        raise UserError(f"no text_encoder/ + tokenizer/ in {', '.join(map(str, folders))}: pass "
                        "--prompt-embeds (and --negative-prompt-embeds for CFG) or --components")
    text = load_embedding(args.prompt_embeds, "--prompt-embeds") if args.prompt_embeds is not None else None
    negative = (load_embedding(args.negative_prompt_embeds, "--negative-prompt-embeds")
                if needs_negative and args.negative_prompt_embeds else None)

    # The pipeline: the model, and the components this run needs (nothing else is loaded).
    from .pipeline import TMDPipeline

    skip = {} if needs_encoder else {"text_encoder": None, "tokenizer": None}
    if not write_video:
        skip["vae"] = None
    try:
        pipe = TMDPipeline.from_pretrained(folder, wan=args.components, torch_dtype=dtype, **skip)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {folder}: cannot load the {kind.replace('_', '-')} model ({e})") from e
    pipe.to(device)
    if args.attention_backend != "native":
        set_attention_backend(pipe.wan_transformer, args.attention_backend, key="--attention-backend")
    pipe.set_progress_bar_config(disable=args.no_progress)
    tc = pipe.wan_transformer.config
    if text is not None and text.shape[-1] != tc.text_dim:
        raise UserError(f"the prompt embedding has width {text.shape[-1]} but the model expects "
                        f"text_dim={tc.text_dim}")
    if pipe.vae is not None and pipe.vae.config.z_dim != tc.in_channels:
        raise UserError(f"{vae_dir}: z_dim={pipe.vae.config.z_dim} differs from the transformer's "
                        f"in_channels={tc.in_channels}")
    frames, height, width = args.frames or DEFAULT_FRAMES, args.height or DEFAULT_HEIGHT, args.width or DEFAULT_WIDTH
    shape = latent_shape(frames, height, width, tc.in_channels, tc.patch_size, pipe.vae_scale_factor_temporal,
                         pipe.vae_scale_factor_spatial)
    opts = _options(args, device)
    call = {"num_frames": frames, "height": height, "width": width, "outer_steps": opts["steps"],
            "inner_steps": opts["inner_steps"], "guidance_scale": opts["cfg"], "shift": opts["shift"],
            "inner_shift": opts["inner_shift"], "use_flow_head_loop": opts["loop"],
            "max_sequence_length": args.max_text_len, "output_type": "latent"}
    label = sampler_label(pipe.kind, pipe.settings(steps=opts["steps"], inner_steps=opts["inner_steps"],
                                                   cfg=opts["cfg"], shift=opts["shift"],
                                                   inner_shift=opts["inner_shift"]),
                          pipe.transformer, opts["loop"])
    prompts = list(args.prompt) if args.prompt else [None]
    outs = [out / video_name(p, 0) for p in prompts] if many else [out]
    seconds, nfe = 0.0, 0.0
    for i, (prompt, path) in enumerate(zip(prompts, outs, strict=True)):
        generator = torch.Generator().manual_seed(args.seed + i)
        _sync(device)
        t0 = time.perf_counter()
        result = pipe(prompt=prompt if text is None else None, prompt_embeds=text,
                      negative_prompt=args.negative_prompt, negative_prompt_embeds=negative, generator=generator,
                      **call)
        _sync(device)
        seconds += time.perf_counter() - t0
        nfe = result.nfe
        latents = result.frames
        try:
            if write_video:
                video = pipe.decode_latents(latents)[0]  # [3, F, H, W] in [-1, 1]
                write_mp4(path, ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu(),
                          args.fps or DEFAULT_FPS)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                meta = {"model": str(folder), "kind": kind, "nfe": f"{nfe:.6g}", "seed": str(args.seed + i)}
                save_file({"latents": latents.float().cpu().contiguous()}, str(path), metadata=meta)
                normalize_permissions(path)
        except OSError as e:
            raise OutputError(f"--out {path}: cannot write ({e.strerror or e})") from e
    where = out if many else outs[0]
    summary = {"kind": kind, "world": "wan", "label": label, "nfe": nfe, "seconds": seconds, "out": str(where),
               "latent_shape": list(shape), "videos": len(outs)}
    print(f"{label}: NFE {nfe:.3f}, sampling {seconds:.2f} s -> {where}" + (f" ({len(outs)} videos)" if many else ""))
    return summary


def _main(argv: Sequence[str]) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors print ``error: …`` and return 2 (see :func:`tmd_train.errors.run_main`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
