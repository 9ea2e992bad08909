"""Benchmark of tmd_ext.gated_fusion (forward, and forward+backward) against the eager reference
and torch.compile of the reference. Bytes model (m, z, out, grad tensors [B,T,D]; gate [B,D]):
forward reads m, z, gate and writes out (3·BTD + BD elements); the backward reads grad_out, m, z,
gate and writes grad_m, grad_z, grad_gate (5·BTD + 2·BD), so forward+backward moves 8·BTD + 3·BD
elements of the input dtype."""
from __future__ import annotations

import torch
from common import Table, dtype_name, dtypes_from, fwd_bwd, maybe_compile, parser

import tmd_ext
from tmd_ext import reference

# [B, T, D]: Wan 1.3B at 480p/81 frames has T = 21·30·52 = 32760 tokens of width 1536 (14B: 5120)
WAN_SHAPES = [(1, 32760, 1536), (1, 32760, 5120), (2, 1024, 1536), (2, 1024, 5120)]


def add_cases(table: Table, shape: tuple[int, int, int], dt: torch.dtype, compile: bool = True,
              reps: int | None = None) -> None:
    """The forward and forward+backward cases of one shape and dtype (a fresh compile for each)."""
    dev = table.device
    b, t, d = shape
    m, z = (torch.randn(b, t, d, device=dev, dtype=dt) for _ in range(2))
    gate = torch.randn(b, d, device=dev, dtype=dt)
    alpha = torch.randn((), device=dev, dtype=dt)
    es = m.element_size()
    btd, bd = b * t * d, b * d
    case = f"{b}x{t}x{d} {dtype_name(dt)}"
    ref_c = maybe_compile(reference.gated_fusion, compile)
    table.add_case(case + " fwd", (3 * btd + bd) * es, {
        "tmd": lambda: tmd_ext.gated_fusion(m, z, gate, alpha),
        "eager": lambda: reference.gated_fusion(m, z, gate, alpha),
        "compile": (lambda: ref_c(m, z, gate, alpha)) if ref_c else None,
    }, reps)

    leaves = [x.detach().requires_grad_() for x in (m, z, gate, alpha)]
    g = torch.randn_like(m)
    ref_cb = maybe_compile(reference.gated_fusion, compile)
    table.add_case(case + " fwd+bwd", (8 * btd + 3 * bd) * es, {
        "tmd": fwd_bwd(tmd_ext.gated_fusion, leaves, leaves, g),
        "eager": fwd_bwd(reference.gated_fusion, leaves, leaves, g),
        "compile": fwd_bwd(ref_cb, leaves, leaves, g) if ref_cb else None,
    }, reps)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    shapes = [(1, 1024, 1536)] if args.small else [(1, 32760, 1536), (4, 32760, 1536)]
    if dev == "cpu" and not args.small:
        shapes = shapes[:1]
    table = Table("gated_fusion", dev)
    for shape in shapes:
        for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
            add_cases(table, shape, dt, not args.no_compile, args.reps)
    table.print()
    if args.save:
        table.save()

if __name__ == "__main__":
    main()
