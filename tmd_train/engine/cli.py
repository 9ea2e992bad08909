"""The command line every stage shares::

    python -m tmd_train.<stage> [--config cfg.yaml] [key=value ...] [--resume latest|DIR]
                                [--overwrite] [--allow-config-change] [--debug]

Where the values come from (later wins):

1. ``--config cfg.yaml`` given: the config class's defaults, the file, the overrides.
2. No ``--config`` and no ``teacher`` override (``teacher=`` or ``teacher.<key>=``): the toy world
   (:func:`tmd_train.toy.toy_defaults`: the shipped toy teacher, ``data=shapes``, and the stage's small
   toy settings), then the overrides — ``python -m tmd_train.stage1 steps=10`` trains the toy world
   for 10 steps.
3. No ``--config`` but a ``teacher`` override: the config class's defaults and the overrides; none of
   the toy settings (sized for the toy teacher) leak into a run of another teacher.

Before any model is loaded, :func:`check_run_paths` checks the paths the config names (the output
folder, the teacher, the datasets, ``--resume DIR``), so a typo fails in a second, not after minutes of
loading. Every problem is a :class:`~tmd_train.errors.UserError` (one line under
:func:`~tmd_train.errors.run_main`). ``--help`` lists every config key with its default and meaning
(:func:`~tmd_train.engine.config.config_key_table`).
"""
from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArgumentParser, DataError, MissingFileError, check_output_dir, named
from .config import config_from_dict, config_key_table, load_config, override_text, parse_overrides

BUILTIN_DATA = ("shapes", "synthetic")


@dataclass
class StageArgs:
    """A parsed stage command line.

    Attributes:
        config: the validated config.
        resume: ``--resume`` (``"latest"``, a checkpoint folder, or None).
        overwrite: ``--overwrite`` (a fresh run may replace the run in ``output_dir``).
        allow_config_change: ``--allow-config-change`` (resume with a changed config).
        source: where the config came from, for the start line (``"cfg.yaml + 2 overrides"``).
    """

    config: Any
    resume: str | None
    overwrite: bool
    allow_config_change: bool
    source: str


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def keys_help(config_cls: type, toy: Mapping[str, Any] | None = None, width: int = 100) -> str:
    """The ``--help`` text of the config keys: ``key = default  meaning`` per key (from
    :func:`~tmd_train.engine.config.config_key_table`), then the toy world's values."""
    rows = config_key_table(config_cls)
    key_w = min(max(len(k) + len(d) + 3 for k, d, _ in rows), 44)
    lines = [f"config keys of {config_cls.__name__} (key=value; sub-config keys as <field>.<key>; "
             "values are YAML):"]
    for key, default, meaning in rows:
        head = f"  {key} = {default}"
        if len(head) > key_w + 1:
            lines.append(head)
            head = ""
        wrapped = textwrap.wrap(meaning, width=max(width - key_w - 3, 30)) or [""]
        lines.append(f"{head:<{key_w + 2}} {wrapped[0]}".rstrip())
        lines += [f"{'':<{key_w + 2}} {w}" for w in wrapped[1:]]
    if toy is not None:
        toy_text = " ".join(f"{k}={override_text(v)}" for k, v in toy.items())
        lines += ["", "without --config and without a teacher= override, the toy world's values come first "
                  "(overrides apply on top):", *textwrap.wrap(toy_text, width=width, initial_indent="  ",
                                                            subsequent_indent="  ")]
    return "\n".join(lines)


def _toy_base(toy_values: Callable[[], dict[str, Any]], name: str, usage: str) -> dict[str, Any]:
    try:
        return toy_values()
    except FileNotFoundError as e:
        raise MissingFileError(
            f"no --config and no teacher= given, and no toy world: {e}; usage: python -m tmd_train.{name} "
            f"teacher=<Wan2.1 folder> data=<dataset folder> {usage}[key=value ...]") from None


def _toy_help_values(toy_values: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return toy_values()
    except FileNotFoundError:
        return None


def _sets_key(overrides: Mapping[str, Any], field: str) -> bool:
    return any(k == field or k.startswith(field + ".") for k in overrides)


def parse_stage_args(name: str, config_cls: type, toy_values: Callable[[], dict[str, Any]], description: str,
                     argv: Sequence[str] | None = None, usage: str = "") -> StageArgs:
    """Parse a stage's command line (module docstring); the config is loaded and validated.

    Args:
        name: the stage module (``"stage1"``), for messages.
        config_cls: the stage's config dataclass.
        toy_values: the toy world's values of this stage (raises FileNotFoundError, saying what to
            pass, when the toy teacher is not there).
        description: the first line of ``--help``.
        usage: extra usage words for the error without a toy world (``"[method=tm_meanflow|tm] "``).

    Raises:
        UserError: a bad option, key or value, a missing or unreadable config file, no toy world
            where one is needed.
    """
    prog = f"python -m tmd_train.{name}"
    parser = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=keys_help(config_cls, _toy_help_values(toy_values)))
    parser.add_argument("--config", help=f"YAML file with {config_cls.__name__} keys (the toy world's values are "
                                         "not used then)")
    parser.add_argument("--resume", metavar="latest|DIR",
                        help="'latest' (newest checkpoint in output_dir, if any) or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="a fresh run may replace the earlier run in output_dir")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config changed in a way that alters the model or the data order "
                             "(the change is recorded)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)")
    args = parser.parse_intermixed_args(argv)       # options may come between the overrides
    overrides = parse_overrides(args.overrides)
    n = _plural(len(overrides), "override")
    if args.config is not None:
        cfg = load_config(config_cls, args.config, args.overrides)
        source = f"{args.config} + {n}"
    elif _sets_key(overrides, "teacher"):
        cfg = load_config(config_cls, None, args.overrides)
        source = f"defaults + {n} (teacher given: no toy values)"
    else:
        values = _toy_base(toy_values, name, usage)
        for field, value in overrides.items():      # a whole sub-config replaces the toy's dotted keys
            if "." not in field and isinstance(value, Mapping):
                values = {k: v for k, v in values.items() if not k.startswith(field + ".")}
        values.update(overrides)
        cfg = config_from_dict(config_cls, values)
        source = f"toy default + {n}"
    return StageArgs(config=cfg, resume=args.resume, overwrite=args.overwrite,
                     allow_config_change=args.allow_config_change, source=source)


def check_teacher_folder(teacher: str, key: str = "teacher") -> None:
    """MissingFileError unless ``teacher`` is a Wan2.1 diffusers folder (``transformer/config.json``) or
    a transformer folder (``config.json``)."""
    path = Path(teacher)
    name, hint = named(key, teacher), named(key, "<a Wan2.1 diffusers folder or its transformer/ folder>")
    if not path.exists():
        raise MissingFileError(f"{name}: no such folder; pass {hint}")
    if not path.is_dir():
        raise MissingFileError(f"{name} is a file; pass {hint}")
    if not ((path / "transformer" / "config.json").is_file() or (path / "config.json").is_file()):
        raise MissingFileError(f"{name} holds neither transformer/config.json nor config.json; pass {hint}")


def check_dataset(folder: str, key: str, kind: str) -> None:
    """MissingFileError / DataError unless ``folder`` is a dataset of ``kind`` (reads its index only)."""
    from ..data.format import read_index

    if not Path(folder).exists():
        raise MissingFileError(f"{named(key, folder)}: no such dataset folder")
    index = read_index(folder)
    if index["kind"] != kind and not (kind == "kd" and "noise" in index["tensors"]):  # prepare synthetic: both
        hint = {"latents": " (a 'kd' dataset goes to kd_pairs=)",
                "kd": " (write one with python -m tmd_train.kd_pairs)"}.get(kind, "")
        raise DataError(f"{named(key, folder)} holds {index['kind']!r} samples; {key} needs a {kind!r} "
                        f"dataset{hint}")


def check_run_paths(cfg: Any, resume: str | None = None) -> None:
    """The paths a training config names, checked before any model is loaded: ``output_dir`` (a folder
    or creatable), ``teacher`` (a folder with a transformer config), ``data`` and ``kd_pairs`` (dataset
    folders of the right kind), ``init_student`` (a folder), ``--resume DIR`` (a folder)."""
    check_output_dir(cfg.output_dir)
    if isinstance(cfg.teacher, str):
        check_teacher_folder(cfg.teacher)
    if cfg.data not in BUILTIN_DATA:
        if not Path(cfg.data).exists():
            raise MissingFileError(f"data={cfg.data}: no such dataset folder; pass data=shapes, data=synthetic "
                                   "or a dataset folder (python -m tmd_train.toy.clips --out DIR --n N writes one)")
        check_dataset(cfg.data, "data", "latents")
    init_student = getattr(cfg, "init_student", None)
    if init_student is not None and not Path(init_student).is_dir():
        raise MissingFileError(f"init_student={init_student}: no such folder; pass the student/ folder of a "
                               "stage-1 run (or leave init_student out to start from the teacher)")
    kd_pairs = getattr(cfg, "kd_pairs", None)
    if kd_pairs:
        check_dataset(kd_pairs, "kd_pairs", "kd")
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise MissingFileError(f"--resume {resume}: no such checkpoint folder; pass --resume latest or a "
                               "checkpoint-NNNNNNN folder of the run")


def is_main_process() -> bool:
    """Whether this is the main process (``RANK`` unset or 0: before any process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def start_line(name: str, args: StageArgs) -> str:
    """The line a stage prints first: config source, output folder, method and world size."""
    cfg = args.config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resume = f"; resume {args.resume}" if args.resume else ""
    return (f"{name}: config {args.source}; output_dir {cfg.output_dir}; method {cfg.method}; "
            f"world size {world}{resume}")


def announce(name: str, args: StageArgs) -> None:
    """Print :func:`start_line` on the main process."""
    if is_main_process():
        print(start_line(name, args), flush=True)


__all__ = ["StageArgs", "announce", "check_dataset", "check_run_paths", "check_teacher_folder", "keys_help",
           "parse_stage_args", "start_line"]
