"""What both ``prepare`` sources share: the Wan folder's components, devices and precision, sizes."""
from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from ..errors import MissingFileError, UserError, check_device
from .runner import dist_env

#: The files that make a component folder loadable (any one of them for the tokenizer).
COMPONENT_FILES = {"transformer": ("config.json",), "text_encoder": ("config.json",), "vae": ("config.json",),
                   "tokenizer": ("tokenizer_config.json", "spiece.model", "tokenizer.json")}
WAN_LAYOUT = "a Wan2.1 diffusers folder holds transformer/, text_encoder/, tokenizer/ and vae/"


def find_components(names: Sequence[str], folders: Sequence[tuple[str, str]]) -> dict[str, Path]:
    """``{name: path}`` of each component among the ``(flag, folder)`` pairs (first hit wins), checked:
    a :class:`MissingFileError` naming the folder(s) and the component before anything loads."""
    for flag, folder in folders:
        p = Path(folder)
        if not p.is_dir():
            raise MissingFileError(f"{flag} {folder}: no such folder ({WAN_LAYOUT})")
    found = {}
    for name in names:
        for _, folder in folders:
            sub = Path(folder) / name
            if sub.is_dir():
                if not any((sub / f).is_file() for f in COMPONENT_FILES[name]):
                    raise MissingFileError(f"{sub}: not a {name} folder (none of {', '.join(COMPONENT_FILES[name])})")
                found[name] = sub
                break
        else:
            where = " or ".join(f"{flag} {folder}" for flag, folder in folders)
            raise MissingFileError(f"{where}: no {name}/ folder ({WAN_LAYOUT})")
    return found


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return value


def pick_device(device: str | None) -> torch.device:
    """``--device`` (default: ``cuda:LOCAL_RANK`` when there is a GPU, else CPU), checked."""
    if device is None:
        device = f"cuda:{dist_env()[2]}" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist_env()[2])
    return dev


def pick_precision(precision: str, device: torch.device) -> torch.dtype:
    """``--precision`` auto|bf16|fp32 -> the compute dtype (auto: bf16 on GPU, fp32 on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``dtype`` is bf16 (the fp32 modules Wan keeps interoperate)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def latent_size(frames: int, height: int, width: int, patch: Sequence[int], scale_t: int, scale_s: int
                ) -> tuple[int, int, int]:
    """Latent ``(F, H, W)`` of ``frames × height × width`` pixels; UserError naming the option that does not fit."""
    if frames < 1 or (frames - 1) % scale_t:
        raise UserError(f"--frames must be {scale_t}k+1 (the VAE compresses time {scale_t}x), got {frames}")
    for name, v, p in (("--height", height, patch[1]), ("--width", width, patch[2])):
        if v < 1 or v % (scale_s * p):
            raise UserError(f"{name} must be a positive multiple of {scale_s * p} (VAE {scale_s}x times the "
                            f"patch size {p}), got {v}")
    f = (frames - 1) // scale_t + 1
    if f % patch[0]:
        raise UserError(f"--frames {frames}: {f} latent frames are not a multiple of the temporal patch {patch[0]}")
    return f, height // scale_s, width // scale_s


def vae_scales(vae_dir: Path | None) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of the VAE (Wan's 4, 8 without a VAE config)."""
    if vae_dir is None:
        return 4, 8
    cfg = read_json(vae_dir / "config.json")
    return int(cfg.get("scale_factor_temporal", 4)), int(cfg.get("scale_factor_spatial", 8))


def check_positive(args, names: Sequence[str]) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
