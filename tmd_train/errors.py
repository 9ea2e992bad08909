"""User errors and the command-line convention every ``python -m tmd_train.…`` entry point follows.

A :class:`UserError` is a mistake the user can fix (a bad config key or value, a missing or wrong file,
an output folder that is in use, a bad dataset or device); its message says what, where and what to
do. :func:`run_main` runs a CLI's ``main``: a user error prints one line ``error: <message>`` on stderr
and exits with status 2; anything else is a bug and keeps its traceback. ``--debug`` anywhere on the
command line keeps the traceback of user errors too. :class:`ArgumentParser` turns argparse's usage
errors into user errors; :func:`check_output_dir` and :func:`check_device` check an output path and a
``--device`` before any work starts.

The subclasses are also the built-in exception a library caller would expect (a :class:`ConfigError`
is a ``ValueError``, a :class:`MissingFileError` a ``FileNotFoundError``, …), so code that catches
those keeps working.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake of the user's, reported as one line (``error: …``, exit status 2) by :func:`run_main`."""


class ConfigError(UserError, ValueError):
    """A bad config file, key or value (a ValueError too, for callers that catch those)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it must be."""


class DataError(UserError, ValueError):
    """A dataset that is damaged, of the wrong kind, or does not fit the model it is used with."""


class OutputError(UserError, OSError):
    """An output path that cannot be used: a file where a folder is needed, an existing output that
    would be replaced without ``--overwrite``, a folder that cannot be written."""


EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are :class:`~tmd_train.errors.UserError`\\ s
    (one line ``error: …``, exit 2 under :func:`run_main`) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def named(key: str, value: Any) -> str:
    """``key=value`` for a config key, ``--opt value`` for a command-line option."""
    return f"{key} {value}" if key.startswith("-") else f"{key}={value}"


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output_dir: str | os.PathLike, key: str = "output_dir") -> None:
    """OutputError unless ``output_dir`` is a folder or can be created as one (nothing in the way is
    a file, the nearest existing folder is writable)."""
    out = Path(output_dir)
    name = named(key, out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{name} is a file, not a folder: pass {named(key, '<a folder>')}")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise OutputError(f"{name}: {base} is a file, so the folder cannot be created; pass another {key}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{name}: {base} is not writable; pass a {key} you can write to")


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]``; ``--debug`` is removed from it) under the
    convention above; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR


def one_line(message: str) -> str:
    """``message`` on one line (line breaks become ``"; "``)."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def check_device(device: str) -> Any:
    """``torch.device(device)`` if this machine has it; a :class:`UserError` saying what is available
    otherwise (``"cuda"`` without a GPU, ``"cuda:3"`` on a 2-GPU machine, a misspelt name)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {device!r} is not a device ({e}); use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: only 'cpu' and 'cuda[:N]' are supported")
    return dev
