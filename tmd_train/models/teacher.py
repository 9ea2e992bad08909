"""The teacher: a diffusers ``WanTransformer3DModel`` (Wan2.1 T2V in diffusers format).

Every public API of ``tmd_train`` takes flow time ``t ∈ [0, 1]`` as a per-sample ``[B]`` tensor;
Wan's modules receive ``1000·t`` (the scale diffusers' Wan pipelines feed them), converted here
by :func:`wan_timestep` only.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

TIME_SCALE = 1000.0


def wan_timestep(t: torch.Tensor) -> torch.Tensor:
    """Flow time ``t ∈ [0, 1]`` ``[B]`` -> Wan's timestep ``1000·t`` ``[B]`` (same dtype)."""
    return t * TIME_SCALE


def _model_folder(path: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) holding the transformer's ``config.json``: ``path/transformer`` (a full
    Wan2.1 diffusers model folder) or ``path`` itself (a transformer folder)."""
    if not path.exists():
        raise FileNotFoundError(f"teacher folder not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"teacher path is not a folder: {path}")
    if (path / "transformer" / "config.json").is_file():
        return path, "transformer"
    if (path / "config.json").is_file():
        return path, None
    raise FileNotFoundError(
        f"no Wan transformer in {path}: expected {path / 'transformer' / 'config.json'} "
        f"(a Wan2.1 diffusers model folder) or {path / 'config.json'} (its transformer/ folder)")


def cast_keeping_fp32(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast the parameters to ``dtype`` except those of the modules Wan keeps in float32
    (``_keep_in_fp32_modules``), as ``from_pretrained(torch_dtype=...)`` does."""
    keep = set(model._keep_in_fp32_modules or ())
    for name, p in model.named_parameters():
        target = torch.float32 if keep.intersection(name.split(".")) else dtype
        p.data = p.data.to(target)


def load_teacher(path_or_config: str | Path | Mapping, *, torch_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> WanTransformer3DModel:
    """Load the teacher transformer.

    Args:
        path_or_config: a Wan2.1 diffusers folder (its ``transformer/`` subfolder is used), or a
            transformer folder itself (loaded with ``from_pretrained(..., local_files_only=True)``;
            nothing is downloaded); or a config dict of ``WanTransformer3DModel`` (random weights,
            used by the tests and the toy world).
        torch_dtype: dtype to load/cast the weights to (default: as stored / float32).
        device: where to put the model (default: CPU).
    Returns:
        The ``WanTransformer3DModel`` in eval mode.
    Raises:
        FileNotFoundError: the folder (or a transformer config inside it) does not exist; the
            message names the path.
        ValueError: the model is image-conditioned (only T2V teachers are supported).
    """
    if isinstance(path_or_config, Mapping):
        model = WanTransformer3DModel.from_config(dict(path_or_config))
        if torch_dtype is not None:
            cast_keeping_fp32(model, torch_dtype)
    elif isinstance(path_or_config, (str, Path)):
        folder, sub = _model_folder(Path(path_or_config))
        model = WanTransformer3DModel.from_pretrained(folder, subfolder=sub, local_files_only=True,
                                                      torch_dtype=torch_dtype)
    else:
        raise TypeError(f"path_or_config must be a folder path or a config dict, "
                        f"got {type(path_or_config).__name__}")
    if model.config.image_dim is not None or model.config.added_kv_proj_dim is not None:
        raise ValueError("only text-to-video Wan teachers are supported (image_dim and "
                         "added_kv_proj_dim must be None)")
    if device is not None:
        model = model.to(device)
    return model.eval()


def teacher_velocity(teacher: WanTransformer3DModel, x_t: torch.Tensor, t: torch.Tensor,
                     text: torch.Tensor) -> torch.Tensor:
    """The teacher's velocity ``v(x_t, t) ≈ E[x1 - x | x_t]``.

    Args:
        x_t: ``[B, C, F, H, W]`` latents at flow time ``t``.
        t: ``[B]`` flow times in ``[0, 1]`` (the model receives ``1000·t``).
        text: ``[B, L_text, text_dim]`` text-encoder states.
    Returns:
        ``[B, C, F, H, W]`` in the dtype of ``x_t``.
    """
    dtype = teacher.patch_embedding.weight.dtype
    out = teacher(x_t.to(dtype), wan_timestep(t), text.to(dtype), return_dict=False)[0]
    return out.to(x_t.dtype)
