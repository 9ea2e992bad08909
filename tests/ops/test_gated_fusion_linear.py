"""gated_fusion_linear: kernel vs reference (forward and gradients, with and without bias), the
identity at gate=0, gradcheck, registration, compile, bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

# (B, T, D, K): T=1 with odd D, K (scalar path); D=1536 with a short K; a long K=1536 reduction.
SHAPES = [(1, 1, 7, 5), (2, 3, 1536, 64), (2, 17, 64, 1536)]
NAMES = ("m", "x", "weight", "bias", "gate", "alpha")


def inputs(shape, dtype, device, gen, bias=True, requires_grad=False):
    """m, x, weight, bias (or None), gate, alpha; x and weight scaled so z is O(1)."""
    b, t, d, k = shape

    def r(*s, scale=1.0):
        return (randn(*s, dtype=torch.float64, device=device, gen=gen) * scale).to(dtype).requires_grad_(
            requires_grad)

    m, x = r(b, t, d), r(b, t, k)
    weight = r(d, k, scale=k**-0.5)
    bi = r(d) if bias else None
    gate = r(b, d)
    alpha = r(1).detach().reshape(()).requires_grad_(requires_grad)
    return m, x, weight, bi, gate, alpha


def assert_close_scaled(got, want, dtype):
    """assert_close with the absolute tolerance scaled by the magnitude of `want` (gradients of
    weight/bias/gate/alpha are sums over tokens)."""
    tol = TOL[dtype]
    scale = max(1.0, want.detach().abs().max().item())
    torch.testing.assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"])


def grads(fn, args, grad_out):
    """fn(*args) and its gradients w.r.t. every tensor argument (None for a None argument)."""
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    out = fn(*leaves)
    tensors = [a for a in leaves if a is not None]
    gs = iter(torch.autograd.grad(out, tensors, grad_out))
    return out, [next(gs) if a is not None else None for a in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, bias, device, gen):
    args = inputs(shape, dtype, device, gen, bias)
    out = tmd_ext.gated_fusion_linear(*args)
    assert out.dtype == dtype and out.shape == shape[:3] and out.is_contiguous()
    torch.testing.assert_close(out, reference.gated_fusion_linear(*args), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grads_match_reference(shape, dtype, bias, device, gen):
    args = inputs(shape, dtype, device, gen, bias)
    g = randn(*shape[:3], dtype=dtype, device=device, gen=gen)
    _, got = grads(tmd_ext.gated_fusion_linear, args, g)
    _, want = grads(reference.gated_fusion_linear, args, g)
    for name, a, w, x in zip(NAMES, got, want, args, strict=True):
        if x is None:
            assert a is None, name
            continue
        assert a.shape == x.shape and a.dtype == dtype, name
        assert_close_scaled(a, w, dtype)


def test_grad_bias_none_is_none(gen):
    """Without bias, autograd gets no gradient for it (the op's [D] grad_bias is dropped)."""
    m, x, weight, _, gate, alpha = inputs((1, 2, 3, 4), torch.float32, "cpu", gen, bias=False, requires_grad=True)
    grads_ = torch.ops.tmd.gated_fusion_linear_backward(torch.ones(1, 2, 3), m, x, weight, None, gate, alpha)
    assert grads_[3].shape == (3,)
    tmd_ext.gated_fusion_linear(m, x, weight, None, gate, alpha).sum().backward()
    assert all(t.grad is not None for t in (m, x, weight, gate, alpha))


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous(device, gen):
    shape = (2, 6, 24, 20)
    m, x, weight, bias, gate, alpha = inputs(shape, torch.float32, device, gen)
    g = randn(*shape[:3], dtype=torch.float32, device=device, gen=gen)
    nc = (noncontig(m), x.transpose(0, 1).contiguous().transpose(0, 1), weight.t().contiguous().t(),
          noncontig(bias), noncontig(gate), alpha)
    assert not any(t.is_contiguous() for t in nc[:5])
    out, got = grads(tmd_ext.gated_fusion_linear, nc, noncontig(g))
    want_out, want = grads(reference.gated_fusion_linear, (m, x, weight, bias, gate, alpha), g)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    for a, w in zip(got, want, strict=True):
        assert_close_scaled(a, w, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned(dtype, device, gen):
    """m, bias and gate as contiguous views one element into their buffer (the CUDA scalar
    fallback of the elementwise kernels; the sm_90a path declines such pointers)."""
    shape = (2, 5, 64, 32)
    m, x, weight, bias, gate, alpha = inputs(shape, dtype, device, gen)

    def shifted(t):
        return torch.empty(t.numel() + 1, dtype=dtype, device=device)[1:].view(t.shape).copy_(t)

    g = randn(*shape[:3], dtype=dtype, device=device, gen=gen)
    args = (shifted(m), x, weight, shifted(bias), shifted(gate), alpha)
    out, got = grads(tmd_ext.gated_fusion_linear, args, g)
    want_out, want = grads(reference.gated_fusion_linear, (m, x, weight, bias, gate, alpha), g)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    for a, w in zip(got, want, strict=True):
        assert_close_scaled(a, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_zero_is_identity(dtype, device, gen):
    """gate = 0 (the initialisation) returns m bit for bit, whatever x, weight, bias, alpha are."""
    m, x, weight, bias, gate, alpha = inputs((2, 9, 40, 24), dtype, device, gen)
    out = tmd_ext.gated_fusion_linear(m, x, weight, bias, torch.zeros_like(gate), alpha)
    assert torch.equal(out, m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(bias, device, gen):
    args = inputs((2, 3, 5, 4), torch.float64, device, gen, bias, requires_grad=True)
    assert torch.autograd.gradcheck(tmd_ext.gated_fusion_linear, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, bias, gen):
    args = inputs((2, 3, 8, 16), dtype, device, gen, bias, requires_grad=dtype == torch.float32)
    torch.library.opcheck(torch.ops.tmd.gated_fusion_linear.default, args)
    g = randn(2, 3, 8, dtype=dtype, device=device, gen=gen)
    detached = tuple(a.detach() if a is not None else None for a in args)
    torch.library.opcheck(torch.ops.tmd.gated_fusion_linear_backward.default, (g, *detached))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_compile_fullgraph(bias, device, gen):
    """Forward + backward through the public function under torch.compile(fullgraph=True). On CPU
    only the bias case generates code with inductor; the other runs aot_eager (dynamo and AOTAutograd
    through the fake kernels, no codegen), which keeps the suite fast."""
    backend = "inductor" if bias or device == "cuda" else "aot_eager"
    args = inputs((2, 4, 16, 12), torch.float32, device, gen, bias, requires_grad=True)
    leaves = [a for a in args if a is not None]

    def f(m, x, weight, b, gate, alpha):
        return (tmd_ext.gated_fusion_linear(m, x, weight, b, gate, alpha) * 2).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=backend)(*args)
    got.backward()
    got_grads = [a.grad.clone() for a in leaves]
    for a in leaves:
        a.grad = None
    want = f(*args)
    want.backward()
    torch.testing.assert_close(got, want)
    for gc, a in zip(got_grads, leaves, strict=True):
        torch.testing.assert_close(gc, a.grad)


def test_bad_input(gen):
    m, x, weight, bias, gate, alpha = inputs((2, 3, 4, 5), torch.float32, "cpu", gen)
    cases = [
        ((m, x, weight[:, :4], bias, gate, alpha), "weight"),
        ((m, x, weight[:3], bias, gate, alpha), "weight"),
        ((m, x[:, :2], weight, bias, gate, alpha), "x"),
        ((m, x, weight, bias[:3], gate, alpha), "bias"),
        ((m, x, weight, bias.double(), gate, alpha), "bias"),
        ((m, x, weight, bias, gate[:1], alpha), "gate"),
        ((m, x, weight, bias, gate, alpha.reshape(1)), "alpha"),
        ((m, x, weight.int(), bias, gate, alpha), "weight"),
        ((m, x[0], weight, bias, gate, alpha), "x"),
        ((m[0], x, weight, bias, gate, alpha), "m"),
    ]
    for args, name in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            tmd_ext.gated_fusion_linear(*args)
        with pytest.raises(RuntimeError, match=name):  # the C++ checks, for direct op callers
            torch.ops.tmd.gated_fusion_linear(*args)
    # empty inputs: the public function returns the reference's result (test_empty); the kernels reject them
    for args, name in (((m, x[..., :0], weight[:, :0], bias, gate, alpha), "x"),
                       ((m[:, :0], x[:, :0], weight, bias, gate, alpha), "m")):
        with pytest.raises(RuntimeError, match=name):
            torch.ops.tmd.gated_fusion_linear(*args)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.tmd.gated_fusion_linear_backward(randn(2, 3, 5, gen=gen), m, x, weight, bias, gate, alpha)


@pytest.mark.cuda
def test_bad_device(gen):
    m, x, weight, bias, gate, alpha = inputs((2, 3, 4, 5), torch.float32, "cuda", gen)
    with pytest.raises((ValueError, RuntimeError), match="weight"):
        tmd_ext.gated_fusion_linear(m, x, weight.cpu(), bias, gate, alpha)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.tmd.gated_fusion_linear(m, x, weight, bias.cpu(), gate, alpha)
