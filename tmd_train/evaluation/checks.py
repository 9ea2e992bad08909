"""Collapse checks: cheap per-video statistics that flag the failure modes of a collapsed few-step student
(docs/design.md §8.3) — near-solid-colour videos, static videos and the same video for every seed.

Per video, on frames scaled to [0, 1] and shrunk (area average) to at most :data:`ANALYSIS_SIZE` pixels a side:

* ``spatial_std``: the standard deviation over the pixels of a frame (per channel), averaged over frames and
  channels — ≈ 0 for a solid colour;
* ``temporal_std``: the standard deviation over time of each pixel, averaged over pixels and channels;
* ``frame_change``: the mean absolute difference between consecutive frames — ≈ 0 for a frozen video.

Across the videos of one prompt (VBench's ``{prompt}-{index}.mp4`` naming groups them): ``duplicate_of``, the
other videos whose mean absolute difference from this one (on ``DUPLICATE_SIZE``-pixel thumbnails of
``DUPLICATE_FRAMES`` frames) is below the threshold — different seeds should give different videos.

Flags: ``constant`` (spatial_std < ``spatial_std``), ``static`` (frame_change < ``frame_change`` or
temporal_std < ``temporal_std``), ``duplicate``. The thresholds sit an order of magnitude below what real
footage (and the toy world's clips, tested) shows and far above H.264's coding noise on a still image.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ANALYSIS_SIZE = 128
DUPLICATE_SIZE = 32
DUPLICATE_FRAMES = 16
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
_INDEXED = re.compile(r"^(?P<prompt>.*)-(?P<index>\d+)$")


@dataclass(frozen=True)
class Thresholds:
    """Flag thresholds, in units of [0, 1] pixel values."""

    spatial_std: float = 0.01
    temporal_std: float = 0.002
    frame_change: float = 0.001
    duplicate: float = 0.01


@dataclass
class VideoStats:
    """Statistics of one video (see the module docs); ``thumb`` is the duplicate check's thumbnail."""

    name: str
    frames: int
    spatial_std: float
    temporal_std: float
    frame_change: float
    thumb: torch.Tensor


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """``[F, H, W, 3]`` uint8 (0..255) or float in [0, 1] -> ``[F, 3, H, W]`` float32 in [0, 1]."""
    if frames.dim() != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must be [F, H, W, C], got {tuple(frames.shape)}")
    x = frames[..., :3].float()
    if frames.dtype == torch.uint8:
        x = x / 255.0
    return x.permute(0, 3, 1, 2).contiguous()


def _shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale >= 1:
        return x
    return F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")


def video_stats(name: str, frames: torch.Tensor) -> VideoStats:
    """:class:`VideoStats` of ``frames`` (``[F, H, W, 3]`` uint8, or float in [0, 1])."""
    x = _shrink(to_unit(frames), ANALYSIS_SIZE).double()
    n = x.shape[0]
    spatial = x.flatten(2).std(dim=2, unbiased=False).mean().item()
    temporal = x.std(dim=0, unbiased=False).mean().item() if n > 1 else 0.0
    change = (x[1:] - x[:-1]).abs().mean().item() if n > 1 else 0.0
    idx = torch.linspace(0, n - 1, min(n, DUPLICATE_FRAMES)).round().long()
    thumb = F.interpolate(x[idx].float(), size=(DUPLICATE_SIZE, DUPLICATE_SIZE), mode="area")
    return VideoStats(name, n, spatial, temporal, change, thumb)


def prompt_of(name: str) -> str:
    """The prompt of a video named ``{prompt}-{index}.mp4`` (VBench's naming), else the name's stem."""
    stem = Path(name).stem
    m = _INDEXED.match(stem)
    return m.group("prompt") if m else stem


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:  # different frame counts: compare the common number of evenly spaced frames
        n = min(a.shape[0], b.shape[0])
        a = a[torch.linspace(0, a.shape[0] - 1, n).round().long()]
        b = b[torch.linspace(0, b.shape[0] - 1, n).round().long()]
    return (a - b).abs().mean().item()


def check_stats(stats: Sequence[VideoStats], thresholds: Thresholds = Thresholds(),
                groups: Mapping[str, str] | None = None) -> dict:
    """The report of :func:`check_videos` from precomputed statistics; ``groups`` maps a video's name to its
    prompt (default: :func:`prompt_of`)."""
    th = thresholds
    by_prompt: dict[str, list[VideoStats]] = {}
    for s in stats:
        by_prompt.setdefault(groups[s.name] if groups is not None else prompt_of(s.name), []).append(s)
    duplicates: dict[str, list[str]] = {s.name: [] for s in stats}
    pairs = []
    for members in by_prompt.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                d = _distance(a.thumb, b.thumb)
                if d < th.duplicate:
                    duplicates[a.name].append(b.name)
                    duplicates[b.name].append(a.name)
                    pairs.append({"a": a.name, "b": b.name, "distance": d})
    videos = []
    for s in stats:
        flags = []
        if s.spatial_std < th.spatial_std:
            flags.append("constant")
        if s.frames > 1 and (s.frame_change < th.frame_change or s.temporal_std < th.temporal_std):
            flags.append("static")
        if duplicates[s.name]:
            flags.append("duplicate")
        videos.append({"name": s.name, "frames": s.frames, "spatial_std": s.spatial_std,
                       "temporal_std": s.temporal_std, "frame_change": s.frame_change,
                       "duplicate_of": sorted(duplicates[s.name]), "flags": flags})
    counts = {f: sum(f in v["flags"] for v in videos) for f in ("constant", "static", "duplicate")}
    return {"num_videos": len(videos), "num_flagged": sum(bool(v["flags"]) for v in videos), "counts": counts,
            "thresholds": asdict(th), "duplicate_pairs": pairs, "videos": videos}


def check_videos(videos: Mapping[str, torch.Tensor], thresholds: Thresholds = Thresholds(),
                 groups: Mapping[str, str] | None = None) -> dict:
    """Collapse checks of in-memory videos ``{name: [F, H, W, 3] frames}`` (uint8, or float in [0, 1]).

    Returns a JSON-ready report: ``videos`` (per video: the statistics, ``duplicate_of`` and ``flags``),
    ``counts`` per flag, ``num_flagged``, ``duplicate_pairs`` and the ``thresholds``."""
    return check_stats([video_stats(n, v) for n, v in videos.items()], thresholds, groups)


def check_clips(clips: torch.Tensor, prompts: Sequence[str] | None = None,
                thresholds: Thresholds = Thresholds()) -> dict:
    """Collapse checks of a batch of clips ``[B, 3, F, H, W]`` in [-1, 1] (e.g. a training run's sample
    grid); clips of equal ``prompts`` are checked for duplicates (none without prompts)."""
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be [B, 3, F, H, W], got {tuple(clips.shape)}")
    frames = ((clips.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
    names = [f"clip-{i}" for i in range(clips.shape[0])]
    groups = {n: (prompts[i] if prompts is not None else n) for i, n in enumerate(names)}
    return check_videos(dict(zip(names, frames, strict=True)), thresholds, groups)


def read_video(path: str | Path) -> torch.Tensor:
    """``[F, H, W, 3]`` uint8 frames of a video file (PyAV; imageio-ffmpeg without it)."""
    import numpy as np

    try:
        import av
    except ImportError:
        import imageio

        with imageio.get_reader(str(path)) as reader:
            return torch.from_numpy(np.stack(list(reader.iter_data()))[..., :3])

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot read the video ({e})") from None
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return torch.from_numpy(np.stack(frames))


def write_video(path: str | Path, frames: torch.Tensor, fps: int, crf: int = 18) -> None:
    """``[F, H, W, 3]`` uint8 frames -> an H.264 mp4 (PyAV, in process; ``yuv420p`` as players expect, or
    ``yuv444p`` for odd sizes; ``crf`` 18: visually lossless); imageio-ffmpeg without PyAV."""
    try:
        import av
    except ImportError:
        import imageio

        with imageio.get_writer(str(path), format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1) as w:
            for frame in frames.numpy():
                w.append_data(frame)
        return

    f, h, w, _ = frames.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        stream.options = {"crf": str(crf)}
        for frame in frames.contiguous().numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def video_files(folder: str | Path) -> list[Path]:
    """The video files directly inside ``folder``, sorted by name (hidden and temporary files skipped)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))


def check_folder(folder: str | Path, thresholds: Thresholds = Thresholds(), progress: bool = False) -> dict:
    """Collapse checks of every video file in ``folder`` (see :func:`check_videos`)."""
    from tqdm import tqdm

    files = video_files(folder)
    stats = [video_stats(p.name, read_video(p)) for p in tqdm(files, desc="checks", unit="video",
                                                               disable=not progress)]
    return check_stats(stats, thresholds)


def summary(report: dict) -> str:
    """One line per flag kind with the first flagged videos, or that none was flagged."""
    n = report["num_videos"]
    if not report["num_flagged"]:
        return f"collapse checks: {n} videos, none flagged (constant, static, duplicate)"
    lines = [f"collapse checks: {report['num_flagged']} of {n} videos flagged"]
    for flag, count in report["counts"].items():
        if count:
            names = [v["name"] for v in report["videos"] if flag in v["flags"]]
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            lines.append(f"  {flag}: {count} — {', '.join(names[:3])}{more}")
    return "\n".join(lines)
