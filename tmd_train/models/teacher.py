"""The teacher: a diffusers ``WanTransformer3DModel`` (Wan2.1 T2V in diffusers format).

Every public API of ``tmd_train`` takes flow time ``t ∈ [0, 1]`` as a per-sample ``[B]`` tensor;
Wan's modules receive ``1000·t`` (the scale diffusers' Wan pipelines feed them), converted here
by :func:`wan_timestep` only.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch import nn

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


def fp32_tensor_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()`` / ``named_buffers()``) of the floating-point
    parameters and buffers that belong to a module Wan keeps in float32: for every diffusers model
    inside ``model`` (``model`` itself, a student's ``transformer``, a wrapper's ``teacher``), the
    tensors under one of its ``_keep_in_fp32_modules`` (``WanTransformer3DModel``: the RoPE tables,
    the time embedder, every ``scale_shift_table`` and the blocks' float32 LayerNorms), matched by
    path component as ``from_pretrained(torch_dtype=...)`` matches them."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        if not keep:
            continue
        head = f"{prefix}." if prefix else ""
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if tensor.is_floating_point() and keep.intersection(name.split(".")):
                names.add(head + name)
    return names


def cast_keeping_fp32(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place, except those of
    :func:`fp32_tensor_names`, which become float32 — what diffusers' ``from_pretrained(torch_dtype=
    dtype)`` does to a Wan model, for any module tree that holds Wan models (teacher, student, fake
    score, few-step generator). Parameters stay the same ``nn.Parameter`` objects. ``dtype=None``
    changes nothing. Returns ``model``."""
    if dtype is None:
        return model
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    keep = fp32_tensor_names(model)
    for prefix, module in model.named_modules():
        head = f"{prefix}." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if head + name in keep else dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                module._buffers[name] = b.to(torch.float32 if head + name in keep else dtype)
    return model


WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def weight_files(folder: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a diffusers model folder (its
    ``*.safetensors.index.json`` weight map, else every ``*.safetensors`` file's keys); empty when
    the folder holds no safetensors (e.g. only ``.bin`` weights)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update({k: path for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return files


def empty_teacher(path: str | Path) -> tuple[WanTransformer3DModel, Path]:
    """The teacher of a Wan2.1 folder (as :func:`load_teacher` takes it) built without weights:
    ``(model, transformer folder)``, the model's parameters on the meta device in float32 (its
    buffers, the RoPE tables, real), in eval mode. Fill it from :func:`weight_files` of the folder.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_teacher`.
    """
    from accelerate import init_empty_weights

    folder, sub = _model_folder(Path(path))
    folder = folder / sub if sub else folder
    config = dict(WanTransformer3DModel.load_config(str(folder)))
    config["patch_size"] = tuple(config["patch_size"])
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(config)
    if model.config.image_dim is not None or model.config.added_kv_proj_dim is not None:
        raise ValueError("only text-to-video Wan teachers are supported (image_dim and "
                         "added_kv_proj_dim must be None)")
    return model.eval(), folder


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
