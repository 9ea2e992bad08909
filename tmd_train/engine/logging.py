"""Scalar logging (TensorBoard + ``metrics.jsonl``), throughput, and the one-line warnings of the run.

``metrics.jsonl`` is strict JSON, one object per logged step: a non-finite value (NaN, ±Inf, e.g. the
loss of a skipped step) is written as ``null``. Reading it tolerates a torn last line (a process killed
mid-write): the line is dropped with a warning; a bad line anywhere else is an error naming the file
and line.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError

METRICS_FILE = "metrics.jsonl"


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr (the counterpart of the CLIs' ``error: …`` line)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±Inf) replaced by None, recursively, so that
    ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def metrics_line(step: int, scalars: dict[str, float]) -> str:
    """One ``metrics.jsonl`` line (with its newline): ``{"step": step, **scalars}``, non-finite -> null."""
    return json.dumps(strict_json({"step": step, **scalars}), allow_nan=False) + "\n"


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file. A last line that is not valid JSON (torn by a kill
    mid-write) is dropped with a warning.

    Raises:
        UserError: a bad line before the last, or a row without an integer ``step`` (names the file and line).
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == last:
                warn(f"{path}: dropped the torn last line {i + 1} (not valid JSON: {e.msg}): {ln[:80]!r}")
                continue
            raise UserError(f"{path}, line {i + 1}: not valid JSON ({e.msg}): {ln[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(f"{path}, line {i + 1}: not a metrics row (an object with an integer 'step'): "
                            f"{ln[:80]!r}")
        rows.append(row)
    return rows


class ScalarLogger:
    """Main-process scalars: TensorBoard (``SummaryWriter`` in ``<output_dir>/logs``) and one JSON
    line per logged step in ``<output_dir>/metrics.jsonl``. Other processes log nothing.

    On resume (``resume_step`` > 0) the rows past ``resume_step`` (an interrupted run's) and a torn
    last line are dropped; the file is rewritten atomically."""

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [row for row in read_metrics_file(self.path) if row["step"] <= resume_step]
            tmp = self.path.with_name(f".tmp-{METRICS_FILE}")
            tmp.write_text("".join(metrics_line(row["step"], {k: v for k, v in row.items() if k != "step"})
                                   for row in kept))
            os.replace(tmp, self.path)
        self.writer = SummaryWriter(str(Path(output_dir) / "logs"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        with self.path.open("a") as f:
            f.write(metrics_line(step, scalars))

    def close(self) -> None:
        """Flush and close TensorBoard; a failure to (e.g. a full disk) is a warning, so that it never
        hides the error that ended a run (``metrics.jsonl`` is the run's record)."""
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                warn(f"could not finish the TensorBoard logs in {self.path.parent / 'logs'}: {e}")
            self.writer = None


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<output_dir>/metrics.jsonl`` (non-finite values logged as None; a torn last
    line dropped with a warning)."""
    return read_metrics_file(Path(output_dir) / METRICS_FILE)


class Throughput:
    """Samples per second between calls of :meth:`rate`."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.samples / max(now - self.t, 1e-9)
        self.t, self.samples = now, 0
        return r
