"""adaln_modulate: kernel vs reference (forward, statistics, gradients), registration, compile,
determinism, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

# (1,1,7): one row, D not a multiple of any vector width; (3,1,64): T=1, a warp per row;
# (2,5,1536) / (2,3,5120): the head widths; (2,70,96): several chunks of T in the backward;
# (1,2,16385): odd and wider than the register cache of the CUDA kernels (streaming kernels).
SHAPES = [(1, 1, 7), (3, 1, 64), (2, 5, 1536), (2, 3, 5120), (2, 70, 96), (1, 2, 16385)]


def inputs(shape, dtype, device, gen, requires_grad=False):
    b, _, d = shape
    x = randn(*shape, dtype=dtype, device=device, gen=gen, requires_grad=requires_grad)
    shift = randn(b, d, dtype=dtype, device=device, gen=gen, requires_grad=requires_grad)
    scale = randn(b, d, dtype=dtype, device=device, gen=gen, requires_grad=requires_grad)
    return x, shift, scale


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_stats(x, eps):
    xf = x.to(opmath(x.dtype))
    mean = xf.mean(-1)
    var = (xf - mean[..., None]).pow(2).mean(-1)
    return mean, torch.rsqrt(var + eps)


def grads(fn, args, grad_out, eps):
    leaves = [a.detach().requires_grad_() for a in args]
    out = fn(*leaves, eps)
    return torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, dtype, device, gen):
    x, shift, scale = inputs(shape, dtype, device, gen)
    out = tmd_ext.adaln_modulate(x, shift, scale)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    torch.testing.assert_close(out, reference.adaln_modulate(x, shift, scale), **TOL[dtype])
    out2, mean, rstd = torch.ops.tmd.adaln_modulate(x, shift, scale, 1e-6)
    assert torch.equal(out2, out)
    assert mean.dtype == rstd.dtype == opmath(dtype) and mean.shape == rstd.shape == shape[:2]
    want_mean, want_rstd = reference_stats(x, 1e-6)
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(mean, want_mean, **tol)
    torch.testing.assert_close(rstd, want_rstd, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape, dtype, device, gen):
    args = inputs(shape, dtype, device, gen)
    g = randn(*shape, dtype=dtype, device=device, gen=gen)
    got = grads(tmd_ext.adaln_modulate, args, g, 1e-6)
    want = grads(reference.adaln_modulate, args, g, 1e-6)
    for name, a, b in zip(("x", "shift", "scale"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=name: f"grad_{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_eps_and_constant_rows(device, eps, gen):
    """eps enters the variance; a constant row (var = 0) normalises to 0, so out = shift."""
    x, shift, scale = inputs((2, 6, 40), torch.float32, device, gen)
    if eps > 0:
        x[:, 0] = 3.0
    out = tmd_ext.adaln_modulate(x, shift, scale, eps)
    torch.testing.assert_close(out, reference.adaln_modulate(x, shift, scale, eps), **TOL[torch.float32])
    if eps > 0:
        torch.testing.assert_close(out[:, 0], shift, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_and_misaligned(device, dtype, gen):
    """Non-contiguous x; shift at an odd storage offset (a contiguous tensor whose data is not
    16-byte aligned: the CUDA kernels must fall back to scalar loads); scale transposed."""
    x, shift, scale = inputs((2, 3, 64), dtype, device, gen)
    buf = torch.empty(shift.numel() + 1, dtype=dtype, device=device)
    shift_off = buf[1:].view(shift.shape)
    shift_off.copy_(shift)
    assert shift_off.is_contiguous() and shift_off.data_ptr() % 16 != 0
    scale_t = scale.t().contiguous().t()
    args = (noncontig(x), shift_off, scale_t)
    out = tmd_ext.adaln_modulate(*args)
    torch.testing.assert_close(out, reference.adaln_modulate(x, shift, scale), **TOL[dtype])
    g = noncontig(randn(2, 3, 64, dtype=dtype, device=device, gen=gen))
    for a, b in zip(grads(tmd_ext.adaln_modulate, args, g, 1e-6),
                    grads(reference.adaln_modulate, (x, shift, scale), g, 1e-6), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 1, 5)])
def test_gradcheck(device, shape, gen):
    args = inputs(shape, torch.float64, device, gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s, c: tmd_ext.adaln_modulate(x, s, c, 1e-3), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, gen):
    args = inputs((2, 3, 20), dtype, device, gen, requires_grad=dtype == torch.float32)
    torch.library.opcheck(torch.ops.tmd.adaln_modulate.default, (*args, 1e-6))
    x, _, scale = (a.detach() for a in args)
    _, mean, rstd = torch.ops.tmd.adaln_modulate(x, args[1].detach(), scale, 1e-6)
    g = randn(2, 3, 20, dtype=dtype, device=device, gen=gen)
    torch.library.opcheck(torch.ops.tmd.adaln_modulate_backward.default, (g, x, scale, mean, rstd))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device, gen):
    args = inputs((2, 4, 24), torch.float32, device, gen, requires_grad=True)
    w = randn(2, 4, 24, device=device, gen=gen)

    def f(x, shift, scale):
        return (tmd_ext.adaln_modulate(x, shift, scale, 1e-5) * w).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    got.backward()
    grads_c = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    want = f(*args)
    want.backward()
    torch.testing.assert_close(got, want)
    for gc, a in zip(grads_c, args, strict=True):
        torch.testing.assert_close(gc, a.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device, gen):
    x, shift, scale = inputs((2, 300, 96), torch.float32, device, gen)
    _, mean, rstd = torch.ops.tmd.adaln_modulate(x, shift, scale, 1e-6)
    g = randn(2, 300, 96, device=device, gen=gen)
    first = torch.ops.tmd.adaln_modulate_backward(g, x, scale, mean, rstd)
    for _ in range(3):
        again = torch.ops.tmd.adaln_modulate_backward(g, x, scale, mean, rstd)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


def test_cpu_backward_with_capped_chunks(gen):
    """Per sample more tokens than 64 chunks of the CPU backward's grain (T·D > 64·16384): the chunks
    grow past the grain (625 tokens here); grad_shift/grad_scale still equal the reference's column
    sums, and 1 and 2 threads give the same bits."""
    shape = (2, 40000, 33)
    args = inputs(shape, torch.float32, "cpu", gen)
    g = randn(*shape, gen=gen)
    want = grads(reference.adaln_modulate, [a.double() for a in args], g.double(), 1e-6)
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(grads(tmd_ext.adaln_modulate, args, g, 1e-6))
    finally:
        torch.set_num_threads(before)
    for name, a, b, w in zip(("x", "shift", "scale"), *got, want, strict=True):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a.double(), w, atol=1e-4 * max(1.0, w.abs().max().item()), rtol=1e-4,
                                   msg=lambda m, n=name: f"grad_{n}: {m}")


def test_bad_input(gen):
    x, shift, scale = inputs((2, 3, 4), torch.float32, "cpu", gen)
    cases = [
        ((x[0], shift, scale, 1e-6), "x"),
        ((x.int(), shift, scale, 1e-6), "x"),
        ((x, shift[:, :3], scale, 1e-6), "shift"),
        ((x, shift, scale[:1], 1e-6), "scale"),
        ((x, shift.double(), scale, 1e-6), "shift"),
        ((x, shift, scale.half(), 1e-6), "scale"),
        ((x, shift, scale, float("nan")), "eps"),
        ((x, shift, scale, float("inf")), "eps"),
        ((x, shift, scale, -1e-6), "eps"),
    ]
    for args, name in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            tmd_ext.adaln_modulate(*args)
        with pytest.raises(RuntimeError, match=name):  # the C++ checks, for direct op callers
            torch.ops.tmd.adaln_modulate(*args)
    # empty inputs: the public function returns the reference's result (test_empty); the kernels reject them
    for args in ((x[:0], shift[:0], scale[:0], 1e-6), (x[:, :0], shift, scale, 1e-6),
                 (x[..., :0], shift[:, :0], scale[:, :0], 1e-6)):
        with pytest.raises(RuntimeError, match="x"):
            torch.ops.tmd.adaln_modulate(*args)


def test_bad_backward_input(gen):
    x, shift, scale = inputs((2, 3, 4), torch.float32, "cpu", gen)
    _, mean, rstd = torch.ops.tmd.adaln_modulate(x, shift, scale, 1e-6)
    g = torch.randn_like(x)
    cases = [
        ((g[:, :2], x, scale, mean, rstd), "grad_out"),
        ((g, x.double(), scale, mean, rstd), "x"),
        ((g, x[:, :0], scale, mean[:, :0], rstd[:, :0]), "x"),
        ((g, x, scale[:, :3], mean, rstd), "scale"),
        ((g, x, scale, mean.double(), rstd), "mean"),
        ((g, x, scale, mean, rstd[:, :2]), "rstd"),
    ]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.tmd.adaln_modulate_backward(*args)


@pytest.mark.cuda
def test_bad_device(gen):
    x, shift, scale = inputs((2, 3, 4), torch.float32, "cuda", gen)
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        tmd_ext.adaln_modulate(x, shift, scale.cpu())
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.tmd.adaln_modulate(x, shift, scale.cpu(), 1e-6)
