"""Benchmark of tmd_ext.gated_fusion_linear (forward, and forward+backward). FLOP model: the
forward GEMM, 2·B·T·D·K; forward+backward adds the grad_x and grad_weight GEMMs, 6·B·T·D·K in all
(the backward's recomputation of z is not counted as useful work). Providers: tmd; eager (the
pure-PyTorch reference, GEMM on fp32-upcast operands); compile (torch.compile of the reference);
unfused (torch.nn.functional.linear in the input dtype, i.e. cuBLAS, followed by
tmd_ext.gated_fusion) — the baseline the fused sm_90a GEMM is measured against. The last lines
print tmd's speed-up over unfused per case (also saved as vs_unfused)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import Table, dtype_name, dtypes_from, fwd_bwd, maybe_compile, parser

import tmd_ext
from tmd_ext import reference


def unfused(m, x, weight, bias, gate, alpha):
    """linear in the input dtype, then the elementwise fusion: z is rounded to the input dtype."""
    return tmd_ext.gated_fusion(m, F.linear(x, weight, bias), gate, alpha)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    # [B, T, D, K]: the Wan 1.3B width 1536 projected from 1536 over T = 32760 tokens (480p/81 frames)
    shapes = [(1, 1024, 512, 512)] if args.small else [(1, 32760, 1536, 1536)]
    table = Table("gated_fusion_linear", dev, unit="TFLOP/s")
    ref_c = maybe_compile(reference.gated_fusion_linear, not args.no_compile)
    for b, t, d, k in shapes:
        for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
            m = torch.randn(b, t, d, device=dev, dtype=dt)
            x = torch.randn(b, t, k, device=dev, dtype=dt)
            weight = torch.randn(d, k, device=dev, dtype=dt) * k**-0.5
            bias = torch.randn(d, device=dev, dtype=dt)
            gate = torch.randn(b, d, device=dev, dtype=dt)
            alpha = torch.randn((), device=dev, dtype=dt)
            inputs = (m, x, weight, bias, gate, alpha)
            flop = 2 * b * t * d * k
            case = f"{b}x{t}x{d}x{k} {dtype_name(dt)}"

            def call(fn, inputs=inputs):
                return lambda: fn(*inputs)

            table.add_case(case + " fwd", flop, {
                "tmd": call(tmd_ext.gated_fusion_linear),
                "eager": call(reference.gated_fusion_linear),
                "compile": call(ref_c) if ref_c else None,
                "unfused": call(unfused),
            }, args.reps)

            leaves = [v.detach().requires_grad_() for v in inputs]
            g = torch.randn_like(m)

            table.add_case(case + " fwd+bwd", 3 * flop, {
                "tmd": fwd_bwd(tmd_ext.gated_fusion_linear, leaves, leaves, g),
                "eager": fwd_bwd(reference.gated_fusion_linear, leaves, leaves, g),
                "compile": fwd_bwd(ref_c, leaves, leaves, g) if ref_c else None,
                "unfused": fwd_bwd(unfused, leaves, leaves, g),
            }, args.reps)
    table.print()
    unfused_ms = {r["case"]: r["ms"] for r in table.rows if r["provider"] == "unfused"}
    for r in table.rows:
        r["vs_unfused"] = unfused_ms[r["case"]] / r["ms"]
        if r["provider"] == "tmd":
            print(f"{r['case']:<34} tmd vs unfused: {r['vs_unfused']:.2f}x")
    if args.save:
        table.save()


if __name__ == "__main__":
    main()
