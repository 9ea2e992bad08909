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
  Unknown keys and wrong types raise :class:`~tmd_train.errors.ConfigError` (a ``ValueError``)
  naming the full key (``objective.cfg_scle``); a YAML syntax error names the file and line.
* After loading, each dataclass's ``validate()`` (if it has one) checks the values themselves; the
  errors of a sub-config are prefixed with its field name (``objective.cfg_scale must be > 0``).
* A sub-config field whose ``metadata`` has ``"set_by"`` (e.g. the objective variant, chosen by
  ``method=``) is not a config key: it is neither read nor written.
* Each key's one-line meaning is its entry in the ``Attributes:`` section of the docstring of the
  config class that declares it (:func:`field_docs`); ``--help`` of the stages lists them
  (:func:`config_key_table`).
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

from ..errors import ConfigError, MissingFileError
from ..models.attention import ATTENTION_BACKENDS

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


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``"line L, column C: <problem>"`` of a YAML error (1-based), or its text."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, where = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and where is not None and where.line != mark.line:
        text += f" ({context} at line {where.line + 1}, column {where.column + 1})"
    return text


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
            raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
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
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key] = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "quote it or fix the brackets") from None
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
            raise ConfigError(f"unknown config key {prefix + name!r} for {cls.__name__} (known: {', '.join(fields)})")
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
            raise ConfigError(f"{prefix}{name}.{next(iter(entries))}: {prefix}{name} is not a mapping "
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
        raise ConfigError(f"{prefix[:-1]}: expected a mapping of {cls.__name__} fields, got {base!r}")
    merged = dict(base)
    merged.update(dotted)
    return config_from_dict(cls, merged, prefix)


def _prefixed_error(error: ValueError, prefix: str, fields: Mapping[str, Any]) -> ConfigError:
    """``error`` of a sub-config as a :class:`ConfigError` with its key prefix: ``"x must be ..."`` ->
    ``"objective.x must be ..."`` (other messages: ``"objective: ..."``); the message is unchanged at the
    top level or when already prefixed."""
    msg = str(error)
    if not prefix or msg.startswith(prefix):
        return error if isinstance(error, ConfigError) else ConfigError(msg)
    words = msg.split()
    head = words[0].rstrip(":") if words else ""
    if head.split(".")[0].split("[")[0] in fields:
        return ConfigError(prefix + msg)
    return ConfigError(f"{prefix[:-1]}: {msg}")


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
    top; type-checked and validated.

    Raises:
        MissingFileError: ``path`` does not exist or is not a file.
        ConfigError: a YAML syntax error (file, line and column), an unknown key, a bad value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"config file not found: {path} (check the --config path)")
        if not path.is_file():
            raise MissingFileError(f"config file {path} is not a file (--config takes a YAML file)")
        try:
            loaded = yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: YAML syntax error, {_yaml_problem(e)}; fix the file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text (UTF-8) YAML file ({e.reason} at byte {e.start})") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the config must be a YAML mapping of field names")
        values.update(loaded)
    values.update(parse_overrides(overrides))
    return config_from_dict(cls, values)


_ATTRIBUTE = re.compile(r"^(\s*)([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*:\s*(.*)$")


def _attribute_docs(doc: str) -> dict[str, str]:
    """The entries of the ``Attributes:`` section of a Google-style docstring: ``name: text`` (or
    ``a, b: text`` for several names), continuation lines indented deeper, joined into one line."""
    lines = doc.expandtabs().splitlines()
    out: dict[str, str] = {}
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return out
    section_indent = len(lines[start]) - len(lines[start].lstrip())
    names: list[str] = []
    entry_indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= section_indent:
            break
        m = _ATTRIBUTE.match(line)
        if m and (entry_indent is None or indent == entry_indent):
            entry_indent = indent
            names = [n.strip() for n in m.group(2).split(",")]
            for n in names:
                out[n] = m.group(3).strip()
        elif names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The one-line meaning of each field of the dataclass ``cls``: its entry in the ``Attributes:``
    section of the docstring of the nearest class of the MRO that documents it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_attribute_docs(klass.__dict__.get("__doc__") or ""))
    return docs


def config_key_table(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, meaning)`` of every config key of ``cls``, a sub-config's keys as
    ``<field>.<key>`` (in field order). The meaning is ``""`` where the docstrings lack one."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows: list[tuple[str, str, str]] = []
    for name, f in config_fields(cls).items():
        if _is_config_class(hints[name]):
            rows += config_key_table(hints[name], f"{prefix}{name}.")
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        shown = override_text(_default(f)) if has_default else "(required)"
        rows.append((prefix + name, shown, docs.get(name, "").replace("``", "")))
    return rows


def override_text(value: Any) -> str:
    """``value`` as written in a ``key=value`` override (``null``, ``true``, ``3e-05``, ``[0.9, 0.99]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(override_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {override_text(v)}" for k, v in value.items()) + "}"
    return str(value) if isinstance(value, str) else repr(value)


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
            raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {getattr(cfg, name)!r}")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def check_learning_rates(cfg: Any, names: Sequence[str]) -> None:
    """Each of ``names`` (``None`` allowed: a default) must be a finite number > 0."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and (not v > 0 or not math.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number > 0, got {v}")


@dataclass
class TrainConfig:
    """The options every training method shares (each stage's config extends it).

    Attributes:
        teacher: a Wan2.1 diffusers folder or its transformer/ folder (or a WanTransformer3DModel
            config mapping: a random teacher seeded by ``seed``).
        method: the training method (a name of ``tmd_train.methods.METHODS`` that trains with this config).
        data: "shapes" (the toy world), "synthetic" or a dataset folder (docs/design.md §5).
        synthetic_samples: number of samples of data=synthetic and data=shapes.
        synthetic_latent_size: latent (F, H, W) of data=synthetic.
        synthetic_text_len: text length of data=synthetic.
        num_workers: DataLoader worker processes (0: load in the training process).
        batch_size: samples per process and step.
        steps: training steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW (beta1, beta2).
        adam_eps: AdamW epsilon.
        max_grad_norm: gradient clipping norm (<= 0: no clipping).
        mixed_precision: "auto" (bf16 autocast on GPU, off on CPU), "bf16" or "no".
        gradient_checkpointing: recompute the transformer blocks in backward (less memory, more time).
        attention_backend: the kernel of every attention layer (diffusers' attention dispatcher): "native"
            (PyTorch SDPA), "flash" (flash-attn 2), "_flash_3", "flash_hub" or "sage" (tmd_train/models/attention.py).
        seed: seed of the initialisation, the data order and every random draw.
        cpu_threads: torch CPU threads on CPU runs (0: torch's default; 1 is often fastest on a busy machine).
        output_dir: the run folder (config, metrics, checkpoints, the final student/).
        checkpoint_every: steps between checkpoints (and one at the last step).
        keep_last: checkpoints kept (older ones are deleted).
        log_every: steps between metric rows (and one at the last step).
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
    attention_backend: str = "native"
    seed: int = 0
    cpu_threads: int = 0

    output_dir: str = "runs/train"
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first bad shared field."""
        if self.teacher is None:
            raise ConfigError("teacher is required: a Wan2.1 diffusers folder or a WanTransformer3DModel config")
        if isinstance(self.teacher, str) and not self.teacher:
            raise ConfigError("teacher must not be empty")
        if not self.data:
            raise ConfigError("data must be 'shapes', 'synthetic' or a dataset folder")
        check_fields(self, choices={"mixed_precision": MIXED_PRECISIONS,
                                    "attention_backend": tuple(ATTENTION_BACKENDS)},
                     positive=("batch_size", "steps", "checkpoint_every", "keep_last", "log_every",
                               "synthetic_samples", "synthetic_text_len"),
                     non_negative=("num_workers", "seed", "cpu_threads"))
        if min(self.synthetic_latent_size) < 1:
            raise ConfigError(f"synthetic_latent_size must be positive, got {self.synthetic_latent_size}")
        check_learning_rates(self, ("lr",))
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps must be > 0, got {self.adam_eps}")
