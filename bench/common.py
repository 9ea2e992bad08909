"""Shared benchmark harness: timing (CUDA events on a GPU, perf_counter on CPU), the measured
copy-bandwidth peak, the table, and `--save` to bench/results/*.json.

A benchmark defines, per case, one bytes (or FLOP) model shared by every provider, and a dict of
providers (``tmd``, ``eager`` = tmd_ext.reference, ``compile`` = torch.compile of the reference),
each a zero-argument callable. Ratios are ``provider_ms / tmd_ms`` (> 1: tmd is faster).

On CUDA each provider is, where it can be, captured in a CUDA graph and its replays are timed (so
a case made of many small launches is not timed as CPU dispatch); the L2 is flushed before each
repetition by *reading* a buffer twice its size (a write would leave dirty lines that drain inside
the timed window); the profiler's summed kernel time per call is reported next to the event time.
``compiled(fn)`` is a fresh ``torch.compile(fn, dynamic=False)`` after a dynamo reset: build one per
case and grad mode, so that no provider is a dynamic-shape graph compiled for another case.

On CPU, ``steady_malloc()`` stops glibc from handing freed heap memory back to the kernel between
calls: by default it trims the heap top and moves its mmap threshold as tensors come and go, so a
call whose outputs land on trimmed pages pays one page fault (and a zero fill) per 4 KiB, and how
many depends on the order of every earlier allocation, a provider's kernel time not at all (fwd+bwd
of adaln_modulate at 1x1024x1536 fp32: 150 to 1600 faults a call from one process to the next).
"""
from __future__ import annotations

import argparse
import ctypes
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


def steady_malloc() -> bool:
    """Fix glibc's trim and mmap thresholds at 1 GiB for this process (``mallopt``), so that freed
    tensors stay mapped and the next call reuses them without page faults (the allocator setting
    PyTorch's CPU tuning guides recommend, done in-process). True when set; False where the C
    library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 1 << 30))


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


_FLUSH: dict[str, torch.Tensor] = {}


def flush_l2(device: str) -> None:
    """Evicts the L2 by reading a buffer of twice its size (reads only: no dirty lines are left to be
    written back inside the next timed window)."""
    if device not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 1024 * 1024
        _FLUSH[device] = torch.ones(max(2 * l2, 32 * 1024 * 1024) // 4, dtype=torch.float32, device=device)
    _FLUSH[device].sum()


def capture_graph(fn: Callable[[], object], device: str) -> torch.cuda.CUDAGraph | None:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream), or None when it cannot be
    captured (a host sync, a CPU tensor, an op that refuses capture)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize(device)
        return graph
    except Exception:  # noqa: BLE001 - any failure means: time it eagerly
        torch.cuda.synchronize(device)
        return None


def kernel_ms(fn: Callable[[], object], device: str, reps: int = 5) -> float | None:
    """Summed device (kernel) time per call of ``fn`` from the profiler, in ms, or None if the
    profiler gives none."""
    try:
        from torch.profiler import ProfilerActivity, profile

        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            sync(device)
        total_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
        return total_us / reps / 1e3 if total_us > 0 else None
    except Exception:  # noqa: BLE001 - the profiler is optional
        return None


def _event_median_ms(run: Callable[[], object], device: str, reps: int) -> float:
    """Median CUDA-event time of ``run`` over ``reps`` calls, the L2 flushed by reading before each one."""
    times = []
    for _ in range(reps):
        flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cuda(fn: Callable[[], object], device: str, reps: int | None = None, warmup: int = 3,
              graph: bool = True) -> dict:
    """``{"ms", "graph", "kernel_ms"}``: median event time of ``fn`` (of its CUDA-graph replay when
    ``graph`` and it can be captured), L2 flushed by reading before each repetition, and the
    profiler's kernel time per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    g = capture_graph(fn, device) if graph else None
    ms = _event_median_ms(g.replay if g is not None else fn, device, reps or 50)
    return {"ms": ms, "graph": g is not None, "kernel_ms": kernel_ms(fn, device)}


def time_ms(fn: Callable[[], object], device: str, reps: int | None = None, warmup: int = 3,
            graph: bool = False) -> float:
    """Median wall time of `fn` in milliseconds. On CUDA, CUDA events around each call (of its
    graph replay with ``graph=True``, see :func:`time_cuda`); the L2 is flushed between calls so a
    memory-bound kernel is not timed from cache."""
    if device.startswith("cuda"):
        if graph:
            return time_cuda(fn, device, reps, warmup, graph=True)["ms"]
        for _ in range(warmup):
            fn()
        sync(device)
        return _event_median_ms(fn, device, reps or 50)
    for _ in range(warmup):
        fn()
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


def compiled(fn: Callable, mode: str | None = None) -> Callable:
    """A fresh ``torch.compile(fn, dynamic=False)`` (dynamo reset first, so no graph or guard of an
    earlier case is reused and no dynamic-shape recompilation weakens the baseline)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, mode=mode)


def maybe_compile(fn: Callable, enabled: bool, mode: str | None = None) -> Callable | None:
    """``compiled(fn)`` when ``enabled``, else None; call it once per case and grad mode."""
    if not enabled:
        return None
    return compiled(fn, mode)


@dataclass
class Table:
    """Rows of (case, provider) with ms and throughput, printed and saved together."""

    name: str
    device: str
    unit: str = "GB/s"  # or "TFLOP/s"
    rows: list[dict] = field(default_factory=list)

    def add_case(self, case: str, work: float, providers: dict[str, Callable[[], object] | None],
                 reps: int | None = None) -> None:
        """Times every provider of one case. `work` is bytes (GB/s tables) or FLOPs (TFLOP/s).
        On CUDA also records whether the provider ran as a CUDA graph and its profiler kernel time."""
        ms, info = {}, {}
        for name, fn in providers.items():
            if fn is None:
                continue
            if self.device.startswith("cuda"):
                info[name] = time_cuda(fn, self.device, reps)
                ms[name] = info[name]["ms"]
            else:
                ms[name] = time_ms(fn, self.device, reps)
        peak = copy_bandwidth_gbs(self.device) if self.unit == "GB/s" else None
        for name, t in ms.items():
            thr = work / t / 1e6 if self.unit == "GB/s" else work / t / 1e9
            row = {"case": case, "provider": name, "ms": t, self.unit: thr,
                   "vs_eager": ms["eager"] / t if "eager" in ms else None,
                   "vs_compile": ms["compile"] / t if "compile" in ms else None}
            if name in info:
                row["graph"] = info[name]["graph"]
                row["kernel_ms"] = info[name]["kernel_ms"]
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
