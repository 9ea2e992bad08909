"""gated_fusion_linear with its residual operand (``z = x·Wᵀ + b + e``): kernel vs reference
(forward and every gradient, residual included), gate = 0 identity, gradcheck/gradgradcheck,
opcheck (schema, fake kernel, autograd registration), the backward op's grad_residual, bad input,
and on sm_90a the CUTLASS epilogue with the residual (Wan shapes, odd sizes, declined cases)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

NAMES = ("m", "x", "weight", "bias", "gate", "alpha", "residual")


def inputs(shape, dtype, device, gen, bias=True, requires_grad=False):
    """m, x, weight, bias (or None), gate, alpha, residual: fresh noise, z = x·Wᵀ of order 1."""
    b, t, d, k = shape

    def r(*s, scale=1.0):
        return (randn(*s, dtype=torch.float64, gen=gen) * scale).to(device=device, dtype=dtype).requires_grad_(
            requires_grad)

    m, x = r(b, t, d), r(b, t, k)
    weight = r(d, k, scale=k**-0.5)
    bi = r(d) if bias else None
    gate, e = r(b, d), r(b, t, d)
    alpha = r(1).detach().reshape(()).requires_grad_(requires_grad)
    return m, x, weight, bi, gate, alpha, e


def call(fn, args):
    m, x, w, b, g, a, e = args
    return fn(m, x, w, b, g, a, residual=e)


def grads(fn, args, grad_out):
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    out = call(fn, leaves)
    tensors = [a for a in leaves if a is not None]
    gs = iter(torch.autograd.grad(out, tensors, grad_out))
    return out, [next(gs) if a is not None else None for a in leaves]


def assert_close_scaled(got, want, dtype):
    tol = TOL[dtype]
    scale = max(1.0, want.detach().abs().max().item())
    torch.testing.assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 5), (2, 9, 40, 24)])
def test_residual_matches_reference(shape, dtype, bias, device, gen):
    args = inputs(shape, dtype, device, gen, bias)
    g = randn(*shape[:3], dtype=dtype, device=device, gen=gen)
    out, got = grads(tmd_ext.gated_fusion_linear, args, g)
    want_out, want = grads(reference.gated_fusion_linear, args, g)
    assert out.dtype == dtype and out.shape == shape[:3]
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    # the residual really enters z: without it the result is different
    without = tmd_ext.gated_fusion_linear(*args[:6])
    assert not torch.allclose(without.double(), out.double(), atol=0.05, rtol=0)
    for name, a, w, x in zip(NAMES, got, want, args, strict=True):
        if x is None:
            assert a is None, name
            continue
        assert a.shape == x.shape and a.dtype == dtype, name
        assert_close_scaled(a, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_residual_noncontiguous(device, gen):
    args = inputs((2, 6, 24, 20), torch.float32, device, gen)
    nc = tuple(noncontig(a) if a is not None and a.dim() > 0 else a for a in args)
    g = randn(2, 6, 24, device=device, gen=gen)
    out, got = grads(tmd_ext.gated_fusion_linear, nc, noncontig(g))
    want_out, want = grads(reference.gated_fusion_linear, args, g)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    for a, w in zip(got, want, strict=True):
        assert_close_scaled(a, w, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_residual_gate_zero_is_identity(device, gen):
    m, x, w, b, gate, alpha, e = inputs((2, 5, 16, 8), torch.bfloat16, device, gen)
    out = tmd_ext.gated_fusion_linear(m, x, w, b, torch.zeros_like(gate), alpha, residual=e)
    assert torch.equal(out, m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_residual_gradcheck(bias, device, gen):
    args = inputs((2, 3, 5, 4), torch.float64, device, gen, bias, requires_grad=True)
    given = [a for a in args if a is not None]

    def f(*ts):
        it = iter(ts)
        return call(tmd_ext.gated_fusion_linear, [next(it) if a is not None else None for a in args])

    assert torch.autograd.gradcheck(f, given)
    assert torch.autograd.gradgradcheck(f, given)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_opcheck(device, dtype, gen):
    args = inputs((2, 3, 8, 16), dtype, device, gen, requires_grad=dtype == torch.float32)
    torch.library.opcheck(torch.ops.tmd.gated_fusion_linear.default, args)
    g = randn(2, 3, 8, dtype=dtype, device=device, gen=gen)
    detached = tuple(a.detach() for a in args)
    torch.library.opcheck(torch.ops.tmd.gated_fusion_linear_backward.default, (g, *detached))


def test_backward_grad_residual(gen):
    """The backward op's seventh output: grad_z = g·λ (dtype of m) with a residual, a 0-element
    tensor without one."""
    m, x, w, b, gate, alpha, e = inputs((1, 2, 3, 4), torch.float32, "cpu", gen)
    g = randn(1, 2, 3, gen=gen)
    with_e = torch.ops.tmd.gated_fusion_linear_backward(g, m, x, w, b, gate, alpha, e)
    lam = torch.sigmoid(alpha) * gate[:, None, :]
    torch.testing.assert_close(with_e[6], g * lam)
    without = torch.ops.tmd.gated_fusion_linear_backward(g, m, x, w, b, gate, alpha)
    assert len(without) == 7 and without[6].numel() == 0


def test_residual_bad_input(gen):
    m, x, w, b, gate, alpha, e = inputs((2, 3, 4, 5), torch.float32, "cpu", gen)
    for bad in (e[:, :2], e.double(), e[0], e.int()):
        with pytest.raises((ValueError, RuntimeError), match="residual"):
            tmd_ext.gated_fusion_linear(m, x, w, b, gate, alpha, residual=bad)
        with pytest.raises(RuntimeError, match="residual"):
            torch.ops.tmd.gated_fusion_linear(m, x, w, b, gate, alpha, bad)


def test_residual_empty_tokens(gen):
    """K = 0: z = bias + residual (the reference's result)."""
    m, x, w, b, gate, alpha, e = inputs((2, 3, 4, 5), torch.float32, "cpu", gen)
    out = tmd_ext.gated_fusion_linear(m, x[..., :0], w[:, :0], b, gate, alpha, residual=e)
    torch.testing.assert_close(out, reference.gated_fusion_linear(m, x[..., :0], w[:, :0], b, gate, alpha, e))


# ------------------------------------------------------------------------------ sm_90a (CUDA)


def _oracle(out, args):
    """Error vs float64 at most twice that of the same math in the low precision (+ one ulp)."""
    m, x, w, b, gate, alpha, e = args
    ref = reference.gated_fusion_linear(*[a.double() if a is not None else None for a in args])
    z = torch.nn.functional.linear(x, w, b) + e
    base = m + torch.sigmoid(alpha) * gate[:, None, :] * (z - m)
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    ref_low = ref.to(out.dtype)
    atol = 2 * (ref_low + 0.3 - 0.3 - ref_low).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * base_err + atol, f"max error {err:.3e} vs low-precision math {base_err:.3e}"


def _gemm_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [ev.key for ev in prof.key_averages() if "device_kernel" in ev.key and "GemmUniversal" in ev.key]


def _sm90_build() -> bool:
    return torch.cuda.get_device_capability() == (9, 0) and tmd_ext.build_info()["cutlass_sm90"]


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4096, 1536, 1536), (1, 333, 5120, 5120), (3, 130, 264, 72), (2, 1, 64, 128)])
def test_cuda_residual_epilogue(shape, dtype, bias, gen):
    """The fused epilogue with the residual (on sm_90a the CUTLASS kernel, checked by the profiler),
    judged against float64; a poisoned output buffer cannot pass (every element is written)."""
    args = inputs(shape, dtype, "cuda", gen, bias)
    box = {}
    names = _gemm_kernels(lambda: box.setdefault("out", call(tmd_ext.gated_fusion_linear, args)))
    if _sm90_build():
        assert names, "the CUTLASS sm90 kernel did not run"
    _oracle(box["out"], args)


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", ["pingpong", "cooperative_128x256"])
@pytest.mark.parametrize("shape", [(1, 4096, 1536, 1536), (2, 333, 5120, 1536), (3, 130, 264, 72)])
def test_cuda_sm90_schedules(shape, schedule, gen, monkeypatch):
    """TMD_GFL_SM90_SCHEDULE: the alternative CUTLASS schedules of the model's path (bf16, bias, residual)
    run a kernel other than the default one and compute the same function; a bad value is an error naming
    the variable."""
    if not _sm90_build():
        pytest.skip("the CUTLASS sm_90a kernels run on an sm_90a build on compute capability 9.0 only")
    args = inputs(shape, torch.bfloat16, "cuda", gen)
    box = {}
    default = _gemm_kernels(lambda: box.setdefault("default", call(tmd_ext.gated_fusion_linear, args)))
    monkeypatch.setenv("TMD_GFL_SM90_SCHEDULE", schedule)
    names = _gemm_kernels(lambda: box.setdefault("out", call(tmd_ext.gated_fusion_linear, args)))
    assert names and default and set(names) != set(default), (names, default)
    _oracle(box["out"], args)
    monkeypatch.setenv("TMD_GFL_SM90_SCHEDULE", "fastest")
    with pytest.raises(RuntimeError, match="TMD_GFL_SM90_SCHEDULE='fastest'"):
        call(tmd_ext.gated_fusion_linear, args)


@pytest.mark.cuda
def test_cuda_residual_misaligned_declines(gen):
    """A residual one element into its buffer (not 16-byte aligned): the sm90 path declines and
    the generic path gives the same function."""
    args = list(inputs((2, 64, 128, 64), torch.bfloat16, "cuda", gen))
    e = args[6]
    shifted = torch.empty(e.numel() + 1, dtype=e.dtype, device="cuda")[1:].view(e.shape).copy_(e)
    args[6] = shifted
    box = {}
    names = _gemm_kernels(lambda: box.setdefault("out", call(tmd_ext.gated_fusion_linear, args)))
    assert not names
    _oracle(box["out"], args)


@pytest.mark.cuda
def test_cuda_residual_cuda_graph(gen):
    """The op (forward and backward) can be captured in a CUDA graph and replays with new inputs."""
    args = [a.requires_grad_() if a is not None and a.dim() > 0 else a
            for a in inputs((2, 128, 256, 128), torch.bfloat16, "cuda", gen)]
    g = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16)
    leaves = [a for a in args if a is not None and a.requires_grad]

    def step():
        return torch.autograd.grad(call(tmd_ext.gated_fusion_linear, args), leaves, g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    with torch.no_grad():
        for a in leaves:
            a.copy_(torch.randn_like(a))
    graph.replay()
    want = step()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)

