"""Benchmark of tmd_ext.gated_fusion_linear (forward, and forward+backward). FLOP model: the
forward GEMM, 2·B·T·D·K; forward+backward adds the grad_x and grad_weight GEMMs, 6·B·T·D·K in all
(the backward's recomputation of z is not counted as useful work). Providers: tmd (with the
residual operand e, as GatedFusion calls it); eager (the pure-PyTorch reference, GEMM on
fp32-upcast operands); compile (torch.compile of the reference); autotune (the same with Inductor's
max-autotune GEMM templates and the epilogue fused into them; CUDA only, ``--autotune``); unfused
(torch.nn.functional.linear in the input dtype, i.e. cuBLAS, followed by tmd_ext.gated_fusion);
cublas (the bare F.linear GEMM, forward only: the floor the fused epilogue is judged against,
goal tmd ≤ 1.05 × cublas); on an sm_90a build on compute capability 9.0, also tmd_pingpong and
tmd_128x256 (forward, bf16: the CUTLASS kernel with TMD_GFL_SM90_SCHEDULE=pingpong or
cooperative_128x256 instead of the default cooperative 128x128 tiles). The last lines print tmd's
speed-up over unfused and its time over the bare GEMM per case (also saved as vs_unfused, over_cublas)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from common import Table, dtype_name, dtypes_from, fwd_bwd, maybe_compile, parser

import tmd_ext
from tmd_ext import reference

#: The alternative sm90 schedules (csrc/gated_fusion_linear/gated_fusion_linear_sm90.cu) and their provider names.
SM90_SCHEDULES = {"tmd_pingpong": "pingpong", "tmd_128x256": "cooperative_128x256"}


def sm90_kernels_here(device: str) -> bool:
    """Whether the CUTLASS sm_90a kernels can run here (an sm_90a build on a compute capability 9.0 device)."""
    return (device.startswith("cuda") and tmd_ext.build_info()["cutlass_sm90"]
            and torch.cuda.get_device_capability(torch.device(device)) == (9, 0))


def with_schedule(schedule: str, fn):
    """fn run with TMD_GFL_SM90_SCHEDULE=schedule (read by the op at every call), restored after."""
    def run(*args):
        old = os.environ.get("TMD_GFL_SM90_SCHEDULE")
        os.environ["TMD_GFL_SM90_SCHEDULE"] = schedule
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["TMD_GFL_SM90_SCHEDULE"]
            else:
                os.environ["TMD_GFL_SM90_SCHEDULE"] = old
    return run


def unfused(m, x, weight, bias, gate, alpha, residual):
    """linear in the input dtype, then the elementwise fusion: z is rounded to the input dtype."""
    return tmd_ext.gated_fusion(m, residual + F.linear(x, weight, bias), gate, alpha)


# [B, T, D, K]: Wan 1.3B (1536) and 14B (5120) widths over T = 32760 tokens (480p/81 frames), and
# T = 1024 tokens (B = 2)
WAN_SHAPES = [(1, 32760, 1536, 1536), (1, 32760, 5120, 5120), (2, 1024, 1536, 1536), (2, 1024, 5120, 5120)]


def add_cases(table: Table, shape: tuple[int, int, int, int], dt: torch.dtype, compile: bool = True,
              reps: int | None = None, autotune: bool = False) -> None:
    """The forward and forward+backward cases of one shape and dtype (fresh compiles for each)."""
    dev = table.device
    b, t, d, k = shape
    m = torch.randn(b, t, d, device=dev, dtype=dt)
    x = torch.randn(b, t, k, device=dev, dtype=dt)
    weight = torch.randn(d, k, device=dev, dtype=dt) * k**-0.5
    bias = torch.randn(d, device=dev, dtype=dt)
    gate = torch.randn(b, d, device=dev, dtype=dt)
    alpha = torch.randn((), device=dev, dtype=dt)
    e = torch.randn(b, t, d, device=dev, dtype=dt)
    inputs = (m, x, weight, bias, gate, alpha, e)
    flop = 2 * b * t * d * k
    case = f"{b}x{t}x{d}x{k} {dtype_name(dt)}"
    autotune = autotune and compile and dev.startswith("cuda")

    def call(fn):
        return (lambda: fn(*inputs)) if fn is not None else None

    ref_c = maybe_compile(reference.gated_fusion_linear, compile)
    ref_a = maybe_compile(reference.gated_fusion_linear, autotune, mode="max-autotune-no-cudagraphs")
    schedules = SM90_SCHEDULES if dt == torch.bfloat16 and sm90_kernels_here(dev) else {}
    table.add_case(case + " fwd", flop, {
        "tmd": call(tmd_ext.gated_fusion_linear),
        **{name: call(with_schedule(sched, tmd_ext.gated_fusion_linear)) for name, sched in schedules.items()},
        "eager": call(reference.gated_fusion_linear),
        "compile": call(ref_c),
        "autotune": call(ref_a),
        "unfused": call(unfused),
        "cublas": lambda: F.linear(x, weight, bias),
    }, reps)

    leaves = [v.detach().requires_grad_() for v in inputs]
    g = torch.randn_like(m)
    ref_c = maybe_compile(reference.gated_fusion_linear, compile)
    ref_a = maybe_compile(reference.gated_fusion_linear, autotune, mode="max-autotune-no-cudagraphs")
    table.add_case(case + " fwd+bwd", 3 * flop, {
        "tmd": fwd_bwd(tmd_ext.gated_fusion_linear, leaves, leaves, g),
        "eager": fwd_bwd(reference.gated_fusion_linear, leaves, leaves, g),
        "compile": fwd_bwd(ref_c, leaves, leaves, g) if ref_c else None,
        "autotune": fwd_bwd(ref_a, leaves, leaves, g) if ref_a else None,
        "unfused": fwd_bwd(unfused, leaves, leaves, g),
    }, reps)


def annotate(table: Table) -> None:
    """Adds vs_unfused (unfused ms / ms) and over_cublas (ms / bare-GEMM ms of the same forward case)."""
    unfused_ms = {r["case"]: r["ms"] for r in table.rows if r["provider"] == "unfused"}
    cublas_ms = {r["case"]: r["ms"] for r in table.rows if r["provider"] == "cublas"}
    for r in table.rows:
        r["vs_unfused"] = unfused_ms[r["case"]] / r["ms"] if r["case"] in unfused_ms else None
        r["over_cublas"] = r["ms"] / cublas_ms[r["case"]] if r["case"] in cublas_ms else None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--autotune", action="store_true", help="add the Inductor max-autotune provider (CUDA)")
    args = p.parse_args()
    dev = args.device
    shapes = [(1, 1024, 512, 512)] if args.small else WAN_SHAPES[:2]
    if dev == "cpu" and not args.small:
        shapes = shapes[:1]
    table = Table("gated_fusion_linear", dev, unit="TFLOP/s")
    for shape in shapes:
        for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
            add_cases(table, shape, dt, not args.no_compile, args.reps, args.autotune)
    table.print()
    annotate(table)
    for r in table.rows:
        if r["provider"] == "tmd" or r["provider"] in SM90_SCHEDULES:
            over = f", {r['over_cublas']:.3f}x the bare GEMM" if r["over_cublas"] is not None else ""
            print(f"{r['case']:<34} {r['provider']} vs unfused: {r['vs_unfused']:.2f}x{over}")
    if args.save:
        table.save()

if __name__ == "__main__":
    main()
