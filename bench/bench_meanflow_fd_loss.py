"""Benchmark of tmd_ext.meanflow_fd_loss (forward, and forward+backward w.r.t. u) against the eager
reference and torch.compile of the reference. Every row takes the finite difference (s != r), so
every provider must read all four inputs. Bytes model: forward reads u, u_plus, u_minus, v once
(4 tensors; the [B] outputs are negligible). Forward+backward: in fp32 (fp64) the forward also writes
Δ, which the backward reads before writing grad_u (4 + 1 + 2 = 7 tensors); in 16-bit dtypes the
backward reads the 4 inputs again and writes grad_u (4 + 5 = 9), as much traffic as an fp32 Δ would
cost."""
from __future__ import annotations

import torch
from common import Table, dtype_name, dtypes_from, fwd_bwd, maybe_compile, parser

import tmd_ext
from tmd_ext import reference

# latent [B, C, F, H, W]: Wan 1.3B at 480p/81 frames is [B, 16, 21, 60, 104]; [2, 16, 1, 32, 128]
# is T = 1024 tokens per sample
WAN_SHAPES = [(1, 16, 21, 60, 104), (2, 16, 21, 60, 104), (2, 16, 1, 32, 128)]


def add_cases(table: Table, shape: tuple[int, ...], dt: torch.dtype, compile: bool = True,
              reps: int | None = None) -> None:
    """The forward and forward+backward cases of one shape and dtype (a fresh compile for each)."""
    dev = table.device
    b = shape[0]
    c = float(torch.Size(shape[1:]).numel())  # c = d, the 1.3B setting
    u, u_plus, v = (torch.randn(shape, device=dev, dtype=dt) for _ in range(3))
    u_minus = u_plus + 0.01 * torch.randn_like(u_plus)
    s = 0.1 + 0.8 * torch.rand(b, device=dev)
    r = s * 0.5
    s_plus, s_minus = s + 5e-3, s - 5e-3
    rest = (u_plus, u_minus, v, s, r, s_plus, s_minus, c)
    n = u.numel() * u.element_size()
    case = f"{'x'.join(map(str, shape))} {dtype_name(dt)}"
    ref_c = maybe_compile(reference.meanflow_fd_loss, compile)
    table.add_case(case + " fwd", 4 * n, {
        "tmd": lambda: tmd_ext.meanflow_fd_loss(u, *rest),
        "eager": lambda: reference.meanflow_fd_loss(u, *rest),
        "compile": (lambda: ref_c(u, *rest)) if ref_c else None,
    }, reps)
    leaf = u.detach().requires_grad_()
    g_loss, g_mse = torch.full((b,), 1.0 / b, device=dev), torch.full((b,), 0.1, device=dev)
    ref_cb = maybe_compile(reference.meanflow_fd_loss, compile)
    keeps_delta = dt in (torch.float32, torch.float64)
    table.add_case(case + " fwd+bwd", (7 if keeps_delta else 9) * n, {
        "tmd": fwd_bwd(tmd_ext.meanflow_fd_loss, (leaf, *rest), [leaf], (g_loss, g_mse)),
        "eager": fwd_bwd(reference.meanflow_fd_loss, (leaf, *rest), [leaf], (g_loss, g_mse)),
        "compile": fwd_bwd(ref_cb, (leaf, *rest), [leaf], (g_loss, g_mse)) if ref_cb else None,
    }, reps)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    shapes = [(2, 16, 3, 16, 16)] if args.small else [(8, 16, 21, 60, 104)]
    if dev == "cpu" and not args.small:
        shapes = [(1, 16, 21, 60, 104)]
    table = Table("meanflow_fd_loss", dev)
    for shape in shapes:
        for dt in dtypes_from(args.dtypes, ["bf16", "fp32"]):
            add_cases(table, shape, dt, not args.no_compile, args.reps)
    table.print()
    if args.save:
        table.save()

if __name__ == "__main__":
    main()
