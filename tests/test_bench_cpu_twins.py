"""bench/bench_cpu_twins.py: ``--processes N`` runs the benchmark in N fresh processes and reports each cell's
median with the range of the compile ratio over them; ``--malloc steady`` fixes glibc's heap thresholds."""
from __future__ import annotations

import re
import subprocess
import sys

from support.run import ROOT

BENCH = ROOT / "bench"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench_cpu_twins.py", *args], cwd=BENCH, capture_output=True, text=True,
                          timeout=600)


def test_median_over_processes():
    proc = _run("--small", "--reps", "3", "--threads", "1", "--ops", "flow_step", "--dtypes", "fp32",
                "--processes", "2", "--stat", "min")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1/2" in proc.stdout and "process 2/2" in proc.stdout
    assert "median over 2 processes" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1x64x48 fp32")]
    assert len(rows) == 2, proc.stdout
    for line in rows:  # "x compile" cell: median ratio, then (min–max) over the two processes
        m = re.search(r"\| ([0-9.]+) \(([0-9.]+)–([0-9.]+)\) \|$", line)
        assert m, line
        lo, mid, hi = float(m[2]), float(m[1]), float(m[3])
        assert 0 < lo <= hi and lo - 0.01 <= mid <= hi + 0.01


def test_bad_processes_and_steady_malloc():
    proc = _run("--processes", "0")
    assert proc.returncode == 2 and "--processes must be >= 1, got 0" in proc.stderr
    # in a child: mallopt changes the whole process's allocator
    code = "import common; print(common.steady_malloc())"
    child = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "True", child.stderr  # glibc; False elsewhere
