"""Argument checks run by the public op functions before dispatch, so a bad call fails in Python
with a message naming the argument (the C++ kernels check again for direct `torch.ops` callers)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TIME_DTYPES = (torch.float32, torch.float64)


def tensor(x, name: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")
    return x


def same_dtype(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def dim(x: torch.Tensor, n: int, name: str, layout: str) -> None:
    if x.dim() != n:
        raise ValueError(f"{name} must be {n}-D {layout}, got shape {tuple(x.shape)}")


def shape(x: torch.Tensor, expected, name: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def zero_dim(x: torch.Tensor, name: str) -> None:
    if x.dim() != 0:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(x.shape)}")
