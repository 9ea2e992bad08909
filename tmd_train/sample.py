"""Sampling CLI: ``python -m tmd_train.sample --model DIR --prompt "..." [options]``.

``--model`` is either

* a TMD student folder (``config.json`` of format ``tmd-student`` + ``model.safetensors``, written
  by ``TMDStudent.save_pretrained``): Algorithm 1 with ``--steps`` outer steps M and
  ``--inner-steps`` N (the inner flow through ``tmd_ext.FlowHeadLoop`` with ``--loop``, the default
  on CUDA); or
* a Wan2.1 diffusers folder (``model_index.json`` + ``transformer/``, the teacher baseline):
  flow-matching Euler with ``--steps`` steps and classifier-free guidance ``--cfg``; or
* a stage-2 DMD2-v student (a Wan transformer folder with ``tmd_sampling.json`` saying
  ``"method": "dmd2v"``): the plain few-step sampler (no CFG).

A ``tmd_sampling.json`` in the folder (written by ``python -m tmd_train.stage2``) supplies the
defaults of a distilled model: outer steps M, inner steps N and the grid shifts it was trained for.

The prompt is encoded with ``text_encoder/`` (``UMT5EncoderModel``) and ``tokenizer/`` found in the
model folder or in ``--components DIR`` (a Wan diffusers folder) by
:class:`~tmd_train.text.umt5.PromptEncoder`, as diffusers' ``WanPipeline`` does (padded to
``--max-text-len`` tokens, zeros after the prompt), or read from ``--prompt-embeds FILE.safetensors``
(key ``text_emb`` ``[L, D]``). The latents are decoded with ``vae/`` (``AutoencoderKLWan``) into an
mp4 (imageio-ffmpeg); ``--out X.safetensors`` (the only choice without a VAE) writes the latents
instead (key ``latents`` ``[1, C, F, H, W]``). Everything is loaded with ``local_files_only``:
nothing is downloaded. Prints the measured NFE and the sampling time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .models import TMDStudent, load_teacher
from .models.student import CONFIG_NAME, FORMAT
from .sampling import Sample, sample_few_step, sample_teacher, sample_tmd, sample_tmd_looped
from .text.umt5 import PromptEncoder

SAMPLING_FILE = "tmd_sampling.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Wan's VAE: 4x temporal, 8x spatial compression (used when the folder has no VAE config).
DEFAULT_SCALE_TEMPORAL = 4
DEFAULT_SCALE_SPATIAL = 8


class CLIError(Exception):
    """A user error: printed as ``error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tmd_train.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="TMD student folder or Wan2.1 diffusers folder")
    p.add_argument("--prompt", default=None, help="text prompt (needs a text encoder)")
    p.add_argument("--prompt-embeds", default=None,
                   help="precomputed prompt embedding: .safetensors with key text_emb [L, D]")
    p.add_argument("--negative-prompt", default="", help="negative prompt (teacher CFG)")
    p.add_argument("--negative-prompt-embeds", default=None,
                   help="precomputed negative-prompt embedding (.safetensors, key text_emb [L, D])")
    p.add_argument("--components", default=None,
                   help="Wan diffusers folder supplying text_encoder/, tokenizer/ and vae/ when --model lacks them")
    p.add_argument("--steps", type=int, default=None,
                   help="outer steps M of a student (default: its tmd_sampling.json, else 2) or Euler steps of "
                        "the teacher (default 50)")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="inner flow-head steps N (student; default: its tmd_sampling.json, else 2)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of the teacher (default 5.0)")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift of the grid (default: 10 student outer grid, 5 teacher)")
    p.add_argument("--inner-shift", type=float, default=None,
                   help="timestep shift of the inner grid (student; default 10)")
    p.add_argument("--height", type=int, default=480, help="video height in pixels")
    p.add_argument("--width", type=int, default=832, help="video width in pixels")
    p.add_argument("--frames", type=int, default=81, help="video frames (4k+1 for Wan's VAE)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the mp4")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", default=None,
                   help="output .mp4 (needs a VAE) or .safetensors latents (default sample.mp4 / sample.safetensors)")
    p.add_argument("--max-text-len", type=int, default=512, help="tokens the prompt is padded/truncated to")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="transformer and text-encoder dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="inner flow through tmd_ext.FlowHeadLoop (default: on with CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------ folders
def sampling_settings(folder: Path) -> dict:
    """The folder's ``tmd_sampling.json`` (stage 2's record of method and sampler settings), or {}."""
    path = folder / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"--model {folder}: {path} is not valid JSON ({e})") from e
    if not isinstance(settings, dict):
        raise CLIError(f"--model {folder}: {path} must hold a JSON object")
    return settings


def model_kind(folder: Path) -> str:
    """``"student"`` (a tmd-student config.json), ``"few_step"`` (a DMD2-v transformer folder, per
    its tmd_sampling.json) or ``"teacher"`` (a Wan diffusers folder)."""
    if not folder.is_dir():
        raise CLIError(f"--model {folder}: no such folder")
    if sampling_settings(folder).get("method") == "dmd2v" and (folder / CONFIG_NAME).is_file():
        return "few_step"
    cfg = folder / CONFIG_NAME
    if cfg.is_file():
        try:
            fmt = json.loads(cfg.read_text()).get("format")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CLIError(f"--model {folder}: {cfg} is not a JSON object ({e})") from e
        if fmt == FORMAT:
            return "student"
    if (folder / "model_index.json").is_file() or (folder / "transformer" / "config.json").is_file():
        return "teacher"
    raise CLIError(f"--model {folder}: neither a TMD student folder ({cfg} with format '{FORMAT}') nor a "
                   "Wan diffusers folder (model_index.json + transformer/)")


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
        raise CLIError(f"{what} {p}: no such file")
    tensors = load_file(str(p))
    if "text_emb" not in tensors:
        raise CLIError(f"{what} {p}: no key 'text_emb' (keys: {sorted(tensors)})")
    emb = tensors["text_emb"].float()
    if emb.dim() == 2:
        emb = emb[None]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise CLIError(f"{what} {p}: text_emb must be [L, D], got {tuple(tensors['text_emb'].shape)}")
    return emb


# ------------------------------------------------------------------------------ video
def latent_shape(frames: int, height: int, width: int, channels: int, patch: Sequence[int],
                 scale_t: int, scale_s: int) -> tuple[int, int, int, int, int]:
    """``[1, C, F, H, W]`` latents of a ``frames × height × width`` video."""
    if frames < 1 or (frames - 1) % scale_t:
        raise CLIError(f"--frames must be {scale_t}k+1 (the VAE compresses time {scale_t}x), got {frames}")
    for name, v in (("--height", height), ("--width", width)):
        if v < 1 or v % (scale_s * patch[1 if name == "--height" else 2]):
            raise CLIError(f"{name} must be a positive multiple of {scale_s * patch[1 if name == '--height' else 2]} "
                           f"(VAE {scale_s}x times the patch size), got {v}")
    f = (frames - 1) // scale_t + 1
    if f % patch[0]:
        raise CLIError(f"{f} latent frames are not a multiple of the temporal patch size {patch[0]}")
    return (1, channels, f, height // scale_s, width // scale_s)


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``[1, C, F, H, W]`` normalised latents -> ``[F', H', W', 3]`` uint8 frames (Wan's
    de-normalisation ``z·std + mean``, then ``vae.decode``, ``[-1, 1] -> [0, 255]``)."""
    cfg = vae.config
    dev = next(vae.parameters()).device
    z = latents.to(dev, torch.float32)
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    video = vae.decode(z * std + mean, return_dict=False)[0]  # [1, 3, F', H', W'] in [-1, 1]
    video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video[0].permute(1, 2, 3, 0).cpu()


def write_mp4(path: Path, frames: torch.Tensor, fps: int) -> None:
    """``[F, H, W, 3]`` uint8 -> H.264 mp4 through imageio-ffmpeg."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1) as w:
        for f in frames.numpy():
            w.append_data(f)


# ------------------------------------------------------------------------------ sampling
@contextmanager
def progress(module: nn.Module, total: int, desc: str, enabled: bool) -> Iterator[None]:
    """A tqdm bar advanced by every forward of ``module`` (one per backbone pass or teacher pass)."""
    if not enabled:
        yield
        return
    bar = tqdm(total=total, desc=desc, unit="pass", file=sys.stderr)

    def hook(*_) -> None:  # a pre-hook returning a value would replace the module's inputs
        bar.update(1)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; returns a summary dict (also printed)."""
    device = args.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    folder = Path(args.model)
    kind = model_kind(folder)
    folders = [folder] + ([Path(args.components)] if args.components else [])
    if args.components and not Path(args.components).is_dir():
        raise CLIError(f"--components {args.components}: no such folder")
    settings = sampling_settings(folder)
    if kind in ("student", "few_step"):
        if args.cfg is not None:
            raise CLIError("--cfg applies to the teacher only (a distilled student is distilled with guidance)")
        for name, v in (("--steps", args.steps), ("--inner-steps", args.inner_steps)):
            if v is not None and v < 1:
                raise CLIError(f"{name} must be >= 1, got {v}")
    elif args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")

    if args.prompt_embeds is None and not args.prompt:
        raise CLIError("pass --prompt or --prompt-embeds")
    vae_dir = find_component("vae", folders)
    out = Path(args.out) if args.out else Path("sample.mp4" if vae_dir else "sample.safetensors")
    if out.suffix not in (".mp4", ".safetensors"):
        raise CLIError(f"--out must end in .mp4 or .safetensors, got {out}")
    if out.suffix == ".mp4" and vae_dir is None:
        raise CLIError(f"no vae/ in {', '.join(map(str, folders))}: an mp4 needs a VAE; "
                       "write the latents with --out FILE.safetensors or pass --components")

    # Text conditioning: [1, L, D] embeddings of the prompt (and of the negative prompt).
    needs_negative = kind == "teacher" and (args.cfg if args.cfg is not None else 5.0) != 1.0
    encoder = None
    if args.prompt_embeds is None or (needs_negative and args.negative_prompt_embeds is None):
        te, tok = find_component("text_encoder", folders), find_component("tokenizer", folders)
        if te is None or tok is None:
            raise CLIError(f"no text_encoder/ + tokenizer/ in {', '.join(map(str, folders))}: pass "
                           "--prompt-embeds (and --negative-prompt-embeds for CFG) or --components")
        encoder = PromptEncoder(te, tok, device, dtype, args.max_text_len)
    text = (load_embedding(args.prompt_embeds, "--prompt-embeds") if args.prompt_embeds is not None
            else encoder(args.prompt))
    negative = None
    if needs_negative:
        negative = (load_embedding(args.negative_prompt_embeds, "--negative-prompt-embeds")
                    if args.negative_prompt_embeds else encoder(args.negative_prompt))
    del encoder

    # The model.
    if kind == "student":
        model = TMDStudent.from_pretrained(folder, torch_dtype=dtype, device=device).eval()
        transformer = model.transformer
    elif kind == "few_step":
        model = load_teacher(folder, torch_dtype=dtype, device=device)
        transformer = model
    else:
        model = load_teacher(folder, torch_dtype=dtype, device=device)
        transformer = model
    tc = transformer.config
    if text.shape[-1] != tc.text_dim:
        raise CLIError(f"the prompt embedding has width {text.shape[-1]} but the model expects text_dim={tc.text_dim}")
    vae = None
    if out.suffix == ".mp4":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(vae_dir, local_files_only=True, torch_dtype=torch.float32)
        vae.to(device).eval()
        if vae.config.z_dim != tc.in_channels:
            raise CLIError(f"{vae_dir}: z_dim={vae.config.z_dim} differs from the transformer's "
                           f"in_channels={tc.in_channels}")
        scale_t, scale_s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    else:
        scale_t, scale_s = DEFAULT_SCALE_TEMPORAL, DEFAULT_SCALE_SPATIAL
    shape = latent_shape(args.frames, args.height, args.width, tc.in_channels, tc.patch_size, scale_t, scale_s)

    generator = torch.Generator().manual_seed(args.seed)
    show = not args.no_progress
    use_loop = args.loop if args.loop is not None else device.startswith("cuda")
    _sync(device)
    t0 = time.perf_counter()
    if kind == "student":
        M = args.steps or settings.get("outer_steps", 2)
        N = args.inner_steps or settings.get("inner_steps", 2)
        kw = {"shape": shape, "generator": generator, "M": M, "N": N,
              "outer_shift": args.shift if args.shift is not None else settings.get("outer_shift", 10.0),
              "inner_shift": args.inner_shift if args.inner_shift is not None else settings.get("inner_shift", 10.0),
              "t_max": settings.get("t_max", 0.999), "s_max": settings.get("s_max", 0.999)}
        with progress(transformer.condition_embedder, M, "TMD outer steps", show):
            result: Sample = sample_tmd_looped(model, text, **kw) if use_loop else sample_tmd(model, text, **kw)
        label = f"TMD student M={M} N={N} H={model.head_blocks} L={model.num_layers}" + (
            " (FlowHeadLoop)" if use_loop else "")
    elif kind == "few_step":
        M = args.steps or settings.get("outer_steps", 4)
        with progress(transformer.condition_embedder, M, "few-step student", show):
            result = sample_few_step(model, text, shape=shape, generator=generator, steps=M,
                                     shift=args.shift if args.shift is not None else settings.get("outer_shift", 10.0),
                                     t_max=settings.get("t_max", 0.999))
        label = f"DMD2-v student M={M}"
    else:
        steps, cfg = args.steps or 50, args.cfg if args.cfg is not None else 5.0
        passes = 1 if cfg == 1.0 or negative.shape[1] == text.shape[1] else 2
        with progress(transformer.condition_embedder, steps * passes, "teacher steps", show):
            result = sample_teacher(model, text, negative_text=negative, shape=shape, generator=generator,
                                    steps=steps, cfg=cfg, shift=args.shift if args.shift is not None else 5.0)
        label = f"teacher {steps} steps cfg={cfg}"
    _sync(device)
    seconds = time.perf_counter() - t0

    if vae is not None:
        write_mp4(out, decode(vae, result.x0), args.fps)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": str(folder), "kind": kind, "nfe": f"{result.nfe:.6g}", "seed": str(args.seed)}
        save_file({"latents": result.x0.float().cpu().contiguous()}, str(out), metadata=meta)
    summary = {"kind": kind, "label": label, "nfe": result.nfe, "seconds": seconds, "out": str(out),
               "latent_shape": list(shape)}
    print(f"{label}: NFE {result.nfe:.3f}, sampling {seconds:.2f} s -> {out}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
