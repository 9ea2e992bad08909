"""The vector and parallel paths of the CPU kernels (csrc/core/cpu_vec.h, csrc/<op>/<op>_cpu_kernels.h):
every op against its reference, forward and gradients, on shapes whose rows are no multiple of the
vector width (odd D), that span several parallel tasks and sample boundaries, with non-contiguous
inputs; results that do not depend on the thread count; and the AVX-512 and AVX2 builds bit-identical to
the baseline build (``ATEN_CPU_CAPABILITY=default`` selects the latter, ``avx2`` the AVX2 build)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TOL, noncontig, randn
from support.run import ROOT

import tmd_ext
from tmd_ext import reference

# B = 2 samples of T = 97 tokens of width D = 203 (odd, no multiple of 8 or 16): 194 rows, more than
# the 80-row grain of the row-parallel kernels; flow_step's 16384-element tasks and
# meanflow_fd_loss's 4096-element chunks straddle the samples' 19691 elements.
B, T, D, K = 2, 97, 203, 24
OPS = ["adaln_modulate", "flow_step", "gated_fusion", "gated_fusion_linear", "meanflow_fd_loss"]


def case(op: str, dtype: torch.dtype, gen: torch.Generator):
    """(fn, args, grad_idx): `fn(*args)` returns a tuple of outputs; grad_idx are the differentiable args."""
    r = lambda *shape: randn(*shape, dtype=dtype, gen=gen)  # noqa: E731
    if op == "adaln_modulate":
        return (lambda f: lambda *a: (f(*a, 1e-6),)), (r(B, T, D), 0.1 * r(B, D), 0.1 * r(B, D)), (0, 1, 2)
    if op == "flow_step":
        s = 0.1 + 0.8 * torch.rand(B, generator=gen, dtype=torch.float64)
        return (lambda f: lambda *a: (f(*a),)), (r(B, T, D), r(B, T, D), r(B, T, D), s, 0.5 * s), (0, 1, 2)
    if op == "gated_fusion":
        return (lambda f: lambda *a: (f(*a),)), (r(B, T, D), r(B, T, D), r(B, D), r(1).reshape(())), (0, 1, 2, 3)
    if op == "gated_fusion_linear":
        args = (r(B, T, D), r(B, T, K), r(D, K) * K**-0.5, r(D), r(B, D), r(1).reshape(()), r(B, T, D))
        return (lambda f: lambda *a: (f(*a),)), args, tuple(range(7))
    s = 0.1 + 0.8 * torch.rand(B, generator=gen, dtype=torch.float64)
    s = s.to(torch.float32)
    r_ = torch.stack([s[0] * 0.5, s[1]])  # sample 1 is a plain row (s == r)
    u_plus = r(B, T, D)
    args = (r(B, T, D), u_plus, (u_plus.double() + 0.01 * r(B, T, D).double()).to(dtype), r(B, T, D),
            s, r_, s + 5e-3, s - 5e-3)
    return (lambda f: lambda *a: f(*a, float(T * D))), args, (0,)


def run(op: str, fn, args, grad_idx, gen_seed: int):
    """Outputs and gradients of `fn` for fixed random cotangents (drawn from `gen_seed`)."""
    leaves = [a.detach().requires_grad_() if i in grad_idx else a for i, a in enumerate(args)]
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(gen_seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [leaves[i] for i in grad_idx], cot)
    return [o.detach() for o in outs], list(grads)


def kernel_and_reference(op, dtype, gen):
    wrap, args, grad_idx = case(op, dtype, gen)
    return wrap(getattr(tmd_ext, op)), wrap(getattr(reference, op)), args, grad_idx


def assert_close_scaled(got, want, dtype):
    """assert_close with the absolute tolerance scaled by the magnitude of `want` (sums over tokens)."""
    tol = TOL[dtype] if got.dtype == dtype else TOL[got.dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("op", OPS)
def test_matches_reference_on_odd_wide_shapes(op, dtype, gen):
    kernel, ref, args, grad_idx = kernel_and_reference(op, dtype, gen)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    outs, grads = run(op, kernel, args, grad_idx, seed)
    outs_r, grads_r = run(op, ref, args, grad_idx, seed)
    for a, w in zip(outs + grads, outs_r + grads_r, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape
        assert_close_scaled(a, w, dtype)


@pytest.mark.parametrize("op", OPS)
def test_noncontiguous_inputs(op, gen):
    """Every tensor operand of rank >= 1 handed over non-contiguous: the same values as contiguous."""
    kernel, _, args, grad_idx = kernel_and_reference(op, torch.float32, gen)
    nc = tuple(noncontig(a) if a.dim() >= 1 and a.numel() > 1 else a for a in args)
    assert any(not a.is_contiguous() for a in nc)
    want = run(op, kernel, args, grad_idx, 0)
    got = run(op, kernel, nc, grad_idx, 0)
    for a, w in zip(got[0] + got[1], want[0] + want[1], strict=True):
        assert torch.equal(a, w)


@pytest.mark.parametrize("op", OPS)
def test_thread_count_does_not_change_results(op, gen):
    kernel, _, args, grad_idx = kernel_and_reference(op, torch.bfloat16, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(op, kernel, args, grad_idx, 0)
        torch.set_num_threads(2)
        two = run(op, kernel, args, grad_idx, 0)
    finally:
        torch.set_num_threads(before)
    for a, w in zip(one[0] + one[1], two[0] + two[1], strict=True):
        assert torch.equal(a, w)


def _all_results(seed: int) -> list[torch.Tensor]:
    """Outputs and gradients of every op in every dtype, from one seed."""
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for op in OPS:
            kernel, _, args, grad_idx = kernel_and_reference(op, dtype, torch.Generator().manual_seed(seed))
            outs, grads = run(op, kernel, args, grad_idx, seed)
            results += outs + grads
    return results


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_builds_equal_the_process_default(tmp_path, capability):
    """The process default (the widest build the CPU has: AVX-512, AVX2 or baseline) and the build that
    ATEN_CPU_CAPABILITY selects ("default": the baseline, "avx2": AVX2) give bit-identical results."""
    path = tmp_path / "narrow.pt"
    code = ("import sys, torch; sys.path[:0] = [sys.argv[2], sys.argv[3]]; "
            "from ops.test_cpu_kernels import _all_results; torch.save(_all_results(7), sys.argv[1])")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT / "tests"), str(ROOT)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    narrow = torch.load(path)
    here = _all_results(7)
    assert len(narrow) == len(here)
    for a, w in zip(here, narrow, strict=True):
        assert torch.equal(a, w)
