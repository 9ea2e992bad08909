"""gated_fusion: kernel vs reference (forward and gradients), the identity at gate=0, gradcheck,
registration, compile, determinism, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

# (B, T, D): T=1, D=7 (scalar path), D=1536 (the Wan 1.3B width), several samples and tokens.
SHAPES = [(1, 1, 7), (2, 3, 1536), (2, 17, 64), (3, 5, 10)]


def scalar(dtype, device, gen, requires_grad=False) -> torch.Tensor:
    """A random 0-d tensor (the gate logit alpha)."""
    return randn(1, dtype=dtype, device=device, gen=gen).reshape(()).requires_grad_(requires_grad)


def inputs(shape, dtype, device, gen, requires_grad=False):
    b, t, d = shape
    m, z = (randn(b, t, d, dtype=dtype, device=device, gen=gen, requires_grad=requires_grad) for _ in range(2))
    gate = randn(b, d, dtype=dtype, device=device, gen=gen, requires_grad=requires_grad)
    return m, z, gate, scalar(dtype, device, gen, requires_grad)


def assert_close_scaled(got, want, dtype):
    """assert_close with the absolute tolerance scaled by the magnitude of `want` (sums over tokens
    grow with T)."""
    tol = TOL[dtype]
    scale = max(1.0, want.detach().abs().max().item())
    torch.testing.assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"])


def grads(fn, args, grad_out):
    leaves = [a.detach().requires_grad_() for a in args]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device, gen):
    args = inputs(shape, dtype, device, gen)
    out = tmd_ext.gated_fusion(*args)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    torch.testing.assert_close(out, reference.gated_fusion(*args), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grads_match_reference(shape, dtype, device, gen):
    args = inputs(shape, dtype, device, gen)
    g = randn(*shape, dtype=dtype, device=device, gen=gen)
    _, got = grads(tmd_ext.gated_fusion, args, g)
    _, want = grads(reference.gated_fusion, args, g)
    for name, a, w, x in zip(("m", "z", "gate", "alpha"), got, want, args, strict=True):
        assert a.shape == x.shape and a.dtype == dtype, name
        assert_close_scaled(a, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_grads(dtype, device, gen):
    """Many tokens: the backward sums g·(z-m) over several token chunks, the last one partial."""
    shape = (1, 5003, 1536)
    args = inputs(shape, dtype, device, gen)
    g = randn(*shape, dtype=dtype, device=device, gen=gen)
    out, got = grads(tmd_ext.gated_fusion, args, g)
    want_out, want = grads(reference.gated_fusion, args, g)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    for a, w in zip(got, want, strict=True):
        assert_close_scaled(a, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous(device, gen):
    m, z, gate, alpha = inputs((2, 6, 24), torch.float32, device, gen)
    g = randn(2, 6, 24, dtype=torch.float32, device=device, gen=gen)
    nc = (noncontig(m), z.transpose(0, 1).contiguous().transpose(0, 1), noncontig(gate), alpha)
    assert not any(t.is_contiguous() for t in nc[:3])
    out, got = grads(tmd_ext.gated_fusion, nc, noncontig(g))
    want_out, want = grads(reference.gated_fusion, (m, z, gate, alpha), g)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    for a, w in zip(got, want, strict=True):
        assert_close_scaled(a, w, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_misaligned(dtype, device, gen):
    """Contiguous views starting one element into their buffer (the CUDA scalar fallback)."""
    shape = (2, 5, 64)
    m, z, gate, alpha = inputs(shape, dtype, device, gen)
    mis = [torch.empty(t.numel() + 1, dtype=dtype, device=device)[1:].view(t.shape).copy_(t) for t in (m, z, gate)]
    g = randn(*shape, dtype=dtype, device=device, gen=gen)
    out, got = grads(tmd_ext.gated_fusion, (*mis, alpha), g)
    want_out, want = grads(reference.gated_fusion, (m, z, gate, alpha), g)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    for a, w in zip(got, want, strict=True):
        assert_close_scaled(a, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_zero_is_identity(dtype, device, gen):
    """gate = 0 (the initialisation) returns m bit for bit, whatever z and alpha are."""
    m, z, gate, alpha = inputs((2, 9, 40), dtype, device, gen)
    out = tmd_ext.gated_fusion(m, z, torch.zeros_like(gate), alpha)
    assert torch.equal(out, m)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    args = inputs((2, 3, 5), torch.float64, device, gen, requires_grad=True)
    assert torch.autograd.gradcheck(tmd_ext.gated_fusion, args)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device, gen):
    args = inputs((2, 301, 96), torch.float32, device, gen)
    g = randn(2, 301, 96, dtype=torch.float32, device=device, gen=gen)
    a = torch.ops.tmd.gated_fusion_backward(g, *args)
    b = torch.ops.tmd.gated_fusion_backward(g, *args)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, gen):
    args = inputs((2, 3, 8), dtype, device, gen, requires_grad=dtype == torch.float32)
    torch.library.opcheck(torch.ops.tmd.gated_fusion.default, args)
    g = randn(2, 3, 8, dtype=dtype, device=device, gen=gen)
    torch.library.opcheck(torch.ops.tmd.gated_fusion_backward.default, (g, *(a.detach() for a in args)))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device, gen):
    args = inputs((2, 4, 16), torch.float32, device, gen, requires_grad=True)

    def f(m, z, gate, alpha):
        return (tmd_ext.gated_fusion(m, z, gate, alpha) * 2).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    got.backward()
    got_grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    want = f(*args)
    want.backward()
    torch.testing.assert_close(got, want)
    for gc, a in zip(got_grads, args, strict=True):
        torch.testing.assert_close(gc, a.grad)


def test_bad_input(gen):
    m, z, gate, alpha = inputs((2, 3, 4), torch.float32, "cpu", gen)
    cases = [
        ((m, z[:, :2], gate, alpha), "z"),
        ((m, z, gate[:, :3], alpha), "gate"),
        ((m, z, gate, alpha.reshape(1)), "alpha"),
        ((m, z, gate, alpha.double()), "alpha"),
        ((m, z.half(), gate, alpha), "z"),
        ((m.int(), z, gate, alpha), "m"),
        ((m[0], z[0], gate, alpha), "m"),
    ]
    for args, name in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            tmd_ext.gated_fusion(*args)
        with pytest.raises(RuntimeError, match=name):  # the C++ checks, for direct op callers
            torch.ops.tmd.gated_fusion(*args)
    # empty inputs: the public function returns the reference's result (test_empty); the kernels reject them
    with pytest.raises(RuntimeError, match="m"):
        torch.ops.tmd.gated_fusion(m[:, :0], z[:, :0], gate, alpha)
    g = randn(2, 3, 5, gen=gen)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.tmd.gated_fusion_backward(g, m, z, gate, alpha)


@pytest.mark.cuda
def test_bad_device(gen):
    m, z, gate, alpha = inputs((2, 3, 4), torch.float32, "cuda", gen)
    with pytest.raises((ValueError, RuntimeError), match="gate"):
        tmd_ext.gated_fusion(m, z, gate.cpu(), alpha)
    with pytest.raises(RuntimeError, match="gate"):
        torch.ops.tmd.gated_fusion(m, z, gate.cpu(), alpha)
