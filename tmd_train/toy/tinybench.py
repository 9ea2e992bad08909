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
  units of the real spread); ``fd_score = log_score(FD, FD_ANCHORS)``.
* **temporal_score** — per clip, ``[log mean|x_{f+1} - x_f|, log mean|x_{f+1} - 2x_f + x_{f-1}|]``
  (frame change and its change: motion amount and flicker/jerkiness); the Fréchet distance of these
  2-D statistics between generated and reference clips, normalised the same way;
  ``temporal_score = log_score(FD_t, TEMPORAL_ANCHORS)``.
* **quality** = ``(fd_score + temporal_score) / 2``;
  **total** = ``(4·quality + 1·semantic) / 5`` — VBench's 4:1 weighting of quality and semantic.

``log_score(d, (best, worst)) = 100·clamp(log(worst/d) / log(worst/best), 0, 1)``: linear in log distance
between two anchors measured with the shipped evaluator at the defaults (n = 256, n_ref = 512; see
``tmd_train/toy/assets/README.md``), so real clips score 100, pure noise ~0, and every halving of the
distance in between gains the same number of points (an exponential scale floors every weak generator).

**Teacher fidelity** (``teacher_clips=``, a distillation is judged against what its teacher produces): the
teacher's clips for the same prompts from independent noise (:func:`teacher_reference`: 50 steps × CFG,
cached on disk per teacher weights, prompts and settings) give

* ``teacher_fd`` — the Fréchet distance of evaluator features between the clips and the teacher's (same
  units as ``fd``), ``teacher_fd_score = log_score(teacher_fd, FD_ANCHORS)``;
* ``teacher_agreement`` — the fraction of (clip, attribute) pairs on which the evaluator reads the same
  value in the clip and in the teacher's clip of the same prompt (per attribute: ``<attribute>_agreement``).
  Two independent samples of a teacher agree only as often as the teacher is consistent, so the teacher
  against itself is the ceiling, not 1;
* ``fidelity = (teacher_fd_score + 100·teacher_agreement) / 2``.

Results of many runs (seeds × methods) aggregate with :func:`aggregate` (``--aggregate ROOT``): every
``ROOT/<cell>/<run>/tinybench.json`` that exists and parses is one sample of ``<cell>``; missing or partial
runs are skipped and listed, so a table can be regenerated from whatever has finished.

CLI::

    python -m tmd_train.toy.tinybench --clips DIR    # DIR/clips.safetensors (key "clips") + DIR/prompts.jsonl
    python -m tmd_train.toy.tinybench --dataset DIR  # a toy-world dataset folder (its latents are clips)
    python -m tmd_train.toy.tinybench --sampler pkg.mod:fn --n 256   # fn(prompts, generator) -> clips [N,3,8,32,32]
    python -m tmd_train.toy.tinybench --sampler tmd_train.toy.tinybench:world_sampler --n 256   # real clips
    python -m tmd_train.toy.tinybench --clips DIR --teacher shipped   # + teacher fidelity (reference cached)
    python -m tmd_train.toy.tinybench --aggregate ROOT   # mean ± std per ROOT/<cell>/ over its runs
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import statistics
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.format import DatasetFormatError, LatentDataset
from ..errors import ArgumentParser, DataError, MissingFileError, OutputError, UserError, run_main
from ..models.teacher import load_teacher
from ..sampling import sample_teacher
from . import TOY_TEACHER_DIR, text_encoder
from .clips import ATTRIBUTE_NAMES, WorldConfig, parse_prompt, render_prompts, sample_prompts
from .evaluator import ClipEvaluator, default_evaluator, load_evaluator

#: Log-scale anchors ``(best, worst)`` of the Fréchet distances (see :func:`log_score`), measured once at the
#: defaults (n = 256, n_ref = 512) with the shipped evaluator: real clips give FD ≈ 0.3 and temporal FD ≈ 0.001,
#: pure noise FD ≈ 110 and temporal FD ≈ 90. Between the anchors the score is linear in log FD, so a halved
#: distance always gains the same number of points and a weak generator is not floored at 0.
FD_ANCHORS = (1.5, 80.0)
TEMPORAL_ANCHORS = (0.1, 80.0)
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0
REF_SEED = 20260125
#: The teacher's reference clips for teacher fidelity: its 50 Euler steps × CFG 3 (100 NFE, shift 5), from
#: noise of this seed — independent of the noise of the generator under test. CFG 3 is the toy teacher's
#: scale throughout the toy world (demo, ``make reproduce``): its FD against real clips is 2.7 there and 6.6
#: at CFG 5 (n = 256; tmd_train/toy/assets/README.md). Wan keeps CFG 5.
TEACHER_REF_SEED = 20260301
TEACHER_REF_STEPS = 50
TEACHER_REF_CFG = 3.0
TEACHER_REF_SHIFT = 5.0
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


def log_score(distance: float, anchors: tuple[float, float]) -> float:
    """``100·clamp(log(worst/d) / log(worst/best), 0, 1)`` for ``anchors = (best, worst)``: 100 at or below
    ``best``, 0 at or beyond ``worst``, linear in ``log d`` in between."""
    best, worst = anchors
    if distance <= best:
        return 100.0
    if distance >= worst:
        return 0.0
    return 100.0 * math.log(worst / distance) / math.log(worst / best)


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


def attribute_agreement(predicted: torch.Tensor, teacher_predicted: torch.Tensor) -> dict[str, float]:
    """Per-attribute fraction of clips whose evaluator predictions ``[N, 3]`` equal the teacher clips'
    ``[N, 3]`` (row ``i`` of both: the same prompt), and their mean (``"mean"``)."""
    same = predicted == teacher_predicted
    out = {name: float(same[:, a].float().mean()) for a, name in enumerate(ATTRIBUTE_NAMES)}
    out["mean"] = float(same.float().mean())
    return out


@torch.no_grad()
def tinybench(clips: torch.Tensor, prompts: Sequence[str], *, n_ref: int = DEFAULT_N_REF,
              ref_seed: int = REF_SEED, evaluator: ClipEvaluator | None = None,
              teacher_clips: torch.Tensor | None = None) -> dict[str, float]:
    """TinyBench scores of ``clips [N, 3, 8, 32, 32]`` (in [-1, 1]) generated for ``prompts`` (see the module doc).

    Returns a dict with ``n``, ``semantic``, ``semantic_accuracy``, ``shape_accuracy``, ``colour_accuracy``,
    ``direction_accuracy``, ``fd``, ``fd_score``, ``temporal_fd``, ``temporal_score``, ``quality``, ``total``;
    with ``teacher_clips`` (``[N, 3, 8, 32, 32]``, the teacher's clips for the same prompts, e.g. from
    :func:`teacher_reference`) also ``teacher_fd``, ``teacher_fd_score``, ``teacher_agreement``,
    ``<attribute>_agreement`` and ``fidelity``.
    """
    clips = _check_clips(clips, prompts)
    prompts = list(prompts)
    if teacher_clips is not None:
        try:
            teacher_clips = _check_clips(teacher_clips, prompts)
        except ValueError as e:
            raise ValueError(f"tinybench: teacher_clips: {e}") from e
    evaluator = evaluator or default_evaluator()
    pred, feats = evaluator.predict(clips)
    acc = semantic_accuracy(pred, prompts)
    ref_feats, ref_temporal = reference_stats(prompts, n_ref, ref_seed, evaluator)
    scale = ref_feats.std(0) + 1e-6
    fd = frechet_distance(feats, ref_feats, scale)
    tstats = temporal_stats(clips)
    temporal_fd = frechet_distance(tstats, ref_temporal, ref_temporal.std(0) + 1e-6)
    fd_score = log_score(fd, FD_ANCHORS)
    temporal_score = log_score(temporal_fd, TEMPORAL_ANCHORS)
    quality = (fd_score + temporal_score) / 2
    semantic = 100.0 * acc["mean"]
    total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    out = {"n": len(prompts), "semantic": semantic, "semantic_accuracy": acc["mean"]}
    out |= {f"{name}_accuracy": acc[name] for name in ATTRIBUTE_NAMES}
    out |= {"fd": fd, "fd_score": fd_score, "temporal_fd": temporal_fd, "temporal_score": temporal_score,
            "quality": quality, "total": total}
    if teacher_clips is not None:
        teacher_pred, teacher_feats = evaluator.predict(teacher_clips)
        teacher_fd = frechet_distance(feats, teacher_feats, scale)
        agree = attribute_agreement(pred, teacher_pred)
        teacher_fd_score = log_score(teacher_fd, FD_ANCHORS)
        out |= {"teacher_fd": teacher_fd, "teacher_fd_score": teacher_fd_score, "teacher_agreement": agree["mean"]}
        out |= {f"{name}_agreement": agree[name] for name in ATTRIBUTE_NAMES}
        out["fidelity"] = (teacher_fd_score + 100.0 * agree["mean"]) / 2
    return out


# ----------------------------------------------------------------- teacher reference clips
def default_cache_dir() -> Path:
    """Where :func:`teacher_reference` keeps its clips: ``$TMD_TINYBENCH_CACHE`` or ``~/.cache/tmd_train/tinybench``."""
    env = os.environ.get("TMD_TINYBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tmd_train" / "tinybench"


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def teacher_reference(teacher: str | os.PathLike | torch.nn.Module, prompts: Sequence[str], *,
                      steps: int = TEACHER_REF_STEPS, cfg: float = TEACHER_REF_CFG, shift: float = TEACHER_REF_SHIFT,
                      seed: int = TEACHER_REF_SEED, batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                      cache: bool = True) -> torch.Tensor:
    """The teacher's clips ``[N, 3, 8, 32, 32]`` (clamped to [-1, 1], float32, CPU) for ``prompts``: Euler
    ``steps`` × CFG ``cfg`` from noise ``randn([N, 3, 8, 32, 32])`` of a generator seeded with ``seed``.

    ``teacher``: a toy-teacher folder or a loaded ``WanTransformer3DModel``. With ``cache`` the clips are
    kept in ``cache_dir`` (default :func:`default_cache_dir`) under a key of (weights hash, prompts,
    settings) and read back instead of sampled again; a cached file whose recorded key differs is resampled.
    """
    prompts = list(prompts)
    if isinstance(prompts, str) or len(prompts) < 1:
        raise ValueError("teacher_reference: need a non-empty sequence of prompts")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"teacher_reference: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    for p in prompts:
        parse_prompt(p)
    model = load_teacher(teacher).eval() if isinstance(teacher, (str, os.PathLike)) else teacher
    key = json.dumps({"teacher": model_hash(model), "n": len(prompts),
                      "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "steps": steps,
                      "cfg": float(cfg), "shift": float(shift), "seed": seed, "shape": list(CLIP_SHAPE)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = Path(cache_dir or default_cache_dir()) / f"teacher_ref_{digest}.safetensors"
    if cache and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("clips")
        except (SafetensorError, OSError):
            pass  # unreadable: resample and rewrite
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    noise = torch.randn((len(prompts), *CLIP_SHAPE), generator=torch.Generator().manual_seed(seed))
    text, _ = text_encoder.encode(prompts)
    negative = text_encoder.encode_negative()[0].unsqueeze(0).to(device, dtype)
    chunks = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="teacher reference", leave=False,
                  disable=len(prompts) <= batch_size):
        out = sample_teacher(model, text[s:s + batch_size].to(device, dtype), negative_text=negative,
                             noise=noise[s:s + batch_size].to(device, dtype), steps=steps, cfg=cfg, shift=shift)
        chunks.append(out.x0.to("cpu", torch.float32).clamp(-1.0, 1.0))
    clips = torch.cat(chunks)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"clips": clips.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    return clips


# ----------------------------------------------------------------- aggregation of runs
def collect(root: str | os.PathLike, filename: str = "tinybench.json") -> tuple[dict[str, list[dict]], list[str]]:
    """The scores under ``root``: ``({cell: [scores of each finished run]}, [skipped files])`` for every
    ``root/<cell>/<run>/<filename>`` (cells and runs in name order); a file that does not parse as a JSON
    object of scores is skipped and listed, a run without the file is simply not there yet."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"--aggregate {root}: not a folder")
    cells: dict[str, list[dict]] = {}
    skipped = []
    for path in sorted(root.glob(f"*/*/{filename}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            skipped.append(str(path))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("total"), (int, float)):
            skipped.append(str(path))
            continue
        cells.setdefault(path.parent.parent.name, []).append(record)
    return cells, skipped


def aggregate(cells: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{cell: {metric: (mean, sample standard deviation (0 for one run), runs)}}`` of every numeric metric
    that all runs of the cell report."""
    out = {}
    for cell, runs in cells.items():
        if not runs:
            continue
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and all(isinstance(r.get(k), (int, float)) for r in runs)]
        out[cell] = {k: (statistics.fmean(float(r[k]) for r in runs),
                         statistics.stdev(float(r[k]) for r in runs) if len(runs) > 1 else 0.0, len(runs))
                     for k in keys}
    return out


AGGREGATE_COLUMNS = ("semantic", "fd", "temporal_fd", "quality", "total", "teacher_fd", "teacher_agreement",
                     "fidelity")


def aggregate_table(stats: Mapping[str, Mapping[str, tuple[float, float, int]]],
                    columns: Sequence[str] = AGGREGATE_COLUMNS) -> str:
    """A markdown table ``cell | runs | metric mean ± std …`` (a metric a cell lacks shows as –)."""
    lines = ["| cell | runs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for cell, metrics in stats.items():
        runs = max(v[2] for v in metrics.values()) if metrics else 0
        cols = [f"{metrics[c][0]:.3g} ± {metrics[c][1]:.2g}" if c in metrics else "–" for c in columns]
        lines.append(f"| {cell} | {runs} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


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


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI (see the module doc). Prints the scores as JSON and optionally writes them to ``--json``; returns them.
    User errors raise :class:`~tmd_train.errors.UserError` (``python -m`` prints them as one ``error:`` line)."""
    ap = ArgumentParser(prog="python -m tmd_train.toy.tinybench", description="TinyBench for the moving-shapes world")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--clips", help="folder with clips.safetensors (key 'clips') and prompts.jsonl")
    src.add_argument("--dataset", help="a toy-world dataset folder")
    src.add_argument("--sampler", help="'package.module:function' called as fn(prompts, generator) -> clips")
    src.add_argument("--aggregate", metavar="ROOT", help="print mean ± std of ROOT/<cell>/<run>/tinybench.json")
    ap.add_argument("--n", type=int, default=256, help="clips to sample (--sampler) or read (--dataset)")
    ap.add_argument("--seed", type=int, default=0, help="prompt/noise seed for --sampler")
    ap.add_argument("--p-two", type=float, default=0.0, help="two-object prompt probability (--sampler)")
    ap.add_argument("--n-ref", type=int, default=DEFAULT_N_REF)
    ap.add_argument("--ref-seed", type=int, default=REF_SEED)
    ap.add_argument("--evaluator", default=None, help="evaluator weights (default: the shipped ones)")
    ap.add_argument("--json", default=None, help="also write the scores here")
    ap.add_argument("--teacher", default=None,
                    help="also score fidelity to this toy-teacher folder ('shipped': the shipped toy teacher)")
    ap.add_argument("--teacher-steps", type=int, default=TEACHER_REF_STEPS, help="Euler steps of the teacher reference")
    ap.add_argument("--teacher-cfg", type=float, default=TEACHER_REF_CFG, help="CFG scale of the teacher reference")
    ap.add_argument("--cache-dir", default=None, help="teacher reference cache (default $TMD_TINYBENCH_CACHE or "
                                                      "~/.cache/tmd_train/tinybench)")
    args = ap.parse_args(argv)
    if args.aggregate:
        cells, skipped = collect(args.aggregate)
        stats = aggregate(cells)
        print(aggregate_table(stats))
        for path in skipped:
            print(f"skipped (unreadable or partial): {path}", file=sys.stderr)
        return {cell: {k: list(v) for k, v in metrics.items()} for cell, metrics in stats.items()}
    if args.teacher_steps < 1:
        raise UserError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
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
    teacher_clips = None
    if args.teacher:
        teacher = TOY_TEACHER_DIR if args.teacher == "shipped" else Path(args.teacher)
        if not (teacher / "config.json").is_file():
            raise MissingFileError(f"--teacher {args.teacher}: no config.json in {teacher} (a toy-teacher folder)")
        teacher_clips = teacher_reference(teacher, prompts, steps=args.teacher_steps, cfg=args.teacher_cfg,
                                          cache_dir=args.cache_dir)
    scores = tinybench(clips, prompts, n_ref=args.n_ref, ref_seed=args.ref_seed, evaluator=evaluator,
                       teacher_clips=teacher_clips)
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
