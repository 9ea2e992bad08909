"""Samplers and NFE accounting (docs/design.md §1).

* :mod:`~tmd_train.sampling.samplers` — :func:`sample_teacher` (flow-matching Euler with CFG),
  :func:`sample_tmd` (Algorithm 1), :func:`sample_few_step` (the DMD2-v baseline), :class:`Sample`;
* :mod:`~tmd_train.sampling.looped` — :func:`sample_tmd_looped` and :class:`LoopedInnerFlow`, the
  inner flow run by :class:`tmd_ext.FlowHeadLoop`;
* :mod:`~tmd_train.sampling.nfe` — :func:`effective_nfe` (paper Eq. 16) and the measured count
  :func:`count_blocks`;
* :mod:`~tmd_train.sampling.inputs` — start noise, noise draws, per-sample times, text checks;
* :mod:`~tmd_train.sampling.models` — :func:`sample_model`, the sampler of each kind of model folder
  (TMD student, DMD2-v student, teacher) with its recorded settings.

Names are imported lazily (PEP 562): the teacher sampler needs no compiled op, the looped one does.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "samplers", "sample_few_step": "samplers", "sample_teacher": "samplers", "sample_tmd": "samplers",
    "LoopedInnerFlow": "looped", "sample_tmd_looped": "looped",
    "BlockCount": "nfe", "count_blocks": "nfe", "effective_nfe": "nfe",
    "sample_model": "models", "resolved_settings": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
