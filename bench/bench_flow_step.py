"""Benchmark of tmd_ext.flow_step (forward, and forward+backward) against the eager reference
and torch.compile of the reference. Bytes model: forward reads y, head_out, y1 and writes out
(4 tensors); backward reads grad_out and writes grad_head_out, grad_y1 (3 tensors)."""
from __future__ import annotations

import torch
from common import Table, dtype_name, dtypes_from, fwd_bwd, maybe_compile, parser

import tmd_ext
from tmd_ext import reference

# latent [B, C, F, H, W]: Wan 1.3B at 480p/81 frames is [B, 16, 21, 60, 104] (T = 32760 tokens);
# [2, 16, 1, 32, 128] is T = 1024 tokens per sample
WAN_SHAPES = [(1, 16, 21, 60, 104), (2, 16, 21, 60, 104), (2, 16, 1, 32, 128)]


def add_cases(table: Table, shape: tuple[int, ...], dt: torch.dtype, compile: bool = True,
              reps: int | None = None) -> None:
    """The forward and forward+backward cases of one shape and dtype (a fresh compile for each)."""
    dev = table.device
    y, h, y1 = (torch.randn(shape, device=dev, dtype=dt) for _ in range(3))
    s = torch.rand(shape[0], device=dev)
    r = s * 0.5
    n = y.numel() * y.element_size()
    case = f"{'x'.join(map(str, shape))} {dtype_name(dt)}"
    ref_c = maybe_compile(reference.flow_step, compile)
    table.add_case(case + " fwd", 4 * n, {
        "tmd": lambda: tmd_ext.flow_step(y, h, y1, s, r),
        "eager": lambda: reference.flow_step(y, h, y1, s, r),
        "compile": (lambda: ref_c(y, h, y1, s, r)) if ref_c else None,
    }, reps)

    leaves = [t.detach().requires_grad_() for t in (y, h, y1)]
    g = torch.randn_like(y)
    ref_cb = maybe_compile(reference.flow_step, compile)
    table.add_case(case + " fwd+bwd", 7 * n, {
        "tmd": fwd_bwd(tmd_ext.flow_step, (*leaves, s, r), leaves, g),
        "eager": fwd_bwd(reference.flow_step, (*leaves, s, r), leaves, g),
        "compile": fwd_bwd(ref_cb, (*leaves, s, r), leaves, g) if ref_cb else None,
    }, reps)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    shapes = [(1, 16, 3, 16, 16)] if args.small else WAN_SHAPES[:2]
    if dev == "cpu" and not args.small:
        shapes = shapes[:1]
    table = Table("flow_step", dev)
    for shape in shapes:
        for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
            add_cases(table, shape, dt, not args.no_compile, args.reps)
    table.print()
    if args.save:
        table.save()

if __name__ == "__main__":
    main()
