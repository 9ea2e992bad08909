"""Typed training configs: a dataclass per stage, loaded from YAML plus ``key=value`` overrides.

Shared by every stage::

    cfg = load_config(Stage1Config, "cfg.yaml", ["lr=1e-4", "teacher.num_layers=4"])

* A YAML file (optional) gives a mapping of field names; ``key=value`` overrides follow, their
  values parsed as YAML, ``1e-6`` included (``steps=10``, ``betas=[0.9,0.99]``, ``c=null``); a dotted key
  ``a.b=v`` sets entry ``b`` of the mapping field ``a``.
* Values are checked against the field's type hint (``int``, ``float``, ``bool``, ``str``,
  ``dict``, ``list[...]``/``tuple[...]``, ``X | None`` and unions of those) and coerced where
  lossless (an int for a float field; ``"3e-5"``, which YAML 1.1 reads as a string, for a float).
  Unknown keys and wrong types raise ``ValueError`` naming the key.
* After loading, the dataclass's ``validate()`` (if it has one) checks the values themselves.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-6`` / ``3e-5`` (no dot) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML (safe), reading exponent floats without a dot as floats."""
    return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type hint ``tp`` (coerced where lossless); ValueError naming
    ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
            items = [coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item_tp = args[0] if args else Any
            items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        out[key] = yaml_load(raw) if raw.strip() else ""
    return out


def config_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from ``values`` (type-checked; dotted keys set entries of mapping
    fields), then run its ``validate()``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        name, dot, sub = key.partition(".")
        if name not in fields:
            raise ValueError(f"unknown config key {name!r} for {cls.__name__} (known: {', '.join(fields)})")
        if dot:
            nested.setdefault(name, {})[sub] = value
        else:
            kwargs[name] = value
    for name, entries in nested.items():
        base = kwargs.get(name, _default(fields[name]))
        if base is None:  # a mapping field without a default value starts empty
            base = {}
        if not isinstance(base, Mapping):
            raise ValueError(f"{name}.{next(iter(entries))}: {name} is not a mapping (it is {base!r})")
        base = dict(base)
        for sub, value in entries.items():
            _set_dotted(base, sub, value)
        kwargs[name] = base
    for name, value in list(kwargs.items()):
        kwargs[name] = coerce(value, hints[name], name)
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    head, dot, rest = key.partition(".")
    if not dot:
        d[head] = value
        return
    child = d.get(head)
    if not isinstance(child, dict):
        child = {}
    d[head] = child
    _set_dotted(child, rest, value)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from the YAML file ``path`` (optional) with ``key=value`` ``overrides`` applied on
    top; type-checked and validated. Raises FileNotFoundError / ValueError naming the problem."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: the config must be a YAML mapping of field names")
        values.update(loaded)
    values.update(parse_overrides(overrides))
    return config_from_dict(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A YAML/JSON-friendly dict of a config dataclass (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def check_fields(cfg: Any, *, choices: Mapping[str, Sequence[Any]] = {}, positive: Sequence[str] = (),
                 non_negative: Sequence[str] = ()) -> None:
    """Shared ``validate()`` checks, each raising ValueError naming the field: ``choices`` maps a
    field to its allowed values, ``positive`` fields must be >= 1, ``non_negative`` fields >= 0."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(cfg, name)!r}")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
