"""Typed training configs loaded from YAML plus ``key=value`` overrides.

Every stage shares this loader::

    cfg = load_config(Stage1Config, "cfg.yaml", ["lr=1e-4", "objective.cfg_scale=3", "teacher.num_layers=4"])

* A YAML file (optional) gives a mapping of field names; ``key=value`` overrides follow, their
  values parsed as YAML, ``1e-6`` included (``steps=10``, ``betas=[0.9,0.99]``, ``c=null``).
* A field typed as a dataclass (a sub-config, e.g. ``objective: TMMeanFlowConfig``) is filled from
  a YAML mapping and/or dotted keys ``objective.cfg_scale=3``, recursively, with the same checks;
  a dotted key into a plain ``dict`` field (``teacher.num_layers=4``) sets that entry.
* Values are checked against the field's type hint (``int``, ``float``, ``bool``, ``str``,
  ``dict``, ``list[...]``/``tuple[...]``, ``X | None`` and unions of those) and coerced where
  lossless (an int for a float field; ``"3e-5"``, which YAML 1.1 reads as a string, for a float).
  Unknown keys and wrong types raise ``ValueError`` naming the full key (``objective.cfg_scle``).
* After loading, each dataclass's ``validate()`` (if it has one) checks the values themselves; the
  errors of a sub-config are prefixed with its field name (``objective.cfg_scale must be > 0``).
* A sub-config field whose ``metadata`` has ``"set_by"`` (e.g. the objective variant, chosen by
  ``method=``) is not a config key: it is neither read nor written.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
MIXED_PRECISIONS = ("auto", "bf16", "no")


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


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The config keys of the dataclass ``cls``: its init fields not marked ``set_by``."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and "set_by" not in f.metadata}


def _is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``values`` (type-checked; nested mappings and dotted keys
    fill sub-config fields and entries of mapping fields), then run its ``validate()``.
    ``prefix`` (e.g. ``"objective."``) is prepended to the keys named in errors."""
    hints = typing.get_type_hints(cls)
    fields = config_fields(cls)
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        name, dot, sub = key.partition(".")
        if name not in fields:
            raise ValueError(f"unknown config key {prefix + name!r} for {cls.__name__} (known: {', '.join(fields)})")
        if dot:
            nested.setdefault(name, {})[sub] = value
        else:
            kwargs[name] = value
    for name in fields:
        if _is_config_class(hints[name]) and (name in kwargs or name in nested):
            kwargs[name] = _sub_config(hints[name], kwargs.get(name), nested.pop(name, {}), f"{prefix}{name}.")
    for name, entries in nested.items():
        base = kwargs.get(name, _default(fields[name]))
        if base is None:  # a mapping field without a default value starts empty
            base = {}
        if not isinstance(base, Mapping):
            raise ValueError(f"{prefix}{name}.{next(iter(entries))}: {prefix}{name} is not a mapping "
                             f"(it is {base!r})")
        base = dict(base)
        for sub, value in entries.items():
            _set_dotted(base, sub, value)
        kwargs[name] = base
    for name, value in list(kwargs.items()):
        if not _is_config_class(hints[name]):
            kwargs[name] = coerce(value, hints[name], prefix + name)
    try:
        cfg = cls(**kwargs)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
    except ValueError as e:
        raise _prefixed_error(e, prefix, fields) from None
    return cfg


def _sub_config(cls: type, base: Any, dotted: Mapping[str, Any], prefix: str) -> Any:
    """The sub-config ``cls`` from a mapping (or an instance) ``base`` with ``dotted`` entries on top."""
    if base is None:
        base = {}
    elif dataclasses.is_dataclass(base):
        base = config_to_dict(base)
    elif not isinstance(base, Mapping):
        raise ValueError(f"{prefix[:-1]}: expected a mapping of {cls.__name__} fields, got {base!r}")
    merged = dict(base)
    merged.update(dotted)
    return config_from_dict(cls, merged, prefix)


def _prefixed_error(error: ValueError, prefix: str, fields: Mapping[str, Any]) -> ValueError:
    """``error`` of a sub-config with its key prefix: ``"x must be ..."`` -> ``"objective.x must be ..."``
    (other messages: ``"objective: ..."``); unchanged at the top level or when already prefixed."""
    msg = str(error)
    if not prefix or msg.startswith(prefix):
        return error
    words = msg.split()
    head = words[0].rstrip(":") if words else ""
    if head.split(".")[0].split("[")[0] in fields:
        return ValueError(prefix + msg)
    return ValueError(f"{prefix[:-1]}: {msg}")


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
    """A YAML/JSON-friendly dict of a config dataclass (sub-configs become mappings, tuples lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return config_to_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {name: plain(getattr(cfg, name)) for name in config_fields(type(cfg))}


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


def check_learning_rates(cfg: Any, names: Sequence[str]) -> None:
    """Each of ``names`` (``None`` allowed: a default) must be a finite number > 0."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and (not v > 0 or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")


@dataclass
class TrainConfig:
    """The options every training method shares (each stage's config extends it).

    Model: ``teacher`` (a Wan2.1 diffusers folder / transformer folder, or a
    ``WanTransformer3DModel`` config mapping for a random teacher seeded by ``seed``), ``method``
    (a name of :data:`tmd_train.methods.METHODS` that trains with this config).
    Data: ``data`` (``"shapes"``, ``"synthetic"`` or a dataset folder, docs/design.md §5),
    ``synthetic_samples`` samples of ``synthetic_latent_size`` (F, H, W) and ``synthetic_text_len``
    tokens for ``data=synthetic``, ``num_workers`` (DataLoader workers).
    Optimisation: ``batch_size`` (per process), ``steps``, ``lr``, ``weight_decay``, ``adam_betas``,
    ``adam_eps``, ``max_grad_norm`` (<= 0: no clipping), ``mixed_precision`` (``auto``: bf16
    autocast on GPU, off on CPU), ``gradient_checkpointing``, ``seed``, ``cpu_threads`` (CPU
    runs: ``torch.set_num_threads``; 0 keeps torch's default — on a busy machine 1 can be many
    times faster than oversubscribed threads).
    Output: ``output_dir``, ``checkpoint_every``, ``keep_last``, ``log_every``.
    """

    teacher: str | dict | None = None
    method: str = ""

    data: str = "synthetic"
    synthetic_samples: int = 64
    synthetic_latent_size: tuple[int, int, int] = (3, 8, 8)
    synthetic_text_len: int = 8
    num_workers: int = 0

    batch_size: int = 1
    steps: int = 1000
    lr: float = 3e-5
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    cpu_threads: int = 0

    output_dir: str = "runs/train"
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10

    def validate(self) -> None:
        """Raise ValueError naming the first bad shared field."""
        if self.teacher is None:
            raise ValueError("teacher is required: a Wan2.1 diffusers folder or a WanTransformer3DModel config")
        if isinstance(self.teacher, str) and not self.teacher:
            raise ValueError("teacher must not be empty")
        if not self.data:
            raise ValueError("data must be 'shapes', 'synthetic' or a dataset folder")
        check_fields(self, choices={"mixed_precision": MIXED_PRECISIONS},
                     positive=("batch_size", "steps", "checkpoint_every", "keep_last", "log_every",
                               "synthetic_samples", "synthetic_text_len"),
                     non_negative=("num_workers", "seed", "cpu_threads"))
        if min(self.synthetic_latent_size) < 1:
            raise ValueError(f"synthetic_latent_size must be positive, got {self.synthetic_latent_size}")
        check_learning_rates(self, ("lr",))
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
