"""``prepare synthetic``: teacher samples of prompts, with their start noise (see :mod:`tmd_train.prepare`)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.sources import masked_text
from ..engine.seeding import derive_seed
from ..errors import DataError, MissingFileError, UserError
from .common import autocast
from .runner import Item, Skip


def read_prompts(path: str | Path) -> list[str | None]:
    """The prompts of a ``.txt`` (one per line) or ``.jsonl`` (a ``prompt`` field per line) file; ``None``
    for an empty line / a row without a usable prompt (skipped later, with the reason). Trailing blank lines
    are dropped."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"--prompts {p}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"--prompts {p}: not UTF-8 text ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[str | None] = []
    if p.suffix == ".jsonl":
        for line in lines:
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                row = None
            value = row.get("prompt") if isinstance(row, dict) else None
            out.append(value.strip() if isinstance(value, str) and value.strip() else None)
    else:
        out = [line.strip() or None for line in lines]
    if not out:
        raise DataError(f"--prompts {p}: no prompts")
    return out


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as it will be stored in ``dtype``, back in float32 (the ODE starts from the stored noise)."""
    return x.to(dtype).float()


def clip_noise(seed: int, index: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The start noise of clip ``index``: N(0, I) in float32 from a generator seeded by ``(seed, index)``,
    rounded to the storage ``dtype``."""
    g = torch.Generator().manual_seed(derive_seed(seed, "clip", index))
    return round_to(torch.randn(tuple(shape), generator=g), dtype)


class SyntheticWorker:
    """Loads the UMT5 encoder and the teacher once; :meth:`process` samples a batch of clips."""

    def __init__(self, *, prompts: list[str | None], clips_per_prompt: int, components: dict[str, Path],
                 latent_shape: Sequence[int], negative_prompt: str, steps: int, cfg: float, shift: float,
                 t_max: float, seed: int, max_text_len: int, device: torch.device, compute: torch.dtype,
                 storage: torch.dtype, attention_backend: str = "native") -> None:
        from ..models.teacher import load_teacher
        from ..text.umt5 import PromptEncoder

        self.prompts, self.k = prompts, clips_per_prompt
        self.shape = tuple(latent_shape)
        self.negative_prompt = negative_prompt
        self.steps, self.cfg, self.shift, self.t_max, self.seed = steps, cfg, shift, t_max, seed
        self.device, self.compute, self.storage = device, compute, storage
        try:
            self.encoder = PromptEncoder(components["text_encoder"], components["tokenizer"], str(device), compute,
                                         max_text_len)
            self.teacher = load_teacher(components["transformer"].parent, torch_dtype=compute,
                                        device=device).requires_grad_(False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the Wan components ({e})") from e
        from ..models.attention import set_attention_backend

        set_attention_backend(self.teacher, attention_backend, key="--attention-backend", device=device)
        if self.teacher.config.text_dim != self.encoder.encoder.config.d_model:
            raise UserError(f"the text encoder's width {self.encoder.encoder.config.d_model} differs from the "
                            f"teacher's text_dim {self.teacher.config.text_dim}")
        self._negative = self.encoder.encode([negative_prompt])
        self._neg_text = masked_text(*self._negative)[:1].to(device)

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._negative[0][0].cpu(), self._negative[1][0].cpu()

    @torch.no_grad()
    def process(self, indices: Sequence[int]) -> list[Item | Skip]:
        from ..sampling import sample_teacher

        out: list[Item | Skip] = []
        todo = []
        for i in indices:
            p = self.prompts[i // self.k]
            if p is None:
                out.append(Skip(i, "empty prompt", f"prompt line {i // self.k + 1} is empty or has no prompt",
                                f"line {i // self.k + 1}"))
            else:
                todo.append((i, p))
        if not todo:
            return out
        emb, mask = self.encoder.encode([p for _, p in todo])
        noise = torch.stack([clip_noise(self.seed, i, self.shape, self.storage) for i, _ in todo])
        with autocast(self.device, self.compute):
            x0 = sample_teacher(self.teacher, masked_text(emb, mask.to(emb.device)), negative_text=self._neg_text,
                                noise=noise.to(self.device), steps=self.steps, cfg=self.cfg, shift=self.shift,
                                t_max=self.t_max).x0
        x0 = x0.float().cpu()
        emb = emb.cpu()
        for j, (i, p) in enumerate(todo):
            out.append(Item(i, p, {"latents": x0[j], "noise": noise[j], "text_emb": emb[j], "text_mask": mask[j]}))
        return out
