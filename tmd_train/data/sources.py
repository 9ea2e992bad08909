"""Data sources for training: anything with ``__len__`` and ``__getitem__(i)`` returning
``{"latents": [C, F, H, W], "text_emb": [L, D], "text_mask": [L] (bool)}``, plus the
negative-prompt embedding ``(text_emb [L, D], text_mask [L])``.

* :class:`SyntheticSource` — deterministic random latents and text embeddings shaped for a
  teacher config (tests, smoke runs; no files).
* :class:`ShapesSource` — the toy world's clips rendered on the fly (``data="shapes"``).
* a dataset folder (docs/design.md §5) — :class:`~tmd_train.data.format.LatentDataset` and
  :func:`~tmd_train.data.format.load_negative`.

:func:`collate` stacks items into the batch the objectives read: ``latents [B, C, F, H, W]`` and
``text [B, L, D]`` with the padding (mask False) zeroed, as Wan pipelines feed the transformer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import DataError
from .format import LatentDataset, load_negative


class DataSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...


class SyntheticSource:
    """``num_samples`` deterministic samples for a teacher config, with learnable structure:
    sample ``i`` belongs to class ``i % num_classes``; its latents are the class prototype
    (a fixed N(0, 1) field) plus ``0.1·N(0, 1)``, its text embedding the class's prototype
    embedding plus ``0.05·N(0, 1)``, its mask covers the first ``L - (i % 3)`` tokens.

    Args:
        num_samples: dataset size.
        latent_shape: ``(C, F, H, W)``.
        text_len, text_dim: ``L`` and ``D`` of the text embedding.
        num_classes: number of prototypes.
        seed: everything is a function of ``(seed, i)``.
    """

    def __init__(self, num_samples: int, latent_shape: Sequence[int], text_len: int, text_dim: int,
                 num_classes: int = 4, seed: int = 0) -> None:
        if num_samples < 1 or len(latent_shape) != 4 or min(latent_shape) < 1 or text_len < 1 or text_dim < 1:
            raise ValueError(f"SyntheticSource: bad sizes num_samples={num_samples}, latent_shape={latent_shape}, "
                             f"text_len={text_len}, text_dim={text_dim}")
        self.num_samples = num_samples
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.text_len = text_len
        self.text_dim = text_dim
        self.num_classes = max(1, min(num_classes, num_samples))
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.latent_protos = torch.randn((self.num_classes, *self.latent_shape), generator=g)
        self.text_protos = torch.randn((self.num_classes, text_len, text_dim), generator=g)
        self._negative = torch.randn((text_len, text_dim), generator=g)

    @classmethod
    def for_teacher(cls, teacher_config: Mapping[str, Any], num_samples: int, latent_size: Sequence[int],
                    text_len: int, seed: int = 0) -> SyntheticSource:
        """Shaped for a ``WanTransformer3DModel`` config: ``C = in_channels``, ``(F, H, W) =
        latent_size``, ``D = text_dim``."""
        return cls(num_samples, (teacher_config["in_channels"], *latent_size), text_len,
                   teacher_config["text_dim"], seed=seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        k = i % self.num_classes
        latents = self.latent_protos[k] + 0.1 * torch.randn(self.latent_shape, generator=g)
        text = self.text_protos[k] + 0.05 * torch.randn((self.text_len, self.text_dim), generator=g)
        mask = torch.arange(self.text_len) < self.text_len - (i % 3)
        return {"latents": latents, "text_emb": text, "text_mask": mask, "index": i}

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative-prompt embedding ``(text_emb [L, D], text_mask [L])`` (a fixed random one)."""
        return self._negative.clone(), torch.ones(self.text_len, dtype=torch.bool)


class ShapesSource:
    """The moving-shapes world (:mod:`tmd_train.toy.clips`) as a source: item ``i`` is clip ``i``
    of world seed ``seed`` (pixel space, ``[3, 8, 32, 32]`` in [-1, 1]) with its prompt encoded by the
    toy text encoder; rendered on the fly (about 1 ms a clip), deterministic in ``(seed, i)``.
    The negative is the empty prompt."""

    def __init__(self, num_samples: int, seed: int = 0, p_two: float = 0.0) -> None:
        from ..toy.clips import WorldConfig
        if num_samples < 1:
            raise ValueError(f"ShapesSource: num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.world = WorldConfig(p_two=p_two)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ..toy import text_encoder
        from ..toy.clips import make_clip
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        clip = make_clip(self.seed, i, self.world)
        emb, mask = text_encoder.encode([clip.prompt])
        return {"latents": clip.video, "text_emb": emb[0], "text_mask": mask[0], "prompt": clip.prompt, "index": i}

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ..toy import text_encoder
        return text_encoder.encode_negative()


def open_source(data: str, *, teacher_config: Mapping[str, Any] | None = None, synthetic_samples: int = 64,
                synthetic_latent_size: Sequence[int] = (3, 8, 8), synthetic_text_len: int = 8, seed: int = 0
                ) -> tuple[DataSource, tuple[torch.Tensor, torch.Tensor]]:
    """``(source, (negative_emb [L, D], negative_mask [L]))`` for ``data``: ``"synthetic"`` (a
    :class:`SyntheticSource` for ``teacher_config``), ``"shapes"`` (a :class:`ShapesSource` of
    ``synthetic_samples`` clips of world seed ``seed``) or a dataset folder.

    Raises:
        FileNotFoundError / DatasetFormatError: a folder that is not a valid dataset.
        DataError: a dataset of another kind, or one that does not fit ``teacher_config``
            (:func:`check_fits_teacher`).
    """
    if data == "shapes":
        src = ShapesSource(synthetic_samples, seed=seed)
        if teacher_config is not None:
            item = src[0]
            check_fits_teacher("data=shapes (the toy world)", tuple(item["latents"].shape),
                               tuple(item["text_emb"].shape), teacher_config)
        return src, src.negative()
    if data == "synthetic":
        if teacher_config is None:
            raise ValueError("data='synthetic' needs the teacher config (for the latent channels and text_dim)")
        src = SyntheticSource.for_teacher(teacher_config, synthetic_samples, synthetic_latent_size,
                                          synthetic_text_len, seed=seed)
        return src, src.negative()
    ds = LatentDataset(Path(data))
    if ds.kind != "latents":
        raise DataError(f"data: dataset {data} holds {ds.kind!r} samples; training needs a 'latents' dataset "
                        "(a 'kd' dataset goes to kd_pairs=)")
    if teacher_config is not None:
        check_fits_teacher(f"data={data}", ds.shapes["latents"], ds.shapes["text_emb"], teacher_config)
    return ds, load_negative(data)


def check_fits_teacher(what: str, latent_shape: Sequence[int], text_shape: Sequence[int],
                       teacher_config: Mapping[str, Any]) -> None:
    """DataError unless samples of ``latent_shape`` ``(C, F, H, W)`` and text ``(L, D)`` fit the
    teacher: ``C == in_channels``, ``D == text_dim`` and ``(F, H, W)`` divisible by ``patch_size``."""
    c, *size = (int(v) for v in latent_shape)
    want_c, want_d = teacher_config.get("in_channels"), teacher_config.get("text_dim")
    patch = tuple(teacher_config.get("patch_size") or (1, 1, 1))
    problems = []
    if want_c is not None and c != want_c:
        problems.append(f"{c} latent channels, the teacher takes {want_c}")
    if want_d is not None and int(text_shape[-1]) != want_d:
        problems.append(f"text embeddings of width {int(text_shape[-1])}, the teacher's text_dim is {want_d}")
    if len(size) == len(patch) and any(n % p for n, p in zip(size, patch, strict=True)):
        problems.append(f"latent size (F, H, W) = {tuple(size)} not divisible by the teacher's patch {patch}")
    if problems:
        raise DataError(f"{what} does not fit the teacher: {'; '.join(problems)} (encode the data for this "
                        "teacher, or pass the teacher it was made for)")


def masked_text(text_emb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """``text_emb [..., L, D]`` with the padded positions (``text_mask [..., L]`` False) zeroed."""
    return text_emb * text_mask.unsqueeze(-1).to(text_emb.dtype)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack source items: ``{"latents": [B, C, F, H, W], "text": [B, L, D]}`` (float32, padding
    zeroed)."""
    latents = torch.stack([it["latents"] for it in items]).float()
    text = masked_text(torch.stack([it["text_emb"] for it in items]).float(),
                       torch.stack([it["text_mask"] for it in items]))
    return {"latents": latents, "text": text}


class KDView:
    """A dataset read as KD pairs: a ``"kd"`` dataset as it is, or a teacher-synthesised ``"latents"``
    dataset that holds each clip's start ``noise`` (``python -m tmd_train.prepare synthetic``), whose
    ``latents`` are the teacher's ODE samples from that noise: item ``i`` is ``{"noise", "target",
    "text_emb", "text_mask", "prompt", "index"}`` either way.

    Raises DataError for a ``"latents"`` dataset without ``noise`` (real videos: no ODE pairs)."""

    def __init__(self, dataset: LatentDataset) -> None:
        if dataset.kind != "kd" and "noise" not in dataset.tensor_keys:
            raise DataError(f"dataset {dataset.folder} holds {dataset.kind!r} samples without their start noise; "
                            "KD pairs need a 'kd' dataset (python -m tmd_train.kd_pairs) or a teacher-synthesised "
                            "dataset (python -m tmd_train.prepare synthetic)")
        self.dataset = dataset
        self.folder = dataset.folder
        self.metadata = dataset.metadata
        self.shapes = {"noise": dataset.shapes["noise"], "text_emb": dataset.shapes["text_emb"],
                       "target": dataset.shapes["target" if dataset.kind == "kd" else "latents"]}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        if "latents" in item:
            item["target"] = item.pop("latents")
        return item
