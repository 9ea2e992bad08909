"""Subprocess runners shared by the tests: ``python -m <module>`` CLIs and 2-process ``torchrun``.

Both run with the repository on ``PYTHONPATH`` (so an in-place build is found), one OpenMP
thread per process, and return the ``CompletedProcess`` (stdout/stderr captured as text).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one, the repository first on PYTHONPATH, 1 thread."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def run_module(module: str, args: Sequence[str], cwd: str | Path, timeout: float = 300,
               **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` in ``cwd``."""
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(target: Sequence[str], cwd: str | Path, nproc: int = 2,
             before_retry: Callable[[], None] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc target...`` (``target``: a script and its
    arguments, or ``["-m", module, ...]``).

    Runs it once more if a worker died of SIGSEGV inside torch (seen about once in ten CI runs, in
    gloo's state-dict gather on a loaded 2-core machine; never a Python error), after calling
    ``before_retry`` (e.g. to remove the partial output). Any other failure, or a second crash,
    is returned as it is, for the test to fail on."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]
    proc = subprocess.run(cmd, env=env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "(SIGSEGV)" in proc.stderr:
        print("torchrun worker crashed with SIGSEGV; retrying once:\n" + proc.stderr[-2000:])
        if before_retry is not None:
            before_retry()
        proc = subprocess.run(cmd, env=env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc


def output(proc: subprocess.CompletedProcess) -> str:
    """The tails of a finished process's stdout and stderr, for assertion messages."""
    return proc.stdout[-3000:] + proc.stderr[-6000:]
