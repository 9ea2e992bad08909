"""Models: the Wan teacher loader and the TMD student (backbone + flow head).

Names are imported lazily (PEP 562): :mod:`tmd_train.models.teacher` needs no compiled op, the
student's fusion layers need ``tmd_ext``.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConcatFusion": "fusion", "GatedFusion": "fusion", "Features": "student", "StudentConfig": "student",
    "TMDStudent": "student", "unpatchify": "student", "load_teacher": "teacher", "teacher_velocity": "teacher",
    "wan_timestep": "teacher", "SmoothTimeEmbedding": "time_embed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
