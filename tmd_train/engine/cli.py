"""The command line every stage shares: ``[--config cfg.yaml] [key=value ...] [--resume latest|DIR]``."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from .config import load_config


def parse_stage_args(name: str, config_cls: type, default_config: Callable[[], Any], description: str,
                     argv: Sequence[str] | None = None, usage: str = "") -> tuple[Any, str | None]:
    """Parse ``[--config cfg.yaml] [key=value ...] [--resume latest|DIR]`` (dotted keys reach
    sub-configs: ``objective.cfg_scale=3``).

    With neither ``--config`` nor overrides the stage's ``default_config()`` (the toy world) is used;
    if it raises FileNotFoundError the process exits with status 2 and a message saying what to pass.
    Returns ``(config, resume)``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tmd_train.{name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file with {config_cls.__name__} fields")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in output_dir, if any) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)")
    args = parser.parse_args(argv)
    if args.config is None and not args.overrides:
        try:
            return default_config(), args.resume
        except FileNotFoundError as e:
            parser.exit(2, f"{name}: no arguments and no toy world: {e}\n"
                           f"usage: python -m tmd_train.{name} teacher=<Wan2.1 folder> data=<dataset folder> "
                           f"{usage}[key=value ...]\n")
    return load_config(config_cls, args.config, args.overrides), args.resume
