"""The method registry: ``METHODS`` maps a name to its :class:`~tmd_train.engine.trainer.Method`
subclass; a method file registers its class with ``@register("name")``."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..engine.trainer import Method

M = TypeVar("M", bound=type[Method])

#: name -> method class (filled as the method modules are imported by :mod:`tmd_train.methods`).
METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator: register a method under ``name`` (also set as its ``name``)."""
    def deco(cls: M) -> M:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def methods_for(config_cls: type) -> tuple[str, ...]:
    """The names of the registered methods that train with ``config_cls``."""
    return tuple(name for name, cls in METHODS.items() if cls.config_cls is config_cls)


def check_method(cfg: object) -> None:
    """ValueError unless ``cfg.method`` names a registered method that trains with ``type(cfg)``."""
    names = methods_for(type(cfg))
    if cfg.method not in names:
        raise ValueError(f"method must be one of {names}, got {cfg.method!r}")
