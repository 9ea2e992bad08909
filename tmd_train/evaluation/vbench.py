"""VBench generation and scoring (docs/design.md §8.2): the prompt suite, the file naming VBench reads, the
per-video seeds, the sharding over ``torchrun`` ranks, ``settings.json`` and the aggregate scores.

* Prompts: VBench's standard suite (``VBench_full_info.json`` of the ``vbench`` package: 946 entries, 944
  distinct prompts, each with the dimensions it serves), or a user file (one prompt per line, or a JSON list
  of ``{"prompt_en": ..., "dimension": [...]}`` like VBench's).
* Naming: video ``k`` of a prompt is ``{prompt}-{k}.mp4`` (VBench's ``vbench_standard`` mode looks up exactly
  these names, ``k = 0..4``), written with seed ``seeds[k]``; a ``/`` in a user prompt becomes ``_``.
* Sharding: job ``j`` (prompt-major, then ``k``) goes to rank ``j mod world_size``; existing videos are kept,
  so a rerun completes an interrupted generation; files are written to a hidden temporary name and renamed.
* Scores: VBench's per-dimension results aggregated as the VBench leaderboard does (its
  ``scripts/constant.py`` and ``cal_final_score.py``): each dimension min-max normalised and weighted
  (dynamic degree 0.5), quality = weighted mean of the 7 quality dimensions, semantic = of the 9 semantic ones,
  total = (4·quality + semantic)/5.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SETTINGS_FILE = "settings.json"
CHECKS_FILE = "checks.json"
SCORES_FILE = "scores.json"
SCORES_TABLE = "scores.md"
NUM_SEEDS = 5
FULL_INFO = "VBench_full_info.json"
INSTALL = "pip install '.[eval]'"

QUALITY_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                      "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC_DIMENSIONS = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
                       "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
#: (min, max) of each dimension's normalisation and its weight (VBench's scripts/constant.py).
NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in DIMENSIONS}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


@dataclass(frozen=True)
class PromptSet:
    """The prompts to generate, where they came from, and the dimensions each serves (None: unknown)."""

    prompts: tuple[str, ...]
    source: str  #: "vbench_standard" or the file's path
    sha256: str  #: of the file the prompts were read from
    dimensions: tuple[tuple[str, ...] | None, ...]


@dataclass(frozen=True)
class Job:
    """One video: prompt ``prompt_index`` (``prompt``), its ``index``-th video, drawn with ``seed``."""

    prompt_index: int
    prompt: str
    index: int
    seed: int
    name: str


def vbench_available() -> bool:
    """Whether the ``vbench`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("vbench") is not None


def full_info_path() -> Path:
    """``VBench_full_info.json`` of the installed ``vbench`` package (the standard prompt suite)."""
    import importlib.util

    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the VBench prompt suite comes with the vbench package ({INSTALL}); without it "
                                "pass --prompts FILE")
    path = Path(next(iter(spec.submodule_search_locations))) / FULL_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed vbench package lacks its prompt suite")
    return path


def _from_full_info(entries: object, source: str) -> tuple[list[str], list[tuple[str, ...] | None]]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("prompt_en"), str)
                                                for e in entries):
        raise ValueError(f"{source}: expected a JSON list of objects with a string 'prompt_en' (VBench's format)")
    prompts: list[str] = []
    dims: dict[str, set[str]] = {}
    for e in entries:
        p = e["prompt_en"]
        if p not in dims:
            prompts.append(p)
            dims[p] = set()
        dims[p].update(e.get("dimension") or [])
    return prompts, [tuple(sorted(dims[p])) or None for p in prompts]


def load_prompts(path: str | os.PathLike | None = None) -> PromptSet:
    """The standard suite (``path`` None; needs ``vbench``) or a user file: ``.json`` in VBench's full-info
    format, else text with one prompt per line (blank lines skipped). Duplicate prompts are generated once."""
    file = full_info_path() if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such prompt file")
    data = file.read_bytes()
    source = "vbench_standard" if path is None else str(file)
    if file.suffix == ".json":
        try:
            prompts, dims = _from_full_info(json.loads(data), str(file))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
    else:
        try:
            lines = [line.strip() for line in data.decode("utf-8").splitlines()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e})") from None
        prompts = list(dict.fromkeys(line for line in lines if line))
        dims = [None] * len(prompts)
    if not prompts:
        raise ValueError(f"{file}: no prompts")
    for i, p in enumerate(prompts):
        video_name(p, 0, where=f"{file} prompt {i + 1}")
    return PromptSet(tuple(prompts), source, hashlib.sha256(data).hexdigest(), tuple(dims))


def video_name(prompt: str, index: int, *, where: str = "prompt") -> str:
    """``{prompt}-{index}.mp4`` (VBench's naming); ``/`` and NUL become ``_``. A ValueError if the name is
    longer than a file name may be (255 bytes) or the prompt is empty."""
    if not prompt.strip():
        raise ValueError(f"{where}: empty prompt")
    name = f"{prompt.replace('/', '_').replace(chr(0), '_')}-{index}.mp4"
    if len(name.encode()) > 255:
        raise ValueError(f"{where}: {prompt[:60]!r}… is too long for a file name ({len(name.encode())} bytes > 255)")
    return name


def plan(prompts: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Every video: prompt-major, ``len(seeds)`` per prompt, video ``k`` with ``seeds[k]``."""
    return [Job(i, p, k, s, video_name(p, k)) for i, p in enumerate(prompts) for k, s in enumerate(seeds)]


def shard(jobs: Sequence[Job], rank: int, world_size: int) -> list[Job]:
    """The jobs of ``rank``: every ``world_size``-th, from ``rank`` on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(jobs[rank::world_size])


def pending(jobs: Sequence[Job], folder: Path) -> list[Job]:
    """The jobs whose video is not in ``folder`` yet (a non-empty file of its name)."""
    return [j for j in jobs if not ((folder / j.name).is_file() and (folder / j.name).stat().st_size > 0)]


def settings_conflicts(old: Mapping, new: Mapping, ignore: Sequence[str] = ()) -> list[str]:
    """``key: old -> new`` for every recorded setting that differs (keys in ``ignore`` left out)."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------ scores
def aggregate(results: Mapping[str, float]) -> dict:
    """Normalised per-dimension scores and the quality, semantic and total scores of raw VBench results
    ``{dimension: score}`` (VBench's leaderboard formula; a group's score needs all its dimensions, else None)."""
    unknown = sorted(set(results) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown VBench dimensions {unknown}; known: {', '.join(DIMENSIONS)}")
    norm = {d: (float(v) - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) for d, v in results.items()}

    def group(dims: Sequence[str]) -> float | None:
        if not all(d in norm for d in dims):
            return None
        return sum(norm[d] * WEIGHT[d] for d in dims) / sum(WEIGHT[d] for d in dims)

    quality, semantic = group(QUALITY_DIMENSIONS), group(SEMANTIC_DIMENSIONS)
    total = None if quality is None or semantic is None else \
        (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"dimensions": {d: float(results[d]) for d in DIMENSIONS if d in results},
            "normalized": {d: norm[d] for d in DIMENSIONS if d in norm},
            "quality": quality, "semantic": semantic, "total": total}


def read_results(path: str | os.PathLike) -> dict[str, float]:
    """``{dimension: score}`` of a VBench ``*_eval_results.json`` (``{dimension: [score, per-video list]}``)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected VBench's {{dimension: [score, per-video results]}}")
    return {d: float(v[0] if isinstance(v, list) else v) for d, v in raw.items()}


def markdown_table(scores: Mapping, name: str) -> str:
    """One markdown row (``name``, total, quality, semantic, then every dimension as %) with its header."""
    cols = ["total", "quality", "semantic", *scores["dimensions"]]

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    values = [scores["total"], scores["quality"], scores["semantic"], *scores["dimensions"].values()]
    head = "| model | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    row = f"| {name} | " + " | ".join(pct(v) for v in values) + " |"
    return "\n".join([head, rule, row]) + "\n"


def weights_cache() -> Path:
    """Where VBench keeps its evaluator weights (``VBENCH_CACHE_DIR``, default ``~/.cache/vbench``)."""
    return Path(os.environ.get("VBENCH_CACHE_DIR", Path.home() / ".cache" / "vbench"))


def vbench_command(videos: Path, out: Path, dimensions: Sequence[str]) -> str:
    """VBench's own command line that scores ``videos`` on ``dimensions`` into ``out``."""
    return (f"vbench evaluate --videos_path '{videos}' --output_path '{out}' --mode vbench_standard "
            f"--dimension {' '.join(dimensions)}")


def run_vbench(videos: Path, out: Path, dimensions: Sequence[str], name: str, device: str) -> dict[str, float]:
    """Score ``videos`` with VBench (its evaluator weights from :func:`weights_cache`, no download) and return
    ``{dimension: score}``; VBench writes its own files into ``out``."""
    from vbench import VBench

    out.mkdir(parents=True, exist_ok=True)
    bench = VBench(device, str(full_info_path()), str(out))
    bench.evaluate(videos_path=str(videos), name=name, dimension_list=list(dimensions), local=True,
                   mode="vbench_standard")
    return read_results(out / f"{name}_eval_results.json")
