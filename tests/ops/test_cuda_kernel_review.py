"""CUDA shapes that exercise the launch sizing and indexing of every kernel: grids with more rows
than resident blocks (adaln at (2, 4096, 1536) and (1, 2000, 5120), sized by the occupancy
calculator), D = 5120, odd D (the scalar paths, and 2049–4095 for the adaln backward), storage
offsets (misaligned views), bf16/fp16, more than 2³¹ elements (64-bit indexing), each op's forward
and backward captured in a CUDA graph and replayed on new inputs (no host sync in any op, the
meanflow times and flow_step coefficients read in-kernel), and meanflow's NaN for a zero
finite-difference step on CUDA (the check that would cost a host sync is not made there)."""
from __future__ import annotations

import pytest
import torch
from conftest import TOL, randn

import tmd_ext
from tmd_ext import reference

pytestmark = pytest.mark.cuda

LOW = [torch.bfloat16, torch.float16]


def offset(t: torch.Tensor) -> torch.Tensor:
    """The same values one element into a larger buffer (storage offset 1: not 16-byte aligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buf[1:].view(t.shape).copy_(t)


def fwd_bwd(fn, args, grad_out):
    leaves = [a.detach().requires_grad_() for a in args]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gos = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    pairs = [(o, g) for o, g in zip(outs, gos, strict=True) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs])
    return outs[0], grads


def check(fn, ref, args, grad_out, dtype, scale_grads=True):
    out, got = fwd_bwd(fn, args, grad_out)
    want_out, want = fwd_bwd(ref, args, grad_out)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    for a, w in zip(got, want, strict=True):
        s = max(1.0, w.abs().max().item()) if scale_grads else 1.0
        torch.testing.assert_close(a, w, atol=TOL[dtype]["atol"] * s, rtol=TOL[dtype]["rtol"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4096, 1536), (1, 2000, 5120), (2, 37, 3001), (1, 5, 1535)])
def test_adaln_grid_and_odd_widths(shape, dtype, gen):
    b, _, d = shape
    x = randn(*shape, dtype=dtype, device="cuda", gen=gen)
    sh, sc = (0.1 * randn(b, d, dtype=dtype, device="cuda", gen=gen) for _ in range(2))
    g = randn(*shape, dtype=dtype, device="cuda", gen=gen)
    check(lambda *a: tmd_ext.adaln_modulate(*a), lambda *a: reference.adaln_modulate(*a), (x, sh, sc), g, dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_adaln_storage_offset(dtype, gen):
    x = offset(randn(2, 64, 1536, dtype=dtype, device="cuda", gen=gen))
    sh, sc = (offset(0.1 * randn(2, 1536, dtype=dtype, device="cuda", gen=gen)) for _ in range(2))
    check(tmd_ext.adaln_modulate, reference.adaln_modulate, (x, sh, sc), torch.randn_like(x), dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(1, 2000, 5120), (2, 333, 1537)])
def test_gated_fusion_wide_and_odd(shape, dtype, gen):
    b, t, d = shape
    m, z = (randn(*shape, dtype=dtype, device="cuda", gen=gen) for _ in range(2))
    gate, alpha = randn(b, d, dtype=dtype, device="cuda", gen=gen), randn(dtype=dtype, device="cuda", gen=gen)
    args = (offset(m), z, gate, alpha) if d % 2 else (m, z, gate, alpha)
    check(tmd_ext.gated_fusion, reference.gated_fusion, args, torch.randn_like(m), dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_flow_step_and_meanflow_offsets(dtype, gen):
    shape = (3, 16, 2, 6, 10)
    y, h, y1 = (offset(randn(*shape, dtype=dtype, device="cuda", gen=gen)) for _ in range(3))
    s = torch.rand(3, generator=gen).cuda().double()
    got = tmd_ext.flow_step(y, h, y1, s, s * 0.5)
    torch.testing.assert_close(got, reference.flow_step(y, h, y1, s, s * 0.5), **TOL[dtype])
    u, up, um, v = (offset(randn(*shape, dtype=dtype, device="cuda", gen=gen)) for _ in range(4))
    r = torch.tensor([0.5, 0.1, 0.2], device="cuda", dtype=torch.float64)
    s = torch.tensor([0.5, 0.7, 0.9], device="cuda", dtype=torch.float32)  # row 0: s == r
    args = (u, up, um, v, s, r, s + 1e-2, s - 1e-2, 7.0)
    loss, mse = tmd_ext.meanflow_fd_loss(*args)
    want = reference.meanflow_fd_loss(*args)
    torch.testing.assert_close(loss, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mse, want[1], rtol=1e-4, atol=1e-5)


def test_meanflow_zero_step_gives_nan_row_on_cuda(gen):
    """On CUDA the value check is not made (it would sync): the bad row is NaN, the others exact."""
    u, up, um, v = (randn(3, 40, device="cuda", gen=gen) for _ in range(4))
    s = torch.tensor([0.5, 0.7, 0.9], device="cuda")
    r = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    sp, sm = s + 1e-2, s - 1e-2
    sp[1] = sm[1]
    loss, mse = tmd_ext.meanflow_fd_loss(u, up, um, v, s, r, sp, sm, 5.0)
    assert torch.isnan(loss[1]) and torch.isnan(mse[1])
    want = reference.meanflow_fd_loss(u, up, um, v, s, r, s + 1e-2, s - 1e-2, 5.0)
    torch.testing.assert_close(loss[[0, 2]], want[0][[0, 2]])


def test_more_than_2_31_elements(gen):
    """64-bit indexing: gated_fusion and adaln over 2³¹ + 1536·7 elements (bf16, ~4.3 GB per tensor);
    the last rows are compared with the reference computed on them alone (both ops are row-local)."""
    d = 1536
    t = (2**31) // d + 7
    m = torch.randn(1, t, d, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(m)
    gate, alpha = torch.randn(1, d, device="cuda", dtype=torch.bfloat16), torch.tensor(0.3, device="cuda",
                                                                                         dtype=torch.bfloat16)
    out = tmd_ext.gated_fusion(m, z, gate, alpha)
    tail = slice(t - 64, t)
    torch.testing.assert_close(out[:, tail], reference.gated_fusion(m[:, tail], z[:, tail], gate, alpha),
                               **TOL[torch.bfloat16])
    del out, z
    sh, sc = 0.1 * torch.randn(1, d, device="cuda", dtype=torch.bfloat16), 0.1 * torch.randn(
        1, d, device="cuda", dtype=torch.bfloat16)
    o, mean, rstd = torch.ops.tmd.adaln_modulate(m, sh, sc, 1e-6)
    torch.testing.assert_close(o[:, tail], reference.adaln_modulate(m[:, tail], sh, sc), **TOL[torch.bfloat16])
    del o, m
    torch.cuda.empty_cache()


def _capture_and_replay(step, inputs):
    """Captures step() (after a side-stream warm-up), refills `inputs` with new values, replays and
    compares with an eager step() on the new values."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    with torch.no_grad():
        for t in inputs:
            t.copy_(torch.randn_like(t) if t.is_floating_point() and t.dim() > 1 else t * 0.9)
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_fusion", "flow_step", "meanflow_fd_loss"])
def test_op_captured_in_cuda_graph(op, gen):
    dt = torch.bfloat16
    if op == "adaln_modulate":
        x = torch.randn(2, 64, 256, device="cuda", dtype=dt, requires_grad=True)
        sh, sc = (torch.randn(2, 256, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        g = torch.randn(2, 64, 256, device="cuda", dtype=dt)
        leaves, fn = [x, sh, sc], lambda: tmd_ext.adaln_modulate(x, sh, sc)
    elif op == "gated_fusion":
        m, z = (torch.randn(2, 64, 256, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        gate = torch.randn(2, 256, device="cuda", dtype=dt, requires_grad=True)
        alpha = torch.tensor(0.2, device="cuda", dtype=dt, requires_grad=True)
        g = torch.randn(2, 64, 256, device="cuda", dtype=dt)
        leaves, fn = [m, z, gate, alpha], lambda: tmd_ext.gated_fusion(m, z, gate, alpha)
    elif op == "flow_step":
        y, h, y1 = (torch.randn(2, 16, 2, 4, 8, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        s = torch.rand(2, device="cuda")
        r = s * 0.5
        g = torch.randn(2, 16, 2, 4, 8, device="cuda", dtype=dt)
        leaves, fn = [y, h, y1], lambda: tmd_ext.flow_step(y, h, y1, s, r)
    else:
        u = torch.randn(2, 16, 2, 4, 8, device="cuda", dtype=dt, requires_grad=True)
        up, um, v = (torch.randn(2, 16, 2, 4, 8, device="cuda", dtype=dt) for _ in range(3))
        s = torch.tensor([0.6, 0.8], device="cuda")
        r = torch.tensor([0.6, 0.3], device="cuda")
        sp, sm = s + 1e-2, s - 1e-2
        leaves = [u]
        g = torch.ones(2, device="cuda")

        def fn():
            return tmd_ext.meanflow_fd_loss(u, up, um, v, s, r, sp, sm, 10.0)[0]

    def step():
        out = fn()
        return (out.detach(), *torch.autograd.grad(out, leaves, g))

    _capture_and_replay(step, leaves)
