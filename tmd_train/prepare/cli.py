"""The ``python -m tmd_train.prepare`` command line (see :mod:`tmd_train.prepare`)."""
from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.format import FLOAT_DTYPES
from ..errors import ArgumentParser, UserError, run_main
from ..models.attention import ATTENTION_BACKENDS, DEFAULT_BACKEND, check_attention_backend
from ..text.umt5 import WAN_NEGATIVE_PROMPT
from . import runner
from .common import check_positive, find_components, latent_size, pick_device, pick_precision, read_json, vae_scales

#: Wan2.1 video defaults: 81 frames (4k+1) at 16 fps, 480 × 832.
FRAMES, FPS, HEIGHT, WIDTH = 81, 16, 480, 832


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset folder (restart the same command to resume it)")
    p.add_argument("--frames", type=int, default=FRAMES, help="video frames (4k+1 for Wan's VAE)")
    p.add_argument("--height", type=int, default=HEIGHT, help="video height in pixels")
    p.add_argument("--width", type=int, default=WIDTH, help="video width in pixels")
    p.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT,
                   help="negative prompt stored as the dataset's negative embedding (default: Wan's)")
    p.add_argument("--max-text-len", type=int, default=512, help="UMT5 tokens (padded/truncated; Wan: 512)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per model call (part of the run's identity)")
    p.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default="bfloat16", help="storage dtype")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype of the transformer and text encoder (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda:LOCAL_RANK with a GPU, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run / dataset in --out")
    p.add_argument("--limit", type=int, default=None, help="only the first N clips (a trial run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tmd_train.prepare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, parser_class=ArgumentParser)
    s = sub.add_parser("synthetic", help="teacher samples of prompts (the paper's data; also KD pairs)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--teacher", required=True, help="Wan2.1 diffusers folder (transformer/, text_encoder/, tokenizer/)")
    s.add_argument("--components", default=None,
                   help="Wan diffusers folder supplying text_encoder/ and tokenizer/ when --teacher lacks them")
    s.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl (field 'prompt')")
    s.add_argument("--clips-per-prompt", type=int, default=1, help="clips per prompt (different noise)")
    s.add_argument("--steps", type=int, default=50, help="teacher Euler steps")
    s.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    s.add_argument("--shift", type=float, default=5.0, help="timestep shift of the Euler grid")
    s.add_argument("--t-max", type=float, default=0.999,
                   help="first time of the ODE: the stored noise is x at t_max (the student's t_max)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise (clip i uses (seed, i))")
    s.add_argument("--attention-backend", choices=tuple(ATTENTION_BACKENDS), default=DEFAULT_BACKEND,
                   help="the teacher's attention kernel (diffusers' dispatcher; docs/design.md §8.4); not part of "
                        "the run's identity, so a run may resume with another")
    _common(s)
    v = sub.add_parser("videos", help="real videos with captions -> Wan VAE latents",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--components", required=True, help="Wan2.1 diffusers folder (vae/, text_encoder/, tokenizer/)")
    v.add_argument("--videos", required=True,
                   help="CSV / JSONL with a video path and a caption per row, or a folder of videos with .txt captions")
    v.add_argument("--video-key", default=None, help="column/field of the video path (default: video, path, file, "
                   "filename or video_path)")
    v.add_argument("--caption-key", default=None, help="column/field of the caption (default: caption, prompt or text)")
    v.add_argument("--fps", type=float, default=FPS, help="frame rate the clip is sampled at")
    v.add_argument("--workers", type=int, default=4, help="decoding threads per process (0: in the main thread)")
    v.add_argument("--teacher", default=None,
                   help="teacher folder whose transformer config is recorded and checked (default: --components)")
    _common(v)
    return p


def _teacher_config(folder: str | None) -> dict | None:
    if folder is None:
        return None
    path = Path(folder) / "transformer" / "config.json"
    if not path.is_file():
        path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    return {k: v for k, v in read_json(path).items() if not k.startswith("_")}


def _digest(value) -> str:
    """SHA-256 of ``value`` as JSON: a resumed run must read the same prompts / video list."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _plan(args: argparse.Namespace, kind: str, num_items: int, settings: dict, teacher_config: dict | None,
          metadata: dict) -> runner.Plan:
    n = min(num_items, args.limit) if args.limit else num_items
    return runner.Plan(out=Path(args.out), kind=kind, num_items=n, shard_size=args.shard_size,
                       batch_size=args.batch_size, dtype=FLOAT_DTYPES[args.dtype], settings=settings,
                       teacher_config=teacher_config, metadata=metadata)


def run_synthetic(args: argparse.Namespace) -> dict:
    from .synthetic import SyntheticWorker, read_prompts

    check_positive(args, ("clips_per_prompt", "steps", "batch_size", "shard_size", "max_text_len", "limit"))
    if not 0.0 < args.t_max <= 1.0:
        raise UserError(f"--t-max must be in (0, 1], got {args.t_max}")
    folders = [("--teacher", args.teacher)] + ([("--components", args.components)] if args.components else [])
    comps = find_components(("transformer", "text_encoder", "tokenizer"), folders)
    tcfg = _teacher_config(args.teacher)
    assert tcfg is not None
    vae_dir = next((Path(f) / "vae" for _, f in folders if (Path(f) / "vae" / "config.json").is_file()), None)
    size = latent_size(args.frames, args.height, args.width, tcfg.get("patch_size", (1, 2, 2)), *vae_scales(vae_dir))
    shape = (int(tcfg["in_channels"]), *size)
    prompts = read_prompts(args.prompts)
    settings = {"source": "synthetic", "teacher": str(Path(args.teacher).resolve()),
                "prompts": str(Path(args.prompts).resolve()), "num_prompts": len(prompts),
                "prompts_sha256": _digest(prompts),
                "clips_per_prompt": args.clips_per_prompt, "steps": args.steps, "cfg": args.cfg,
                "shift": args.shift, "t_max": args.t_max, "seed": args.seed, "frames": args.frames,
                "height": args.height, "width": args.width, "latent_shape": list(shape),
                "negative_prompt": args.negative_prompt, "max_text_len": args.max_text_len,
                "batch_size": args.batch_size, "shard_size": args.shard_size, "dtype": args.dtype,
                "precision": args.precision, "limit": args.limit}
    meta = {"source": "teacher samples", "steps": args.steps, "cfg": args.cfg, "shift": args.shift,
            "t_max": args.t_max, "seed": args.seed, "negative_prompt": args.negative_prompt,
            "frames": args.frames, "height": args.height, "width": args.width}
    plan = _plan(args, "latents", len(prompts) * args.clips_per_prompt, settings, tcfg, meta)
    device = pick_device(args.device)
    compute = pick_precision(args.precision, device)
    check_attention_backend(args.attention_backend, key="--attention-backend", device=device)

    def make() -> SyntheticWorker:
        return SyntheticWorker(prompts=prompts, clips_per_prompt=args.clips_per_prompt, components=comps,
                               latent_shape=shape, negative_prompt=args.negative_prompt, steps=args.steps,
                               cfg=args.cfg, shift=args.shift, t_max=args.t_max, seed=args.seed,
                               max_text_len=args.max_text_len, device=device, compute=compute,
                               storage=FLOAT_DTYPES[args.dtype], attention_backend=args.attention_backend)
    return runner.run(plan, make, overwrite=args.overwrite, progress=not args.no_progress, desc="synthetic")


def run_videos(args: argparse.Namespace) -> dict:
    from .videos import VideoWorker, read_video_list

    check_positive(args, ("batch_size", "shard_size", "max_text_len", "limit"))
    if args.fps <= 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    comps = find_components(("vae", "text_encoder", "tokenizer"), [("--components", args.components)])
    tcfg = _teacher_config(args.teacher or args.components)
    vae_cfg = read_json(comps["vae"] / "config.json")
    patch = tcfg.get("patch_size", (1, 2, 2)) if tcfg else (1, 1, 1)
    size = latent_size(args.frames, args.height, args.width, patch, *vae_scales(comps["vae"]))
    if tcfg and vae_cfg.get("z_dim") != tcfg.get("in_channels"):
        raise UserError(f"{comps['vae']}: z_dim={vae_cfg.get('z_dim')} differs from the teacher's in_channels="
                        f"{tcfg.get('in_channels')}")
    entries = read_video_list(args.videos, args.video_key, args.caption_key)
    settings = {"source": "videos", "components": str(Path(args.components).resolve()),
                "videos": str(Path(args.videos).resolve()), "num_videos": len(entries), "fps": args.fps,
                "videos_sha256": _digest([[e.video, e.caption] for e in entries]),
                "frames": args.frames, "height": args.height, "width": args.width,
                "latent_shape": [int(vae_cfg.get("z_dim", 16)), *size], "negative_prompt": args.negative_prompt,
                "max_text_len": args.max_text_len, "batch_size": args.batch_size, "shard_size": args.shard_size,
                "dtype": args.dtype, "precision": args.precision, "limit": args.limit,
                "video_key": args.video_key, "caption_key": args.caption_key}
    meta = {"source": "videos", "fps": args.fps, "frames": args.frames, "height": args.height, "width": args.width,
            "negative_prompt": args.negative_prompt, "vae_latents": "(mode(z) - latents_mean) / latents_std"}
    plan = _plan(args, "latents", len(entries), settings, tcfg, meta)
    device = pick_device(args.device)
    compute = pick_precision(args.precision, device)

    def make() -> VideoWorker:
        return VideoWorker(entries=entries, components=comps, frames=args.frames, fps=args.fps, height=args.height,
                           width=args.width, negative_prompt=args.negative_prompt, max_text_len=args.max_text_len,
                           device=device, compute=compute, workers=args.workers)
    return runner.run(plan, make, overwrite=args.overwrite, progress=not args.no_progress, desc="videos")


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    with torch.no_grad():
        summary = run_synthetic(args) if args.source == "synthetic" else run_videos(args)
    if runner.dist_env()[0] == 0:
        print(f"prepare {args.source}: " + runner.format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors print one line ``error: …`` and return 2 (:func:`tmd_train.errors.run_main`)."""
    return run_main(_main, argv)
