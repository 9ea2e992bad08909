"""Training methods, one file each, registered by name in :data:`METHODS`.

Each method (a :class:`~tmd_train.engine.trainer.Method`) owns its networks, optimizers, data
order, ``train_step``, checkpoint contents, sampling settings and ``export``; the engine's
:func:`~tmd_train.engine.trainer.fit` runs any of them. Stage 1 (:class:`Stage1Config`):
``tm_meanflow`` (TM-MeanFlow pretraining of the flow head) and ``tm`` (plain transition matching).
Stage 2 (:class:`Stage2Config`): ``tmd`` (DMD2-v with flow-head roll-out) and ``dmd2v`` (the plain
few-step DMD2-v baseline). Adding a method = adding a module here that decorates its class with
``@register("name")`` (every module of this package is imported below). See ``README.md``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .distill import Stage2Config
from .registry import METHODS, register
from .tm_meanflow import Stage1Config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_method(cfg: Any, **kwargs: Any) -> Any:
    """The method ``cfg.method`` built for ``cfg`` (``kwargs``: e.g. a test data ``source``)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    return METHODS[cfg.method](cfg, **kwargs)


__all__ = ["METHODS", "Stage1Config", "Stage2Config", "build_method", "register"]
