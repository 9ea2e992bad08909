"""Shared benchmark harness: timing (CUDA events on a GPU, perf_counter on CPU), the measured
copy-bandwidth peak, the table, and `--save` to bench/results/*.json.

A benchmark defines, per case, one bytes (or FLOP) model shared by every provider, and a dict of
providers (``tmd``, ``eager`` = tmd_ext.reference, ``compile`` = torch.compile of the reference),
each a zero-argument callable. Ratios are ``provider_ms / tmd_ms`` (> 1: tmd is faster).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small sizes (CPU demo / CI)")
    p.add_argument("--dtypes", default=None, help="comma list, e.g. bf16,fp32")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per provider")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--save", action="store_true", help="write bench/results/<name>-<device>-<date>.json")
    return p


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def dtypes_from(arg: str | None, default: list[str]) -> list[torch.dtype]:
    return [DTYPE_NAMES[n] for n in (arg.split(",") if arg else default)]


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[dt]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int | None = None, warmup: int = 3) -> float:
    """Median wall time of `fn` in milliseconds. On CUDA, CUDA events around each call; the L2 is
    flushed between calls so a memory-bound kernel is not timed from cache."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)
        reps = reps or 50
        times = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    reps = reps or 10
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_PEAK: dict[str, float] = {}


def copy_bandwidth_gbs(device: str) -> float:
    """Measured peak: GB/s of a large device copy (read + write counted), the ceiling a
    memory-bound kernel is judged against."""
    if device not in _PEAK:
        n = (512 if device.startswith("cuda") else 64) * 1024 * 1024 // 4
        a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
        b = torch.empty_like(a)
        ms = time_ms(lambda: b.copy_(a), device, reps=20)
        _PEAK[device] = 2 * a.numel() * 4 / ms / 1e6
    return _PEAK[device]


def fwd_bwd(fn: Callable, inputs: tuple, leaves: list[torch.Tensor], grad_out) -> Callable[[], None]:
    """A provider timing one forward and backward: ``fn(*inputs)``, then the gradients of its
    output(s) w.r.t. ``leaves`` for the upstream gradient(s) ``grad_out``."""
    def run() -> None:
        torch.autograd.grad(fn(*inputs), leaves, grad_out)
    return run


def maybe_compile(fn: Callable, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    return torch.compile(fn)


@dataclass
class Table:
    """Rows of (case, provider) with ms and throughput, printed and saved together."""

    name: str
    device: str
    unit: str = "GB/s"  # or "TFLOP/s"
    rows: list[dict] = field(default_factory=list)

    def add_case(self, case: str, work: float, providers: dict[str, Callable[[], object] | None],
                 reps: int | None = None) -> None:
        """Times every provider of one case. `work` is bytes (GB/s tables) or FLOPs (TFLOP/s)."""
        ms = {}
        for name, fn in providers.items():
            if fn is not None:
                ms[name] = time_ms(fn, self.device, reps)
        peak = copy_bandwidth_gbs(self.device) if self.unit == "GB/s" else None
        for name, t in ms.items():
            thr = work / t / 1e6 if self.unit == "GB/s" else work / t / 1e9
            row = {"case": case, "provider": name, "ms": t, self.unit: thr,
                   "vs_eager": ms["eager"] / t if "eager" in ms else None,
                   "vs_compile": ms["compile"] / t if "compile" in ms else None}
            if peak is not None:
                row["pct_peak"] = 100 * thr / peak
            self.rows.append(row)

    def print(self) -> None:
        dev = device_name(self.device)
        extra = f"; measured copy peak {copy_bandwidth_gbs(self.device):.0f} GB/s" if self.unit == "GB/s" else ""
        print(f"\n{self.name} on {dev}{extra}")
        hdr = f"{'case':<34} {'provider':<9} {'ms':>9} {self.unit:>9} {'%peak':>6} {'x eager':>8} {'x compile':>9}"
        print(hdr)
        print("-" * len(hdr))
        for r in self.rows:
            pct = f"{r['pct_peak']:.0f}" if r.get("pct_peak") is not None else "-"
            ve = f"{r['vs_eager']:.2f}" if r["vs_eager"] is not None else "-"
            vc = f"{r['vs_compile']:.2f}" if r["vs_compile"] is not None else "-"
            print(f"{r['case']:<34} {r['provider']:<9} {r['ms']:>9.3f} {r[self.unit]:>9.2f} {pct:>6} {ve:>8} {vc:>9}")
        sys.stdout.flush()

    def save(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc)
        tag = "cuda" if self.device.startswith("cuda") else "cpu"
        path = RESULTS / f"{self.name}-{tag}-{now:%Y%m%d}.json"
        import tmd_ext

        path.write_text(json.dumps({
            "bench": self.name, "device": device_name(self.device), "torch": torch.__version__,
            "date": now.isoformat(timespec="seconds"), "build_info": tmd_ext.build_info(),
            "unit": self.unit,
            "copy_peak_gbs": copy_bandwidth_gbs(self.device) if self.unit == "GB/s" else None,
            "rows": self.rows,
        }, indent=1))
        print(f"saved {path}")
        return path
