"""The CPU kernels of every op against the eager reference and ``torch.compile`` of the reference, at
one token shape shared by all ops (default ``1x1024x1536``; ``gated_fusion_linear`` at
``1x1024x512x512``, its GEMM being the cost), in bf16 and fp32, forward and forward+backward, under
each thread count of ``--threads``. It reuses each op benchmark's ``add_cases`` (bench/bench_<op>.py),
so the bytes models and providers are those of the op benchmarks. ``--save`` writes
``bench/results/cpu-twins-<malloc>-malloc-<date>.json`` and a Markdown table next to it, with the machine, the
thread counts, the load average before and after each run and the torch version.

On a shared machine the medians move with the load (a call preempted by another process waits a
whole scheduler slice): ``--stat min`` reports the fastest of ``--reps`` calls instead, the time of
a call that ran undisturbed, and ``--clock cpu`` the CPU time of the calling thread (meaningful with
one thread only). Read the load columns.

``--malloc steady`` (the default) fixes glibc's heap thresholds first (``common.steady_malloc``): with
the system default, the page faults of freshly trimmed heap pages, which vary from process to process
with the order of earlier allocations, dominate fwd+bwd at these sizes (e.g. adaln_modulate fp32:
150-1600 faults a call). ``--malloc system`` measures the default; the JSON records which.

``--processes N`` runs the whole benchmark in N fresh processes, one after another, and reports each cell's
median time over them (the JSON keeps every process's rows; the Markdown gives the range of the ratios):
the same cell moves by up to ±30 % from one process to the next on an idle machine (where a process's
buffers land), so one process's fastest call is not a measurement."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_adaln_modulate
import bench_flow_step
import bench_gated_fusion
import bench_gated_fusion_linear
import bench_meanflow_fd_loss
import common
import torch
from common import RESULTS, Table, dtypes_from, parser

import tmd_ext

OPS = {
    "adaln_modulate": bench_adaln_modulate.add_cases,
    "flow_step": bench_flow_step.add_cases,
    "gated_fusion": bench_gated_fusion.add_cases,
    "gated_fusion_linear": bench_gated_fusion_linear.add_cases,
    "meanflow_fd_loss": bench_meanflow_fd_loss.add_cases,
}


def shape_of(op: str, small: bool) -> tuple[int, ...]:
    if op == "gated_fusion_linear":
        return (1, 64, 48, 40) if small else (1, 1024, 512, 512)
    return (1, 64, 48) if small else (1, 1024, 1536)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(result: dict) -> str:
    lines = [f"# CPU kernels vs eager and torch.compile ({result['date']})", "",
             f"{result['cpu']}, {os.cpu_count()} logical CPUs; torch {result['torch']}; "
             f"tmd_ext build {json.dumps(result['build_info'])}", "",
             f"ms: {result['stat']} {result['clock']} time of {result['reps']} calls, "
             f"malloc {result.get('malloc', 'system')}; "
             + (f"median over {result['processes']} processes (x compile: range over them in brackets); "
                if result.get("processes", 1) > 1 else "")
             + "x eager / x compile: provider time over tmd time (> 1: tmd faster); "
             "load: 1-minute load average before / after the run.", ""]
    for run in result["runs"]:
        lines += [f"## {run['threads']} thread(s), op {run['op']}, load {run['load_before']:.2f} / "
                  f"{run['load_after']:.2f}", "",
                  "| case | tmd ms | eager ms | compile ms | x eager | x compile |", "|---|---|---|---|---|---|"]
        by_case: dict[str, dict[str, float]] = {}
        for r in run["rows"]:
            by_case.setdefault(r["case"], {})[r["provider"]] = r["ms"]
        spread = run.get("compile_ratio_range", {})
        for case, ms in by_case.items():
            t, e, c = ms.get("tmd"), ms.get("eager"), ms.get("compile")
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
            ratio = lambda v: f"{v / t:.2f}" if v is not None and t else "-"  # noqa: E731
            rng = f" ({spread[case][0]:.2f}–{spread[case][1]:.2f})" if case in spread else ""
            lines.append(f"| {case} | {fmt(t)} | {fmt(e)} | {fmt(c)} | {ratio(e)} | {ratio(c)}{rng} |")
        lines.append("")
    return "\n".join(lines)


def timer(stat: str, clock: str):
    """A CPU replacement of common.time_ms: ``stat`` (median or min) of ``reps`` calls on ``clock``
    (wall: perf_counter; cpu: thread_time of the calling thread)."""
    now = time.thread_time if clock == "cpu" else time.perf_counter
    pick = min if stat == "min" else statistics.median

    def time_ms(fn, device, reps=None, warmup=3, graph=False) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps or 10):
            t0 = now()
            fn()
            times.append((now() - t0) * 1e3)
        return pick(times)
    return time_ms


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default: the current one)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list among " + ",".join(OPS))
    p.add_argument("--stat", choices=["median", "min"], default="median")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--malloc", choices=["steady", "system"], default="steady",
                   help="steady: fix glibc's trim/mmap thresholds (no page faults from heap trimming)")
    p.add_argument("--processes", type=int, default=1,
                   help="run in N fresh processes and report the median of each cell (see above)")
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)  # a child process's rows
    args = p.parse_args()
    if args.processes < 1:
        p.error(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1:
        return _over_processes(args)
    malloc = "steady" if args.malloc == "steady" and common.steady_malloc() else "system"
    common.time_ms = timer(args.stat, args.clock)
    if args.device != "cpu":
        print("bench_cpu_twins: CPU only (pass --device cpu); nothing to do on", args.device)
        return
    runs = []
    counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    for threads in counts:
        torch.set_num_threads(threads)
        for op in args.ops.split(","):
            table = Table(f"{op} ({threads} thread{'s' if threads > 1 else ''})", "cpu")
            load_before = os.getloadavg()[0]
            for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
                OPS[op](table, shape_of(op, args.small), dt, not args.no_compile, args.reps)
            load_after = os.getloadavg()[0]
            table.print()
            print(f"load average {load_before:.2f} -> {load_after:.2f}")
            runs.append({"op": op, "threads": threads, "load_before": load_before, "load_after": load_after,
                         "rows": table.rows})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"malloc": malloc, "runs": runs}))
    if args.save:
        _save(_result(args, malloc, runs))


def _result(args, malloc: str, runs: list[dict], processes: int = 1, per_process: list | None = None) -> dict:
    """The record that --save writes and markdown() formats."""
    result = {"bench": "cpu_twins", "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
              "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "build_info": tmd_ext.build_info(), "reps": args.reps or 10, "stat": args.stat,
              "clock": args.clock, "malloc": malloc, "processes": processes, "runs": runs}
    if per_process is not None:
        result["per_process"] = per_process
    return result


def _save(result: dict) -> None:
    now = _dt.datetime.fromisoformat(result["date"])
    malloc = result["malloc"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cpu-twins-{malloc}-malloc-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    print(f"saved {path} and {path.with_suffix('.md').name}")


def _over_processes(args) -> None:
    """--processes N: N children of this script (one process each), then the median of every cell."""
    argv = [a for a in sys.argv[1:] if a != "--save"]
    children = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = Path(tmp) / f"p{k}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--processes", "1", "--json-out", str(out)]
            print(f"process {k + 1}/{args.processes}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            children.append(json.loads(out.read_text()))
    runs = []
    for i, first in enumerate(children[0]["runs"]):
        rows, spread = [], {}
        for j, row in enumerate(first["rows"]):
            times = [child["runs"][i]["rows"][j]["ms"] for child in children]
            rows.append({**row, "ms": statistics.median(times), "ms_per_process": times})
        by_case: dict[str, dict[str, list[float]]] = {}
        for row in rows:
            by_case.setdefault(row["case"], {})[row["provider"]] = row["ms_per_process"]
        for case, ms in by_case.items():
            if "compile" in ms and "tmd" in ms:
                ratios = [c / t for c, t in zip(ms["compile"], ms["tmd"], strict=True)]
                spread[case] = (min(ratios), max(ratios))
        runs.append({**first, "rows": rows, "compile_ratio_range": spread,
                     "load_before": min(c["runs"][i]["load_before"] for c in children),
                     "load_after": max(c["runs"][i]["load_after"] for c in children)})
    result = _result(args, children[0]["malloc"], runs, args.processes, [c["runs"] for c in children])
    print(markdown(result))
    if args.save:
        _save(result)


if __name__ == "__main__":
    main()
