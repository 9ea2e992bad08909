"""flow_step: kernel vs reference, gradients, registration, compile, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

SHAPES = [(1, 1), (3, 7), (2, 16, 1, 5, 7), (2, 1536), (4, 16, 3, 8, 8)]


def inputs(shape, dtype, device, gen, time_dtype=torch.float32, requires_grad=False):
    y, h, y1 = (randn(*shape, dtype=dtype, device=device, gen=gen, requires_grad=requires_grad)
                for _ in range(3))
    s = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(time_dtype).to(device)
    r = s * torch.rand(shape[0], generator=gen, dtype=torch.float64).to(time_dtype).to(device)
    return y, h, y1, s, r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device, gen):
    args = inputs(shape, dtype, device, gen)
    out = tmd_ext.flow_step(*args)
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out, reference.flow_step(*args), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("time_dtype", [torch.float32, torch.float64])
def test_time_dtypes_and_noncontiguous(device, time_dtype, gen):
    y, h, y1, s, r = inputs((3, 4, 2, 6, 5), torch.float32, device, gen, time_dtype)
    out = tmd_ext.flow_step(noncontig(y), h.transpose(-1, -2).contiguous().transpose(-1, -2), noncontig(y1), s, r)
    torch.testing.assert_close(out, reference.flow_step(y, h, y1, s, r), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_constant_velocity_is_exact(device, gen):
    """One step from s to r along y_s = (1-s)y + s·y1 lands on y_r when head_out = y (u = y1 - y)."""
    y, _, y1, s, r = inputs((4, 3, 2, 4, 4), torch.float64, device, gen, torch.float64)
    b = (-1, 1, 1, 1, 1)
    y_s = (1 - s.view(b)) * y + s.view(b) * y1
    y_r = tmd_ext.flow_step(y_s, y, y1, s, r)
    torch.testing.assert_close(y_r, (1 - r.view(b)) * y + r.view(b) * y1, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    args = inputs((2, 3, 5), torch.float64, device, gen, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tmd_ext.flow_step, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, gen):
    args = inputs((2, 3, 5), dtype, device, gen, requires_grad=dtype == torch.float32)
    torch.library.opcheck(torch.ops.tmd.flow_step.default, args)
    g = randn(2, 3, 5, dtype=dtype, device=device, gen=gen)
    torch.library.opcheck(torch.ops.tmd.flow_step_backward.default, (g, args[3], args[4]))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device, gen):
    args = inputs((2, 4, 6), torch.float32, device, gen, requires_grad=True)

    def f(y, h, y1, s, r):
        return (tmd_ext.flow_step(y, h, y1, s, r) * 2).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    got.backward()
    grads = [a.grad.clone() for a in args[:3]]
    for a in args[:3]:
        a.grad = None
    want = f(*args)
    want.backward()
    torch.testing.assert_close(got, want)
    for gc, a in zip(grads, args[:3], strict=True):
        torch.testing.assert_close(gc, a.grad)


def test_bad_input(gen):
    y, h, y1, s, r = inputs((2, 3, 4), torch.float32, "cpu", gen)
    cases = [
        ((y, h[:, :2], y1, s, r), "head_out"),
        ((y, h, y1.double(), s, r), "y1"),
        ((y, h, y1, s.half(), r), "s"),
        ((y, h, y1, s, r[:1]), "r"),
        ((y.int(), h, y1, s, r), "y"),
        ((torch.tensor(1.0), h, y1, s, r), "y"),
    ]
    for args, name in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            tmd_ext.flow_step(*args)
        with pytest.raises(RuntimeError, match=name):  # the C++ checks, for direct op callers
            torch.ops.tmd.flow_step(*args)
    # empty inputs: the public function returns the reference's result (test_empty); the kernels reject them
    with pytest.raises(RuntimeError, match="y"):
        torch.ops.tmd.flow_step(y[:0], h[:0], y1[:0], s[:0], r[:0])


@pytest.mark.cuda
def test_bad_device(gen):
    y, h, y1, s, r = inputs((2, 3, 4), torch.float32, "cuda", gen)
    with pytest.raises((ValueError, RuntimeError), match="y1"):
        tmd_ext.flow_step(y, h, y1.cpu(), s, r)
    with pytest.raises(RuntimeError, match="y1"):
        torch.ops.tmd.flow_step(y, h, y1.cpu(), s, r)
