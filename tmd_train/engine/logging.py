"""Scalar logging (TensorBoard + ``metrics.jsonl``) and throughput."""
from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class ScalarLogger:
    """Main-process scalars: TensorBoard (``SummaryWriter`` in ``<output_dir>/logs``) and one JSON
    line per logged step in ``<output_dir>/metrics.jsonl``. Other processes log nothing."""

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # drop lines of an interrupted run beyond the step we resume from
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.writer = SummaryWriter(str(Path(output_dir) / "logs"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The rows of ``<output_dir>/metrics.jsonl``."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


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
