"""Benchmark of tmd_ext.adaln_modulate (forward, and forward+backward) against the eager reference
and torch.compile of the reference.

Bytes model (shared by every provider; N = B·T·D elements of size e, stats of size a = 4, 8 for
fp64): the forward reads x (N·e) and shift, scale (2·B·D·e) and writes out (N·e) and mean, rstd
(2·B·T·a); the backward reads grad_out, x (2·N·e), scale (B·D·e), mean, rstd (2·B·T·a) and writes
grad_x (N·e), grad_shift, grad_scale (2·B·D·e). fwd+bwd counts both."""
from __future__ import annotations

from functools import partial

import torch
from common import Table, dtype_name, dtypes_from, fwd_bwd, maybe_compile, parser

import tmd_ext
from tmd_ext import reference


def bytes_moved(b: int, t: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(forward bytes, forward+backward bytes) of the model above."""
    e = torch.empty((), dtype=dtype).element_size()
    a = 8 if dtype == torch.float64 else 4
    n, bd, bt = b * t * d, b * d, b * t
    fwd = 2 * n * e + 2 * bd * e + 2 * bt * a
    bwd = 3 * n * e + 3 * bd * e + 2 * bt * a
    return fwd, fwd + bwd


# x [B, T, D]: Wan 1.3B (D=1536) and 14B (D=5120) at 480p/81 frames have T = 21·30·52 = 32760
WAN_SHAPES = [(1, 32760, 1536), (1, 32760, 5120), (2, 1024, 1536), (2, 1024, 5120)]


def add_cases(table: Table, shape: tuple[int, int, int], dt: torch.dtype, compile: bool = True,
              reps: int | None = None) -> None:
    """The forward and forward+backward cases of one shape and dtype (a fresh compile for each)."""
    dev = table.device
    b, _, d = shape
    x = torch.randn(shape, device=dev, dtype=dt)
    shift, scale = (0.1 * torch.randn(b, d, device=dev, dtype=dt) for _ in range(2))
    fwd_bytes, fwd_bwd_bytes = bytes_moved(*shape, dt)
    case = f"{'x'.join(map(str, shape))} {dtype_name(dt)}"
    ref_c = maybe_compile(reference.adaln_modulate, compile)
    table.add_case(case + " fwd", fwd_bytes, {
        "tmd": partial(tmd_ext.adaln_modulate, x, shift, scale),
        "eager": partial(reference.adaln_modulate, x, shift, scale),
        "compile": partial(ref_c, x, shift, scale) if ref_c else None,
    }, reps)

    leaves = [t.detach().requires_grad_() for t in (x, shift, scale)]
    g = torch.randn_like(x)
    ref_c = maybe_compile(reference.adaln_modulate, compile)
    table.add_case(case + " fwd+bwd", fwd_bwd_bytes, {
        "tmd": fwd_bwd(tmd_ext.adaln_modulate, leaves, leaves, g),
        "eager": fwd_bwd(reference.adaln_modulate, leaves, leaves, g),
        "compile": fwd_bwd(ref_c, leaves, leaves, g) if ref_c else None,
    }, reps)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    shapes = [(1, 1024, 1536)] if args.small else WAN_SHAPES[:2]
    if dev == "cpu" and not args.small:
        shapes = shapes[:1]
    table = Table("adaln_modulate", dev)
    for shape in shapes:
        for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
            add_cases(table, shape, dt, not args.no_compile, args.reps)
    table.print()
    if args.save:
        table.save()

if __name__ == "__main__":
    main()
