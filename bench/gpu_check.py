"""Everything that needs a GPU, in one command (``make gpu-check``), each part under its own time cap.

Parts, in order (each reports ``ok``, ``fail``, ``error`` or ``skipped: <why>``; one that would run
past its cap, or past the whole check's budget, stops and reports ``skipped: time`` for what is
left):

1. ``env``       device name, driver, CUDA and torch versions, the extension's build info.
2. ``build``     the in-place build of the extension for the visible arch (``setup.py build_ext
                 --inplace``), skipped when the last build of this script is of the same sources,
                 torch and arch (a stamp in ``build/``).
3. ``pytest``    ``pytest -m cuda`` (every CUDA test of the suite).
4. ``sanitizer`` ``compute-sanitizer`` memcheck and racecheck on one small case per kernel
                 (``--sanitize-case``: every op forward and backward, the CUTLASS path, a
                 FlowHeadLoop capture), when the tool exists.
5. ``ops``       the op benchmarks (bench/bench_*.py ``add_cases``) at Wan shapes — hidden 1536 and
                 5120, T = 32760 (B = 1) and 1024 (B = 2), bf16 and fp32 — against eager,
                 ``torch.compile`` and, for gated_fusion_linear, cuBLAS + a separate epilogue and the
                 bare GEMM; the most important cases first.
6. ``stage1``    one TM-MeanFlow training iteration (``train_step``) at Wan2.1-1.3B width and full
                 sequence length (latent 21×60×104, text 512), random weights: seconds per iteration
                 and peak memory; 30 layers, or fewer if the GPU cannot hold them (the row says how
                 many).
7. ``stage2``    the same for one TMD stage-2 generator iteration (teacher, generator, fake score,
                 discriminator).
8. ``sampler``   teacher (``--teacher-steps`` Euler steps × CFG) vs TMD N2H5 M = 2 (eager inner loop
                 and ``FlowHeadLoop``) at 1.3B size (480×832, 81 frames, L = 30): realised speedup ÷
                 NFE-ideal speedup (independent of the number of teacher steps timed, each costs the
                 same).

Everything goes to ``bench/results/gpu-check-<device>-<UTC time>.json`` (rewritten after every part,
so a crash keeps what was measured), then one summary table and a pass/fail line per goal:
memory-bound ops ≥ 90 % of the measured copy bandwidth, ≥ 1.0× ``torch.compile`` forward and ≥ 1.2×
forward+backward; gated_fusion_linear within 5 % of the bare cuBLAS GEMM (bf16 forward);
sampler ≥ 95 % of the NFE-ideal speedup; the CUDA tests and the sanitizer clean. The stage rows carry
the memory planner's estimate (``python -m tmd_train.plan``, docs/design.md §7) of the same iteration beside
the measured peak: planning a Wan-width model takes minutes of CPU, so the estimates are made beforehand on any
machine by ``python bench/gpu_check.py --plan-estimates`` into ``bench/results/plan-gpu-check.json`` (keyed by a
fingerprint of the stage's configuration; a stale entry is not used) — the dry run plans its toy model live.

``--dry`` runs the same code paths at toy sizes on whatever device there is (the CPU in CI): no
build, pytest only collects the CUDA tests, the sanitizer cases run without the tool, no
``torch.compile`` provider, a tiny Wan configuration for the stages and the sampler.

    python bench/gpu_check.py [--dry] [--budget S] [--parts ops,sampler] [--caps ops=200,...]
    python bench/gpu_check.py --plan-estimates [--plan-layers 30,15,8]     (CPU is enough)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("env", "build", "pytest", "sanitizer", "ops", "stage1", "stage2", "sampler")
# Seconds per part on a GPU (the whole check: --budget, 480 by default) and in a dry run.
CAPS = {"env": 30, "build": 300, "pytest": 75, "sanitizer": 90, "ops": 120, "stage1": 50, "stage2": 60,
        "sampler": 70}
# The dry run checks code paths, not speed: generous caps for a loaded CI machine.
DRY_CAPS = {"env": 60, "build": 1, "pytest": 120, "sanitizer": 60, "ops": 60, "stage1": 60, "stage2": 90,
            "sampler": 60}

# Wan2.1-T2V-1.3B (diffusers WanTransformer3DModel config); 480×832, 81 frames -> latent 21×60×104.
WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
WAN_LATENT = (21, 60, 104)
WAN_TEXT_LEN = 512
# The dry run's model: Wan's block structure at toy width.
TOY = {
    "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
    "out_channels": 4, "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 6,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64,
}
TOY_LATENT = (1, 4, 4)
TOY_TEXT_LEN = 3

GOAL_COPY_PCT = 90.0
GOAL_VS_COMPILE_FWD = 1.0
GOAL_VS_COMPILE_FWD_BWD = 1.2
GOAL_GEMM_OVER_CUBLAS = 1.05
GOAL_SAMPLER_OF_IDEAL = 0.95
MEMORY_BOUND_OPS = ("adaln_modulate", "gated_fusion", "flow_step", "meanflow_fd_loss")


class OutOfTime(Exception):
    """A part reached its time cap."""


class Clock:
    """The deadline of one part: ``check()`` raises OutOfTime past it; ``left()`` seconds remain."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, need: float = 0.0) -> None:
        if self.left() < need:
            raise OutOfTime


# ------------------------------------------------------------------------------------------ env


def part_env(ctx: dict, clock: Clock) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cuda_available": torch.cuda.is_available(), "device": "cpu", "driver": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                   l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            with contextlib.suppress(Exception):
                out["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=20).stdout.strip() or None
    else:
        out["device"] = f"CPU {platform.processor() or platform.machine()}"
    return {"status": "ok", **out}


# ---------------------------------------------------------------------------------------- build


def _source_stamp() -> str:
    import torch

    h = hashlib.sha256()
    for p in sorted((ROOT / "csrc").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    for name in ("setup.py",):
        h.update((ROOT / name).read_bytes())
    arch = ""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}.{minor}"
    h.update(f"{torch.__version__}|{arch}".encode())
    return h.hexdigest()


def part_build(ctx: dict, clock: Clock) -> dict:
    if ctx["dry"]:
        return {"status": "skipped: dry run (the extension in place is used)"}
    stamp_file = ROOT / "build" / "gpu_check.stamp"
    stamp = _source_stamp()
    built = list((ROOT / "tmd_ext").glob("_C*.so"))
    if built and stamp_file.is_file() and stamp_file.read_text() == stamp and not ctx["rebuild"]:
        return {"status": "ok", "note": "up to date (same sources, torch and arch as the last build here)"}
    env = dict(os.environ)
    env.pop("TORCH_CUDA_ARCH_LIST", None)  # setup.py: the visible GPU's arch (9.0 -> 9.0a)
    env["MAX_JOBS"] = str(max(int(env.get("MAX_JOBS") or 0), os.cpu_count() or 4))  # every core
    log = ROOT / "build" / "gpu_check_build.log"
    log.parent.mkdir(exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                                  stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, clock.left()))
        except subprocess.TimeoutExpired:
            return {"status": "skipped: time", "log": str(log), "seconds": time.monotonic() - t0}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        return {"status": "fail", "log": str(log), "tail": tail}
    stamp_file.write_text(stamp)
    return {"status": "ok", "log": str(log), "seconds": time.monotonic() - t0}


def import_ext(ctx: dict) -> dict:
    """Imports tmd_ext (after the build) and returns its build info."""
    import tmd_ext

    info = tmd_ext.build_info()
    ctx["build_info"] = info
    return info


# --------------------------------------------------------------------------------------- pytest


def _pytest_counts(text: str) -> dict:
    counts = {}
    last = [line for line in text.splitlines() if " in " in line and ("passed" in line or "failed" in line
                                                                     or "skipped" in line or "deselected" in line
                                                                     or "error" in line or "collected" in line
                                                                     or "tests" in line)]
    if last:
        for tok in last[-1].replace(",", " ").split("  "):
            tok = tok.strip("= ")
            parts = tok.split()
            for i in range(len(parts) - 1):
                if parts[i].isdigit():
                    counts[parts[i + 1].rstrip(",")] = int(parts[i])
    return counts


def part_pytest(ctx: dict, clock: Clock) -> dict:
    args = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    args += ["tests/ops", "--collect-only"] if ctx["dry"] else ["tests", "-x"]
    try:
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, clock.left()))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "skipped: time", "tail": out.splitlines()[-10:]}
    text = proc.stdout + proc.stderr
    counts = _pytest_counts(text)
    if ctx["dry"]:
        n = sum(1 for line in proc.stdout.splitlines() if "::" in line)
        ok = proc.returncode == 0 and n > 0
        return {"status": "ok" if ok else "fail", "collected_cuda_tests": n, "tail": text.splitlines()[-5:]}
    status = "ok" if proc.returncode == 0 else "fail"
    return {"status": status, "counts": counts, "returncode": proc.returncode, "tail": text.splitlines()[-15:]}


# ------------------------------------------------------------------------------------ sanitizer


def sanitize_cases(device: str) -> list[tuple[str, Callable[[], None]]]:
    """One small case per kernel (forward and backward of every op, the CUTLASS epilogue GEMM with
    and without residual, a FlowHeadLoop capture), each a callable that runs it and synchronises."""
    import torch

    import tmd_ext

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def adaln(dtype, d):
        def run():
            x = rnd(2, 33, d, dtype=dtype).requires_grad_()
            sh, sc = rnd(2, d, dtype=dtype).requires_grad_(), rnd(2, d, dtype=dtype).requires_grad_()
            tmd_ext.adaln_modulate(x, sh, sc).float().square().sum().backward()
            sync()
        return run

    def gated(dtype):
        def run():
            m, z = rnd(2, 33, 24, dtype=dtype).requires_grad_(), rnd(2, 33, 24, dtype=dtype).requires_grad_()
            gate, alpha = rnd(2, 24, dtype=dtype).requires_grad_(), rnd(dtype=dtype).requires_grad_()
            tmd_ext.gated_fusion(m, z, gate, alpha).float().square().sum().backward()
            sync()
        return run

    def gfl(dtype, t, d, k, residual):
        def run():
            m, x = rnd(2, t, d, dtype=dtype).requires_grad_(), rnd(2, t, k, dtype=dtype).requires_grad_()
            w, b = rnd(d, k, dtype=dtype).requires_grad_(), rnd(d, dtype=dtype).requires_grad_()
            gate, alpha = rnd(2, d, dtype=dtype).requires_grad_(), rnd(dtype=dtype).requires_grad_()
            e = rnd(2, t, d, dtype=dtype).requires_grad_() if residual else None
            tmd_ext.gated_fusion_linear(m, x, w, b, gate, alpha, residual=e).float().square().sum().backward()
            sync()
        return run

    def flow(dtype):
        def run():
            y, h, y1 = (rnd(2, 4, 3, 5, dtype=dtype).requires_grad_() for _ in range(3))
            s = torch.rand(2, generator=g).to(device)
            tmd_ext.flow_step(y, h, y1, s, s * 0.5).float().square().sum().backward()
            sync()
        return run

    def meanflow(dtype):
        def run():
            u = rnd(3, 4, 5, 7, dtype=dtype).requires_grad_()
            up, um, v = (rnd(3, 4, 5, 7, dtype=dtype) for _ in range(3))
            s = torch.tensor([0.5, 0.7, 0.9], device=device)
            r = torch.tensor([0.5, 0.2, 0.1], device=device)  # row 0: s == r
            loss, mse = tmd_ext.meanflow_fd_loss(u, up, um, v, s, r, s + 1e-2, s - 1e-2, 10.0)
            (loss.sum() + mse.sum()).backward()
            sync()
        return run

    def head_loop():
        lin = torch.nn.Linear(6, 6).to(device)

        def head(y, s, r, a):
            return torch.tanh(lin(y)) + a * (s - r)[:, None]

        grid = torch.linspace(0, 1, 4, device=device)
        flow_loop = tmd_ext.StaticFlowHeadLoop(head, grid)
        y1, a = rnd(2, 6), rnd(2, 6)
        with torch.no_grad():
            flow_loop(y1, (a,))
            flow_loop(y1, (a,))
        sync()

    from bench_gated_fusion_linear import with_schedule as scheduled  # the bench's own env switch

    bf = torch.bfloat16
    return [
        ("adaln_modulate bf16 D=1536", adaln(bf, 1536)), ("adaln_modulate fp32 D=67", adaln(torch.float32, 67)),
        ("gated_fusion bf16", gated(bf)), ("gated_fusion fp32", gated(torch.float32)),
        ("gated_fusion_linear bf16 (CUTLASS on sm_90a)", gfl(bf, 40, 64, 32, False)),
        ("gated_fusion_linear bf16 + residual", gfl(bf, 40, 64, 32, True)),
        ("gated_fusion_linear bf16 + residual, pingpong", scheduled("pingpong", gfl(bf, 40, 64, 32, True))),
        ("gated_fusion_linear bf16 + residual, 128x256", scheduled("cooperative_128x256", gfl(bf, 300, 264, 32, True))),
        ("gated_fusion_linear fp32 odd K (fallback)", gfl(torch.float32, 9, 12, 7, True)),
        ("flow_step bf16", flow(bf)), ("meanflow_fd_loss fp32", meanflow(torch.float32)),
        ("meanflow_fd_loss bf16", meanflow(bf)), ("FlowHeadLoop", head_loop),
    ]


def _sanitizer_tool() -> str | None:
    tool = shutil.which("compute-sanitizer")
    if tool:
        return tool
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(Path("/usr/local").glob("cuda-*"))):
        if home and (Path(home) / "bin" / "compute-sanitizer").is_file():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def part_sanitizer(ctx: dict, clock: Clock) -> dict:
    import torch

    tool = _sanitizer_tool()
    if ctx["dry"] or not torch.cuda.is_available() or tool is None:
        # The cases themselves, without the tool (the dry run's check that they run at all).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = []
        for name, run in sanitize_cases(device):
            clock.check()
            run()
            rows.append({"case": name, "ran": True})
        why = "dry run" if ctx["dry"] else ("no GPU" if not torch.cuda.is_available() else "no compute-sanitizer")
        return {"status": f"skipped: {why} (cases ran without the tool)", "cases": rows}
    rows, ok = [], True
    for tool_name, share in (("memcheck", 0.6), ("racecheck", 1.0)):
        cmd = [tool, "--tool", tool_name, "--error-exitcode", "9", "--print-limit", "20",
               sys.executable, str(Path(__file__).resolve()), "--sanitize-case", "all"]
        # No caching allocator in the child: memcheck then sees each tensor's own allocation bounds.
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, share * clock.left()))
        except subprocess.TimeoutExpired:
            rows.append({"tool": tool_name, "status": "skipped: time"})
            continue
        text = proc.stdout + proc.stderr
        summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        good = proc.returncode == 0
        ok &= good
        rows.append({"tool": tool_name, "status": "ok" if good else "fail", "returncode": proc.returncode,
                     "summary": summary[-1:] or text.splitlines()[-5:]})
    status = "ok" if ok and all(r["status"] == "ok" for r in rows) else (
        "fail" if not ok else "skipped: time")
    return {"status": status, "tools": rows}


# ------------------------------------------------------------------------------------------ ops


def _op_plan(dry: bool, device: str):
    """(op, module, shape, dtype) in priority order: the Wan-1.3B full-length bf16 case of every op
    first, then fp32, then width 5120, then T = 1024."""
    import bench_adaln_modulate as adaln
    import bench_flow_step as flow
    import bench_gated_fusion as gf
    import bench_gated_fusion_linear as gfl
    import bench_meanflow_fd_loss as mf
    import torch

    mods = {"adaln_modulate": adaln, "gated_fusion": gf, "gated_fusion_linear": gfl, "flow_step": flow,
            "meanflow_fd_loss": mf}
    if dry:
        toy = {"adaln_modulate": [(1, 16, 24)], "gated_fusion": [(1, 16, 24)],
               "gated_fusion_linear": [(1, 16, 24, 16)], "flow_step": [(1, 4, 1, 2, 4)],
               "meanflow_fd_loss": [(2, 4, 1, 2, 4)]}
        return [(op, mods[op], shape, torch.float32) for op in mods for shape in toy[op]]
    plan = []
    tiers = [(0, torch.bfloat16), (0, torch.float32), (1, torch.bfloat16), (2, torch.bfloat16),
             (3, torch.bfloat16), (1, torch.float32), (2, torch.float32), (3, torch.float32)]
    for idx, dt in tiers:
        for op, mod in mods.items():
            shapes = mod.WAN_SHAPES
            if idx < len(shapes):
                plan.append((op, mod, shapes[idx], dt))
    seen, out = set(), []
    for item in plan:
        key = (item[0], item[2], item[3])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def part_ops(ctx: dict, clock: Clock) -> dict:
    import torch
    from common import Table, copy_bandwidth_gbs

    device = ctx["device"]
    plan = _op_plan(ctx["dry"], device)
    tables = {op: Table(op, device, unit="TFLOP/s" if op == "gated_fusion_linear" else "GB/s")
              for op in dict.fromkeys(p[0] for p in plan)}
    reps = 3 if ctx["dry"] else 20
    done, skipped, errors = [], [], []
    peak = copy_bandwidth_gbs(device)
    last = 2.0 if ctx["dry"] else 15.0  # the time a case is expected to take: the last one's
    for i, (op, mod, shape, dt) in enumerate(plan):
        label = f"{op} {'x'.join(map(str, shape))} {dt}"
        if clock.left() < last:
            skipped += [f"{p[0]} {'x'.join(map(str, p[2]))} {p[3]}" for p in plan[i:]]
            break
        t0 = time.monotonic()
        try:
            kw = {"autotune": ctx["autotune"]} if op == "gated_fusion_linear" else {}
            mod.add_cases(tables[op], shape, dt, compile=not ctx["dry"], reps=reps, **kw)
            done.append(label)
        except torch.OutOfMemoryError:
            errors.append(f"{label}: out of memory")
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - one case's failure must not end the part
            errors.append(f"{label}: {type(e).__name__}: {e}")
        last = 2.0 if ctx["dry"] else max(15.0, time.monotonic() - t0)
        ctx["save"]()
    rows = []
    for op, table in tables.items():
        if op == "gated_fusion_linear":
            mod = sys.modules["bench_gated_fusion_linear"]
            mod.annotate(table)
        for r in table.rows:
            rows.append({"op": op, **r})
    status = "ok" if not errors else "error"
    if skipped:
        status = "skipped: time" if not errors else status
    return {"status": status, "copy_peak_gbs": peak, "rows": rows, "done": done, "skipped_cases": skipped,
            "errors": errors}


# ---------------------------------------------------------------------------------------- stages


def _stage_cfg(stage: int, ctx: dict, layers: int, out: Path):
    from tmd_train.engine.config import config_from_dict
    from tmd_train.methods import Stage1Config, Stage2Config

    teacher = dict(TOY if ctx["dry"] else WAN_1_3B)
    teacher["num_layers"] = layers
    latent, text_len = (TOY_LATENT, TOY_TEXT_LEN) if ctx["dry"] else (WAN_LATENT, WAN_TEXT_LEN)
    # the shipped 1.3B recipes' memory settings (configs/stage{1,2}_wan2.1_1.3b.yaml): per-block recompute
    values = dict(teacher=teacher, head_blocks=min(5, layers - 1), synthetic_samples=4,
                  synthetic_latent_size=list(latent), synthetic_text_len=text_len, batch_size=1, steps=20,
                  output_dir=str(out), seed=0, log_every=1, checkpoint_every=1000, gradient_checkpointing=True)
    if ctx["dry"]:
        values["mixed_precision"] = "no"
    if stage == 1:
        values.update(method="tm_meanflow")
        return config_from_dict(Stage1Config, values)
    values.update(method="tmd", teacher_checkpointing=True)
    return config_from_dict(Stage2Config, values)


PLAN_FILE = ROOT / "bench" / "results" / "plan-gpu-check.json"


def _plan_fingerprint(cfg, latent, text_len: int) -> str:
    """SHA-256 of the stage's configuration (without its output folder) and sizes: a stored estimate is used
    only for the configuration it was planned for."""
    import dataclasses

    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}
    blob = json.dumps({"config": values, "latent": list(latent), "text_len": text_len}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _plan_key(stage: int, layers: int) -> str:
    return f"stage{stage}-L{layers}"


def _plan_live(stage: int, ctx: dict, layers: int) -> dict:
    """Plan the stage's iteration now (FakeTensorMode on the CPU, one rank) — how the planner prices it."""
    from tmd_train.plan import estimate

    latent, text_len = (TOY_LATENT, TOY_TEXT_LEN) if ctx["dry"] else (WAN_LATENT, WAN_TEXT_LEN)
    out = Path(tempfile.mkdtemp(prefix=f"gpu_check_plan{stage}_"))
    try:
        cfg = _stage_cfg(stage, ctx, layers, out)
        plan = estimate(cfg, 1, latent=latent, text_len=text_len, gpu=not ctx["dry"], teacher_note="random weights")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"peak_gb": plan.peak / 2**30, "gib": {k: round(v, 3) for k, v in plan.gib().items()},
            "iteration": plan.iteration, "precision": plan.precision, "plan_s": round(plan.seconds, 1),
            "fingerprint": _plan_fingerprint(cfg, latent, text_len)}


def planner_estimate(stage: int, ctx: dict, layers: int) -> dict:
    """The planner's per-GPU peak for the iteration the stage part runs: planned live in a dry run, read from
    :data:`PLAN_FILE` otherwise (``estimate_gb`` None with a note when it holds no current entry)."""
    if ctx["dry"]:
        est = _plan_live(stage, ctx, layers)
        return {"estimate_gb": est["peak_gb"], "source": "planned live", "plan_s": est["plan_s"]}
    out = Path(tempfile.mkdtemp(prefix="gpu_check_fp_"))
    try:
        fingerprint = _plan_fingerprint(_stage_cfg(stage, ctx, layers, out), WAN_LATENT, WAN_TEXT_LEN)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    how = "python bench/gpu_check.py --plan-estimates"
    try:
        stored = json.loads(PLAN_FILE.read_text()).get("estimates", {})
    except (OSError, ValueError):
        return {"estimate_gb": None, "note": f"no stored estimates in {PLAN_FILE.name}; make them with: {how}"}
    entry = stored.get(_plan_key(stage, layers))
    if entry is None or entry.get("fingerprint") != fingerprint:
        what = "none" if entry is None else "a stale one (the configuration changed)"
        return {"estimate_gb": None, "note": f"{PLAN_FILE.name} holds {what} for stage {stage} at L={layers}; "
                                             f"remake with: {how}"}
    return {"estimate_gb": entry["peak_gb"], "source": f"{PLAN_FILE.name} ({entry.get('date', '?')})"}


def make_plan_estimates(layer_list: list[int], path: Path | None = None) -> dict:
    """Plan both stages at each layer count for the GPU check's configuration and store them in ``path``
    (default :data:`PLAN_FILE`; merged with the entries already there; written after each one)."""
    import torch

    path = PLAN_FILE if path is None else path

    ctx = {"dry": False}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.update({"bench": "gpu-check planner estimates", "torch": torch.__version__,
                "note": "per-GPU peak (GiB) of the stage part's iteration, planned by tmd_train.plan on one rank"})
    estimates = doc.setdefault("estimates", {})
    for layers in layer_list:
        for stage in (1, 2):
            print(f"planning stage {stage} at L={layers} ...", flush=True)
            est = _plan_live(stage, ctx, layers)
            est["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            estimates[_plan_key(stage, layers)] = est
            print(f"  peak {est['peak_gb']:.2f} GiB ({est['plan_s']:.0f} s)", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1))
    return doc


def _cuda_mem_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _stage(stage: int, ctx: dict, clock: Clock) -> dict:
    import gc

    import torch
    from common import sync

    from tmd_train.methods import build_method

    device = ctx["device"]
    layer_options = [TOY["num_layers"]] if ctx["dry"] else [30, 15, 8]
    attempts = []
    for layers in layer_options:
        clock.check(1.0)
        out = Path(tempfile.mkdtemp(prefix=f"gpu_check_stage{stage}_"))
        method = None
        try:
            _cuda_mem_reset(device)
            t0 = time.monotonic()
            method = build_method(_stage_cfg(stage, ctx, layers, out))
            build_s = time.monotonic() - t0
            batches = method.batches(1)
            times = []
            step_ids = [1, 2]
            if stage == 2:  # generator iterations (generator + fake score + discriminator updates)
                step_ids = ([s for s in range(1, 20) if method.is_generator_step(s)] * 2)[:2] or [1, 2]
            for step in step_ids:
                clock.check(1.0)
                batch = next(batches)
                sync(device)
                t1 = time.monotonic()
                metrics = method.train_step(step, batch)
                sync(device)
                times.append(time.monotonic() - t1)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            del method
            method = None
            gc.collect()
            try:
                planner = planner_estimate(stage, ctx, layers)
            except Exception as e:  # noqa: BLE001 - the measurement stands without the estimate
                planner = {"estimate_gb": None, "note": f"planner failed: {type(e).__name__}: {e}"}
            return {"status": "ok", "layers": layers, "full_model": layers == WAN_1_3B["num_layers"],
                    "latent": list(TOY_LATENT if ctx["dry"] else WAN_LATENT), "batch_size": 1,
                    "build_s": build_s, "warmup_s": times[0], "s_per_iter": times[-1],
                    "peak_memory_gb": peak, "planner_estimate_gb": planner.pop("estimate_gb"), "planner": planner,
                    "metrics": {k: float(v) for k, v in (metrics or {}).items()
                                if isinstance(v, (int, float))}, "attempts": attempts}
        except torch.OutOfMemoryError:
            attempts.append({"layers": layers, "result": "out of memory"})
        finally:
            del method
            gc.collect()
            _cuda_mem_reset(device)
            shutil.rmtree(out, ignore_errors=True)
    return {"status": "error", "attempts": attempts, "note": "out of memory at every layer count tried"}


def part_stage1(ctx: dict, clock: Clock) -> dict:
    return _stage(1, ctx, clock)


def part_stage2(ctx: dict, clock: Clock) -> dict:
    return _stage(2, ctx, clock)


# --------------------------------------------------------------------------------------- sampler


def part_sampler(ctx: dict, clock: Clock) -> dict:
    import torch
    from common import sync

    from tmd_train import TMDStudent, load_teacher, sample_teacher, sample_tmd, shifted_grid
    from tmd_train.sampling import LoopedInnerFlow, sample_tmd_looped

    device = ctx["device"]
    dry = ctx["dry"]
    cfg = dict(TOY if dry else WAN_1_3B)
    latent = (1, cfg["in_channels"], *(TOY_LATENT if dry else WAN_LATENT))
    text_len = TOY_TEXT_LEN if dry else WAN_TEXT_LEN
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    steps = ctx["teacher_steps"]
    torch.manual_seed(0)
    teacher = load_teacher(cfg, torch_dtype=dtype, device=device)
    student = TMDStudent.from_teacher(teacher, head_blocks=min(5, cfg["num_layers"] - 1)).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, text_len, cfg["text_dim"], generator=g).to(device=device, dtype=dtype)
    negative = torch.randn(1, text_len, cfg["text_dim"], generator=g).to(device=device, dtype=dtype)
    inner = LoopedInnerFlow(student, shifted_grid(2, 10.0, 0.999, device=device))
    kw = {"shape": latent, "M": 2, "N": 2}

    def teacher_run():
        return sample_teacher(teacher, text, negative_text=negative, shape=latent,
                              generator=torch.Generator().manual_seed(0), steps=steps, cfg=5.0)

    def eager_run():
        return sample_tmd(student, text, generator=torch.Generator().manual_seed(0), **kw)

    def loop_run():
        return sample_tmd_looped(student, text, generator=torch.Generator().manual_seed(0), inner=inner, **kw)

    rows = []
    for name, fn in ((f"teacher {steps} steps x CFG", teacher_run), ("TMD N2H5 M=2 eager inner loop", eager_run),
                     ("TMD N2H5 M=2 FlowHeadLoop", loop_run)):
        clock.check(1.0)
        nfe = fn().nfe  # warm-up (and the FlowHeadLoop capture)
        times = []
        for _ in range(1 if "teacher" in name else 3):
            clock.check(1.0)
            sync(device)
            t0 = time.monotonic()
            fn()
            sync(device)
            times.append(time.monotonic() - t0)
        rows.append({"provider": name, "s": statistics.median(times), "nfe": nfe})
    base = rows[0]
    for r in rows:
        r["speedup"] = base["s"] / r["s"]
        r["ideal_speedup"] = base["nfe"] / r["nfe"]
        r["realised_of_ideal"] = r["speedup"] / r["ideal_speedup"]
    graph = bool(inner.loop and inner.loop.uses_graph and inner.loop.captured)
    return {"status": "ok", "dtype": str(dtype), "latent": list(latent), "layers": cfg["num_layers"],
            "width": cfg["num_attention_heads"] * cfg["attention_head_dim"], "teacher_steps_timed": steps,
            "flow_head_loop_graph": graph, "flow_head_loop_fallbacks": getattr(inner.flow, "fallbacks", None),
            "rows": rows}


# ----------------------------------------------------------------------------------------- goals


def goals(results: dict, dry: bool) -> list[dict]:
    """One row per goal: name, measured value (worst case), target, pass (None: not measured)."""
    out = []
    ops = results.get("ops", {})
    rows = ops.get("rows", []) if isinstance(ops, dict) else []
    tmd_rows = [r for r in rows if r["provider"] == "tmd"]

    def worst(op, key, fwd_bwd, target, higher=True, dtype=None):
        sel = [r for r in tmd_rows if r["op"] == op and r.get(key) is not None
               and r["case"].endswith("fwd+bwd") == fwd_bwd and (dtype is None or f" {dtype} " in r["case"])]
        if not sel:
            return None, None
        r = min(sel, key=lambda r: r[key]) if higher else max(sel, key=lambda r: r[key])
        return r[key], r["case"]

    for op in MEMORY_BOUND_OPS:
        for key, fb, target, label in (("pct_peak", False, GOAL_COPY_PCT, "% copy bandwidth fwd"),
                                       ("vs_compile", False, GOAL_VS_COMPILE_FWD, "x torch.compile fwd"),
                                       ("vs_compile", True, GOAL_VS_COMPILE_FWD_BWD, "x torch.compile fwd+bwd")):
            v, case = worst(op, key, fb, target)
            out.append({"goal": f"{op} >= {target:g}{label}", "value": v, "case": case,
                        "pass": None if v is None or dry else v >= target})
    v, case = worst("gated_fusion_linear", "over_cublas", False, GOAL_GEMM_OVER_CUBLAS, higher=False, dtype="bf16")
    out.append({"goal": f"gated_fusion_linear <= {GOAL_GEMM_OVER_CUBLAS:g}x bare cuBLAS GEMM (bf16 fwd)",
                "value": v, "case": case, "pass": None if v is None or dry else v <= GOAL_GEMM_OVER_CUBLAS})
    samp = results.get("sampler", {})
    loop = [r for r in samp.get("rows", []) if "FlowHeadLoop" in r["provider"]] if isinstance(samp, dict) else []
    v = loop[0]["realised_of_ideal"] if loop else None
    out.append({"goal": f"sampler FlowHeadLoop >= {GOAL_SAMPLER_OF_IDEAL:g} of NFE-ideal speedup", "value": v,
                "case": "N2H5 M=2", "pass": None if v is None or dry else v >= GOAL_SAMPLER_OF_IDEAL})
    for part in ("pytest", "sanitizer"):
        st = results.get(part, {}).get("status", "not run")
        out.append({"goal": f"{part} clean", "value": st, "case": None,
                    "pass": None if (dry or st.startswith("skipped") or st == "not run") else st == "ok"})
    return out


def summary(results: dict, goal_rows: list[dict]) -> str:
    lines = []
    env = results.get("env", {})
    lines.append(f"gpu-check on {env.get('device')} (driver {env.get('driver')}, CUDA {env.get('cuda')}, "
                 f"torch {env.get('torch')}){' [DRY RUN: toy sizes]' if results['dry'] else ''}")
    lines.append(f"{'part':<10} {'status':<44} {'s':>7}  key numbers")
    lines.append("-" * 100)
    for part in PARTS:
        r = results.get(part)
        if r is None:
            continue
        key = ""
        if part == "ops":
            tmd = [x for x in r.get("rows", []) if x["provider"] == "tmd"]
            key = f"{len(r.get('done', []))} shapes timed, {len(r.get('skipped_cases', []))} skipped"
            if r.get("copy_peak_gbs"):
                key += f", copy peak {r['copy_peak_gbs']:.0f} GB/s"
            key += f", {len(tmd)} tmd rows"
        elif part in ("stage1", "stage2") and r.get("s_per_iter") is not None:
            mem = f", peak {r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") is not None else ""
            est = r.get("planner_estimate_gb")
            plan = f"planner {est:.1f} GB" if est is not None else "planner: none"
            key = f"L={r['layers']}: {r['s_per_iter']:.3f} s/iter{mem} ({plan})"
        elif part == "sampler" and r.get("rows"):
            key = "; ".join(f"{'FlowHeadLoop' if 'FlowHeadLoop' in x['provider'] else 'eager'} "
                            f"{x['realised_of_ideal']:.2f} of ideal" for x in r["rows"][1:])
        elif part == "pytest":
            key = str(r.get("counts") or r.get("collected_cuda_tests", ""))
        elif part == "build":
            key = r.get("note", "")
        elif part == "env":
            key = f"build {json.dumps(results.get('build_info', {}))}"[:60]
        lines.append(f"{part:<10} {r.get('status', '?')[:44]:<44} {r.get('seconds', 0):>7.1f}  {key}")
    ops = results.get("ops", {})
    if ops.get("rows"):
        lines.append("")
        lines.append(f"{'op case':<46} {'provider':<9} {'ms':>9} {'thr':>9} {'%peak':>6} {'x comp':>7} {'graph':>5}")
        for r in ops["rows"]:
            if r["provider"] not in ("tmd", "compile", "cublas", "autotune"):
                continue
            thr = r.get("GB/s", r.get("TFLOP/s"))
            pct = f"{r['pct_peak']:.0f}" if r.get("pct_peak") is not None else "-"
            vc = f"{r['vs_compile']:.2f}" if r.get("vs_compile") is not None else "-"
            lines.append(f"{(r['op'] + ' ' + r['case'])[:46]:<46} {r['provider']:<9} {r['ms']:>9.3f} {thr:>9.1f} "
                         f"{pct:>6} {vc:>7} {str(r.get('graph', '-')):>5}")
    lines.append("")
    for g in goal_rows:
        verdict = "n/a " if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        v = g["value"]
        vs = f"{v:.3g}" if isinstance(v, float) else str(v)
        lines.append(f"{verdict}  {g['goal']}: {vs}" + (f" ({g['case']})" if g.get("case") else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def run_check(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="toy sizes, any device, no build (CI)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 480; dry 600)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of parts to run")
    p.add_argument("--caps", default="", help="per-part caps, e.g. ops=200,sampler=90")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher Euler steps timed (default 5; dry 2)")
    p.add_argument("--rebuild", action="store_true", help="build even when the stamp says up to date")
    p.add_argument("--autotune", action="store_true", help="add Inductor max-autotune to gated_fusion_linear")
    p.add_argument("--out", default=None, help="the JSON path (default bench/results/gpu-check-<dev>-<time>.json)")
    p.add_argument("--sanitize-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan-estimates", action="store_true",
                   help=f"only plan the stage parts' memory (CPU is enough; minutes per entry) into {PLAN_FILE.name}")
    p.add_argument("--plan-layers", default="30,15,8", help="layer counts for --plan-estimates")
    args = p.parse_args(argv)

    if args.plan_estimates:
        try:
            layer_list = [int(x) for x in args.plan_layers.split(",") if x.strip()]
        except ValueError:
            p.error(f"--plan-layers: expected comma-separated integers, got {args.plan_layers!r}")
        make_plan_estimates(layer_list)
        print(f"saved {PLAN_FILE}")
        return 0

    if args.sanitize_case is not None:  # the child run under compute-sanitizer
        import torch

        for name, run in sanitize_cases("cuda" if torch.cuda.is_available() else "cpu"):
            if args.sanitize_case in ("all", name):
                run()
                print(f"ran {name}", flush=True)
        return 0

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
    caps = dict(DRY_CAPS if args.dry else CAPS)
    for item in filter(None, args.caps.split(",")):
        k, _, v = item.partition("=")
        if k not in PARTS or not v:
            p.error(f"--caps: expected part=seconds with a part among {', '.join(PARTS)}, got {item!r}")
        caps[k] = float(v)
    budget = args.budget if args.budget is not None else (600.0 if args.dry else 480.0)
    total = Clock(budget)

    now = _dt.datetime.now(_dt.timezone.utc)
    results: dict = {"bench": "gpu-check", "dry": args.dry, "date": now.isoformat(timespec="seconds"),
                     "budget_s": budget, "caps_s": caps}
    ctx = {"dry": args.dry, "rebuild": args.rebuild, "autotune": args.autotune,
           "teacher_steps": args.teacher_steps or (2 if args.dry else 5)}
    out_path = Path(args.out) if args.out else None

    def save() -> None:
        nonlocal out_path
        if out_path is None:
            tag = "cpu" if not results.get("env", {}).get("cuda_available") else "cuda"
            name = f"gpu-check{'-dry' if args.dry else ''}-{tag}-{now:%Y%m%d-%H%M%S}.json"
            out_path = ROOT / "bench" / "results" / name
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, default=str))

    ctx["save"] = save
    runners = {"env": part_env, "build": part_build, "pytest": part_pytest, "sanitizer": part_sanitizer,
               "ops": part_ops, "stage1": part_stage1, "stage2": part_stage2, "sampler": part_sampler}
    for part in PARTS:
        if part not in parts:
            continue
        if part not in ("env", "build") and "build_info" not in ctx:
            try:
                import_ext(ctx)
                results["build_info"] = ctx["build_info"]
                import torch

                ctx["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            except Exception as e:  # noqa: BLE001
                results[part] = {"status": f"error: tmd_ext does not import: {e}"}
                save()
                continue
        cap = min(caps[part], total.left())
        t0 = time.monotonic()
        if cap <= 0:
            results[part] = {"status": "skipped: time (the check's budget is spent)", "seconds": 0.0}
            save()
            continue
        print(f"== {part} (cap {cap:.0f} s)", flush=True)
        try:
            results[part] = runners[part](ctx, Clock(cap))
        except OutOfTime:
            results[part] = {**results.get(part, {}), "status": "skipped: time"}
        except Exception as e:  # noqa: BLE001 - report and go on with the next part
            results[part] = {"status": f"error: {type(e).__name__}: {e}",
                             "traceback": traceback.format_exc().splitlines()[-12:]}
        results[part]["seconds"] = time.monotonic() - t0
        save()
    goal_rows = goals(results, args.dry)
    results["goals"] = goal_rows
    save()
    print()
    print(summary(results, goal_rows))
    print(f"\nsaved {out_path}")
    failed = [p for p in parts if str(results.get(p, {}).get("status", "")).startswith(("fail", "error"))]
    if failed:
        print(f"parts that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_check())
