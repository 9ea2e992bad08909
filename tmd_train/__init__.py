"""tmd_train: Transition Matching Distillation of Wan video transformers (docs/design.md).

Public API: :mod:`tmd_train.models` (``load_teacher``, ``TMDStudent``), :mod:`tmd_train.sampling`
(samplers and NFE), :mod:`tmd_train.schedules` (timestep shift and grids), ``TMDPipeline`` (a diffusers
pipeline over a distilled model, :mod:`tmd_train.pipeline`).

The names below are imported lazily (PEP 562), so tools that need no compiled op — the toy world's
clips, text encoder and teacher trainer (:mod:`tmd_train.toy`) — run without the ``tmd_ext``
extension being built.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Features": "models", "StudentConfig": "models", "TMDStudent": "models", "load_teacher": "models",
    "teacher_velocity": "models", "Sample": "sampling", "effective_nfe": "sampling",
    "sample_few_step": "sampling", "sample_teacher": "sampling", "sample_tmd": "sampling",
    "sample_tmd_looped": "sampling",
    "shift_time": "schedules", "shifted_grid": "schedules",
    "TMDPipeline": "pipeline", "TMDPipelineOutput": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
