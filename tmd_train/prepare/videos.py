"""``prepare videos``: real videos with captions -> Wan VAE latents (see :mod:`tmd_train.prepare`)."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.video import ClipError, read_clip
from ..errors import DataError, MissingFileError, UserError
from .runner import Item, Skip

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".gif")
VIDEO_KEYS = ("video", "path", "file", "filename", "video_path")
CAPTION_KEYS = ("caption", "prompt", "text")


@dataclass(frozen=True)
class Entry:
    """One video of the list: its path (None: the row names none) and caption (None: missing/empty)."""

    video: str | None
    caption: str | None
    where: str  #: the row / file it came from, for skipped.jsonl


def _pick(row: dict, keys: Sequence[str], chosen: str | None) -> str | None:
    for k in ([chosen] if chosen else keys):
        v = row.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def read_video_list(path: str | Path, video_key: str | None = None, caption_key: str | None = None) -> list[Entry]:
    """The videos and captions of a CSV (header row), a JSONL file or a folder of videos with ``.txt``
    captions of the same name beside them (sorted by path). Relative video paths are relative to the list's
    folder. Rows are kept in order (bad ones are skipped later, with the reason)."""
    p = Path(path)
    if p.is_dir():
        videos = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise DataError(f"--videos {p}: no video files ({', '.join(VIDEO_SUFFIXES)}) in the folder")
        out = []
        for v in videos:
            txt = v.with_suffix(".txt")
            cap = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            out.append(Entry(str(v), cap or None, str(v.relative_to(p))))
        return out
    if not p.is_file():
        raise MissingFileError(f"--videos {p}: no such file or folder")
    base = p.parent
    rows: list[tuple[dict, str]] = []
    if p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            _check_columns(p, fields, video_key, caption_key)
            rows = [(r, f"row {n + 2}") for n, r in enumerate(reader)]
    elif p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = {}
            rows.append((row if isinstance(row, dict) else {}, f"line {n + 1}"))
    else:
        raise DataError(f"--videos {p}: expected a .csv or .jsonl file or a folder of videos with .txt captions")
    if not rows:
        raise DataError(f"--videos {p}: no rows")
    out = []
    for row, where in rows:
        v = _pick(row, VIDEO_KEYS, video_key)
        out.append(Entry(str(base / v) if v else None, _pick(row, CAPTION_KEYS, caption_key), where))
    return out


def _check_columns(p: Path, fields: Sequence[str], video_key: str | None, caption_key: str | None) -> None:
    for chosen, keys, what in ((video_key, VIDEO_KEYS, "video path"), (caption_key, CAPTION_KEYS, "caption")):
        want = [chosen] if chosen else list(keys)
        if not any(k in fields for k in want):
            raise DataError(f"--videos {p}: no {what} column (looked for {', '.join(want)}; the header has "
                            f"{', '.join(fields) or 'nothing'})")


REASONS = {"open": "unreadable video", "decode": "truncated video", "short": "too-short video",
           "missing": "missing video file"}


class VideoWorker:
    """Loads the VAE and the UMT5 encoder once; :meth:`process` decodes (``workers`` threads), encodes a batch."""

    def __init__(self, *, entries: list[Entry], components: dict[str, Path], frames: int, fps: float, height: int,
                 width: int, negative_prompt: str, max_text_len: int, device: torch.device, compute: torch.dtype,
                 workers: int) -> None:
        from diffusers import AutoencoderKLWan

        from ..text.umt5 import PromptEncoder

        self.entries = entries
        self.frames, self.fps, self.height, self.width = frames, fps, height, width
        self.device, self.compute = device, compute
        try:
            self.encoder = PromptEncoder(components["text_encoder"], components["tokenizer"], str(device), compute,
                                         max_text_len)
            # The VAE runs in float32 (small; bf16 costs reconstruction quality).
            self.vae = AutoencoderKLWan.from_pretrained(components["vae"], local_files_only=True,
                                                        torch_dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the Wan components ({e})") from e
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._negative = self.encoder.encode([negative_prompt])
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers)) if workers > 0 else None

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._negative[0][0].cpu(), self._negative[1][0].cpu()

    def _read(self, e: Entry) -> torch.Tensor | ClipError:
        try:
            return read_clip(e.video, frames=self.frames, fps=self.fps, height=self.height, width=self.width)
        except ClipError as err:
            return err

    @torch.no_grad()
    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents ``(mode(z) - latents_mean) / latents_std``."""
        z = self.vae.encode(clips.to(self.device, torch.float32)).latent_dist.mode().float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def process(self, indices: Sequence[int]) -> list[Item | Skip]:
        out: list[Item | Skip] = []
        todo = []
        for i in indices:
            e = self.entries[i]
            if e.video is None:
                out.append(Skip(i, "missing video path", "the row names no video", e.where))
            elif e.caption is None:
                out.append(Skip(i, "missing caption", "no caption (or an empty one)", e.where))
            else:
                todo.append((i, e))
        reads = list(self.pool.map(self._read, [e for _, e in todo]) if self.pool else map(self._read,
                                                                                             [e for _, e in todo]))
        good = []
        for (i, e), r in zip(todo, reads, strict=True):
            if isinstance(r, ClipError):
                out.append(Skip(i, REASONS[r.kind], str(r), e.video or e.where))
            else:
                good.append((i, e, r))
        if not good:
            return out
        latents = self.encode_video(torch.stack([r for _, _, r in good]))
        emb, mask = self.encoder.encode([e.caption for _, e, _ in good])
        emb = emb.cpu()
        for j, (i, e, _) in enumerate(good):
            out.append(Item(i, e.caption, {"latents": latents[j], "text_emb": emb[j], "text_mask": mask[j]}))
        return out
