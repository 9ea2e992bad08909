"""TinyBench: a VBench-like score for clips of the moving-shapes world.

``tinybench(clips [N, 3, 8, 32, 32], prompts) -> dict``. Clips are clamped to [-1, 1] (what a
viewer of the saved video sees). The reference is **real clips for the same prompts**: prompt
``i mod N`` rendered by the world with nuisance factors (size, speed, start, background) from
``clip_generator(ref_seed, i)``, ``n_ref`` clips in all, so a generator is compared with the real
world under its own prompt distribution.

* **semantic** — the evaluator (:mod:`tmd_train.toy.evaluator`) predicts shape, colour and direction of
  each clip; an attribute is correct when it equals the prompt's (for a two-object prompt: the
  attribute of either object, since the evaluator cannot tell which object is "first").
  ``semantic_accuracy`` = mean over the three attributes and the clips; ``semantic = 100·accuracy``.
* **fd_score** — Fréchet distance between Gaussians fitted to evaluator features of the generated and
  the reference clips, both divided per dimension by the reference's standard deviation (so FD is in
  units of the real spread); ``fd_score = 100·exp(-FD / KAPPA_FD)``.
* **temporal_score** — per clip, ``[log mean|x_{f+1} - x_f|, log mean|x_{f+1} - 2x_f + x_{f-1}|]``
  (frame change and its change: motion amount and flicker/jerkiness); the Fréchet distance of these
  2-D statistics between generated and reference clips, normalised the same way;
  ``temporal_score = 100·exp(-FD_t / KAPPA_TEMPORAL)``.
* **quality** = ``(fd_score + temporal_score) / 2``;
  **total** = ``(4·quality + 1·semantic) / 5`` — VBench's 4:1 weighting of quality and semantic.

All scores lie in [0, 100]. The κ's were set once from the shipped evaluator (see
``tmd_train/toy/assets/README.md``): real clips score near 100, pure noise near 0.

CLI::

    python -m tmd_train.toy.tinybench --clips DIR    # DIR/clips.safetensors (key "clips") + DIR/prompts.jsonl
    python -m tmd_train.toy.tinybench --dataset DIR  # a toy-world dataset folder (its latents are clips)
    python -m tmd_train.toy.tinybench --sampler pkg.mod:fn --n 256   # fn(prompts, generator) -> clips [N,3,8,32,32]
    python -m tmd_train.toy.tinybench --sampler tmd_train.toy.tinybench:world_sampler --n 256   # real clips
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.format import DatasetFormatError, LatentDataset
from ..errors import ArgumentParser, DataError, MissingFileError, OutputError, UserError, run_main
from .clips import ATTRIBUTE_NAMES, WorldConfig, parse_prompt, render_prompts, sample_prompts
from .evaluator import ClipEvaluator, default_evaluator, load_evaluator

KAPPA_FD = 10.0
KAPPA_TEMPORAL = 10.0
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0
REF_SEED = 20260125
DEFAULT_N_REF = 512
CLIP_SHAPE = (3, 8, 32, 32)
_EPS = 1e-4


def _check_clips(clips: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    if not isinstance(clips, torch.Tensor) or clips.ndim != 5 or tuple(clips.shape[1:]) != CLIP_SHAPE:
        shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
        raise ValueError(f"tinybench: clips must be [N, {', '.join(map(str, CLIP_SHAPE))}], got {shape}")
    if not clips.is_floating_point():
        raise ValueError(f"tinybench: clips must be floating point, got {clips.dtype}")
    if isinstance(prompts, str) or len(prompts) != clips.shape[0]:
        raise ValueError(f"tinybench: need one prompt per clip ({clips.shape[0]}), got "
                         f"{'a str' if isinstance(prompts, str) else len(prompts)}")
    if clips.shape[0] < 2:
        raise ValueError("tinybench: need at least 2 clips (feature covariances)")
    clips = clips.detach().to("cpu", torch.float32)
    if not torch.isfinite(clips).all():
        raise ValueError("tinybench: clips contain non-finite values")
    return clips.clamp(-1.0, 1.0)


def temporal_stats(clips: torch.Tensor) -> torch.Tensor:
    """``[N, 2]``: log mean |first| and |second| temporal difference of clips ``[N, C, F, H, W]``."""
    d1 = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    d2 = (clips[:, :, 2:] - 2 * clips[:, :, 1:-1] + clips[:, :, :-2]).abs().mean(dim=(1, 2, 3, 4))
    return torch.stack([torch.log(d1 + _EPS), torch.log(d2 + _EPS)], dim=1).to(torch.float64)


def frechet_distance(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Fréchet distance ``‖μx-μy‖² + tr(Σx + Σy - 2(Σx^½ Σy Σx^½)^½)`` of Gaussians fitted to samples
    ``x [N, D]`` and ``y [M, D]`` (float64; optional per-dimension ``scale [D]`` divides both first)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    if scale is not None:
        x, y = x / scale, y / scale
    mx, my = x.mean(0), y.mean(0)
    cx, cy = torch.atleast_2d(torch.cov(x.T)), torch.atleast_2d(torch.cov(y.T))
    ex, vx = torch.linalg.eigh(cx)
    sx = (vx * ex.clamp_min(0).sqrt()) @ vx.T
    cross = torch.linalg.eigvalsh(sx @ cy @ sx).clamp_min(0).sqrt().sum()
    fd = (mx - my).square().sum() + cx.trace() + cy.trace() - 2 * cross
    return max(float(fd), 0.0)


_REF_CACHE: OrderedDict[tuple, tuple[ClipEvaluator, torch.Tensor, torch.Tensor]] = OrderedDict()
_REF_CACHE_SIZE = 4


def reference_stats(prompts: Sequence[str], n_ref: int = DEFAULT_N_REF, ref_seed: int = REF_SEED,
                    evaluator: ClipEvaluator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator features ``[n_ref, feature_dim]`` (float64) and temporal stats ``[n_ref, 2]`` of the real
    reference clips for ``prompts`` (cycled to ``n_ref``). The last few results are cached per
    (prompts, n_ref, seed, evaluator object); the evaluator is assumed frozen."""
    if n_ref < 2:
        raise ValueError(f"tinybench: n_ref must be >= 2, got {n_ref}")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("tinybench: reference_stats needs a non-empty sequence of prompts")
    evaluator = evaluator or default_evaluator()
    ref_prompts = tuple(prompts[i % len(prompts)] for i in range(n_ref))
    key = (ref_prompts, ref_seed, id(evaluator))
    hit = _REF_CACHE.get(key)
    if hit is not None and hit[0] is evaluator:
        _REF_CACHE.move_to_end(key)
        return hit[1], hit[2]
    clips = render_prompts(ref_prompts, ref_seed)
    _, feats = evaluator.predict(clips)
    result = (feats.to(torch.float64), temporal_stats(clips))
    _REF_CACHE[key] = (evaluator, *result)
    while len(_REF_CACHE) > _REF_CACHE_SIZE:
        _REF_CACHE.popitem(last=False)
    return result


def semantic_accuracy(predicted: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of evaluator predictions ``[N, 3]`` against the prompts' attributes
    (any object of a multi-object prompt counts) and their mean (``"mean"``)."""
    correct = torch.zeros(len(prompts), len(ATTRIBUTE_NAMES), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        allowed = [o.labels for o in parse_prompt(prompt)]
        for a in range(len(ATTRIBUTE_NAMES)):
            correct[i, a] = int(predicted[i, a]) in {lab[a] for lab in allowed}
    acc = {name: float(correct[:, a].float().mean()) for a, name in enumerate(ATTRIBUTE_NAMES)}
    acc["mean"] = float(correct.float().mean())
    return acc


@torch.no_grad()
def tinybench(clips: torch.Tensor, prompts: Sequence[str], *, n_ref: int = DEFAULT_N_REF,
              ref_seed: int = REF_SEED, evaluator: ClipEvaluator | None = None) -> dict[str, float]:
    """TinyBench scores of ``clips [N, 3, 8, 32, 32]`` (in [-1, 1]) generated for ``prompts`` (see the module doc).

    Returns a dict with ``n``, ``semantic``, ``semantic_accuracy``, ``shape_accuracy``, ``colour_accuracy``,
    ``direction_accuracy``, ``fd``, ``fd_score``, ``temporal_fd``, ``temporal_score``, ``quality``, ``total``.
    """
    clips = _check_clips(clips, prompts)
    prompts = list(prompts)
    evaluator = evaluator or default_evaluator()
    pred, feats = evaluator.predict(clips)
    acc = semantic_accuracy(pred, prompts)
    ref_feats, ref_temporal = reference_stats(prompts, n_ref, ref_seed, evaluator)
    fd = frechet_distance(feats, ref_feats, ref_feats.std(0) + 1e-6)
    tstats = temporal_stats(clips)
    temporal_fd = frechet_distance(tstats, ref_temporal, ref_temporal.std(0) + 1e-6)
    fd_score = 100.0 * math.exp(-fd / KAPPA_FD)
    temporal_score = 100.0 * math.exp(-temporal_fd / KAPPA_TEMPORAL)
    quality = (fd_score + temporal_score) / 2
    semantic = 100.0 * acc["mean"]
    total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    out = {"n": len(prompts), "semantic": semantic, "semantic_accuracy": acc["mean"]}
    out |= {f"{name}_accuracy": acc[name] for name in ATTRIBUTE_NAMES}
    out |= {"fd": fd, "fd_score": fd_score, "temporal_fd": temporal_fd, "temporal_score": temporal_score,
            "quality": quality, "total": total}
    return out


# ----------------------------------------------------------------- clip folders
def save_clips(folder: str | os.PathLike, clips: torch.Tensor, prompts: Sequence[str]) -> None:
    """Write ``folder/clips.safetensors`` (key ``clips`` [N, 3, F, H, W] float32) and ``folder/prompts.jsonl``."""
    if clips.ndim != 5 or clips.shape[0] != len(prompts):
        raise ValueError(f"save_clips: need clips [N, 3, F, H, W] and N prompts, got {tuple(clips.shape)} "
                         f"and {len(prompts)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"clips": clips.detach().to("cpu", torch.float32).contiguous()}, str(folder / "clips.safetensors"))
    with (folder / "prompts.jsonl").open("w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")


class ClipsFolderError(DataError):
    """A clips folder, dataset or sampler that cannot be scored; the message names the file (and line)."""


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a ``prompts.jsonl`` (one ``{"id": i, "prompt": "..."}`` per line, blank lines skipped),
    each a prompt of the toy world. Raises :class:`ClipsFolderError` naming the file and the line."""
    path = Path(path)
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ClipsFolderError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClipsFolderError(f"{where}: not JSON ({e.msg}); expected {{\"id\": i, \"prompt\": \"...\"}}") from e
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ClipsFolderError(f"{where}: expected an object with a string 'prompt', got {line.strip()[:80]}")
        try:
            parse_prompt(record["prompt"])
        except ValueError as e:
            raise ClipsFolderError(f"{where}: {record['prompt']!r} is not a prompt of the toy world "
                                   "('a <colour> <shape> moving <direction>' [' and ' ...])") from e
        prompts.append(record["prompt"])
    return prompts


def load_clips(folder: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """Read a folder written by :func:`save_clips`: ``(clips [N, 3, F, H, W], prompts)``.

    Raises:
        MissingFileError: a file is missing. ClipsFolderError: a file is unreadable, a line of prompts.jsonl is
            not a toy prompt record, or the counts differ; the message names the file (and line).
    """
    folder = Path(folder)
    for name in ("clips.safetensors", "prompts.jsonl"):
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder}: {name} is missing (expected clips.safetensors + prompts.jsonl)")
    try:
        tensors = load_file(str(folder / "clips.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ClipsFolderError(f"{folder / 'clips.safetensors'}: not a readable safetensors file ({e})") from e
    if "clips" not in tensors:
        raise ClipsFolderError(f"{folder / 'clips.safetensors'} has no 'clips' tensor (keys: {sorted(tensors)})")
    prompts = read_prompts(folder / "prompts.jsonl")
    clips = tensors["clips"]
    if clips.ndim < 1 or clips.shape[0] != len(prompts):
        raise ClipsFolderError(f"{folder}: clips.safetensors holds {tuple(clips.shape)} clips but prompts.jsonl "
                               f"{len(prompts)} prompts (one per clip)")
    return clips, prompts


def load_dataset_clips(folder: str | os.PathLike, n: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` (default all) samples of a toy-world dataset as ``(clips, prompts)``."""
    ds = LatentDataset(folder)
    if ds.kind != "latents" or ds.shapes["latents"] != CLIP_SHAPE:
        raise ClipsFolderError(f"{folder}: not a toy-world pixel dataset (kind {ds.kind!r}, shapes {ds.shapes})")
    count = len(ds) if n is None else min(n, len(ds))
    clips = torch.stack([ds[i]["latents"].to(torch.float32) for i in range(count)])
    return clips, ds.prompts[:count]


def world_sampler(prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """The world itself as a sampler (TinyBench's ceiling): real clips ``[N, 3, 8, 32, 32]`` for ``prompts``,
    nuisance factors from a seed drawn from ``generator``."""
    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    return render_prompts(prompts, seed)


def _load_sampler(spec: str) -> Callable[[list[str], torch.Generator], torch.Tensor]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--sampler must be 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--sampler {spec}: {e}") from e
    if not callable(fn):
        raise UserError(f"--sampler {spec}: {name} is not a function")
    return fn


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """CLI (see the module doc). Prints the scores as JSON and optionally writes them to ``--json``; returns them.
    User errors raise :class:`~tmd_train.errors.UserError` (``python -m`` prints them as one ``error:`` line)."""
    ap = ArgumentParser(prog="python -m tmd_train.toy.tinybench", description="TinyBench for the moving-shapes world")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--clips", help="folder with clips.safetensors (key 'clips') and prompts.jsonl")
    src.add_argument("--dataset", help="a toy-world dataset folder")
    src.add_argument("--sampler", help="'package.module:function' called as fn(prompts, generator) -> clips")
    ap.add_argument("--n", type=int, default=256, help="clips to sample (--sampler) or read (--dataset)")
    ap.add_argument("--seed", type=int, default=0, help="prompt/noise seed for --sampler")
    ap.add_argument("--p-two", type=float, default=0.0, help="two-object prompt probability (--sampler)")
    ap.add_argument("--n-ref", type=int, default=DEFAULT_N_REF)
    ap.add_argument("--ref-seed", type=int, default=REF_SEED)
    ap.add_argument("--evaluator", default=None, help="evaluator weights (default: the shipped ones)")
    ap.add_argument("--json", default=None, help="also write the scores here")
    args = ap.parse_args(argv)
    for name, value in (("--n", args.n), ("--n-ref", args.n_ref)):
        if value < 2:
            raise UserError(f"{name} must be >= 2, got {value}")
    if not 0.0 <= args.p_two <= 1.0:
        raise UserError(f"--p-two must be in [0, 1], got {args.p_two}")
    world = WorldConfig(p_two=args.p_two)
    if args.clips:
        source = f"--clips {args.clips}"
        clips, prompts = load_clips(args.clips)
    elif args.dataset:
        source = f"--dataset {args.dataset}"
        try:
            clips, prompts = load_dataset_clips(args.dataset, args.n)
        except (FileNotFoundError, DatasetFormatError) as e:
            raise ClipsFolderError(f"{source}: {e}") from e
    else:
        source = f"--sampler {args.sampler}"
        prompts = sample_prompts(args.n, args.seed, world)
        clips = _load_sampler(args.sampler)(prompts, torch.Generator().manual_seed(args.seed))
    try:
        _check_clips(clips, prompts)
    except ValueError as e:
        raise ClipsFolderError(f"{source}: {e}") from e
    try:
        evaluator = load_evaluator(args.evaluator) if args.evaluator else None
    except (OSError, ValueError) as e:
        raise UserError(f"--evaluator {args.evaluator}: {e}") from e
    scores = tinybench(clips, prompts, n_ref=args.n_ref, ref_seed=args.ref_seed, evaluator=evaluator)
    text = json.dumps(scores, indent=1)
    print(text)
    if args.json:
        try:
            Path(args.json).write_text(text + "\n")
        except OSError as e:
            raise OutputError(f"--json {args.json}: cannot write the scores ({e.strerror or e})") from e
    return scores


def _cli(argv: Sequence[str]) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(_cli))
