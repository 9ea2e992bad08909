"""gated_fusion_linear on sm_90a: the CUTLASS TMA + WGMMA GEMM with the fused epilogue
(csrc/gated_fusion_linear/gated_fusion_linear_sm90.cu), reached through the public function.

The CUDA cases judge the kernel the way flash-attention's tests do: its error against a float64
reference must be at most twice the error of the same math run by PyTorch in the input's low
precision, plus the rounding noise of one output ulp. On an H100 built with 9.0a they also check,
with the profiler, that the CUTLASS kernel is what ran (and that the unsupported cases fall back).
"""
from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch
from conftest import noncontig, randn

import tmd_ext
from tmd_ext import reference

LOW_DTYPES = [torch.bfloat16, torch.float16]
# (B, T, D, K): the Wan sizes (D=K=1536; K=5120 with an odd T), then edge cases of the tiling:
# T not a multiple of the 128-row tile (one batch's last tile must not touch the next batch),
# T = 1, D not a multiple of the 128-column tile, K not a multiple of the 64-deep K step.
SHAPES = [(2, 4096, 1536, 1536), (1, 333, 1536, 5120), (3, 130, 264, 72), (2, 1, 64, 128)]
# Cases the sm90 kernel must decline (the op then takes the cuBLAS + elementwise path).
FALLBACK_SHAPES = [(2, 100, 60, 64), (2, 100, 64, 36)]  # D % 8 != 0, K % 8 != 0


def _archs(s: str) -> list[str]:
    return [a for a in s.replace(",", ";").replace(" ", ";").split(";") if a]


def test_build_info_cutlass_sm90_matches_arch_list():
    """`cutlass_sm90` is true exactly for a CUDA build whose arch list holds 9.0a, and the arch
    list compiled into the library is the one setup.py recorded beside it."""
    info = tmd_ext.build_info()
    recorded = runpy.run_path(str(Path(tmd_ext.__file__).parent / "_build_meta.py"))
    assert info["cuda_archs"] == recorded["CUDA_ARCHS"]
    assert info["cuda_compiled"] == recorded["CUDA_COMPILED"]
    want = bool(info["cuda_compiled"]) and "9.0a" in _archs(info["cuda_archs"])
    assert info["cutlass_sm90"] is want
    if not info["cuda_compiled"]:
        assert info["cuda_archs"] == ""


def make_inputs(B, T, D, K, dtype, device, gen, bias=True):
    """m, x [B,T,D|K], weight [D,K] scaled so that x·Wᵀ ~ N(0,1), bias [D] or None, gate [B,D],
    alpha 0-d: fresh normal noise, never zeros."""
    m = randn(B, T, D, dtype=dtype, device=device, gen=gen)
    x = randn(B, T, K, dtype=dtype, device=device, gen=gen)
    w = (randn(D, K, dtype=torch.float64, gen=gen) / math.sqrt(K)).to(dtype=dtype, device=device)
    b = randn(D, dtype=dtype, device=device, gen=gen) if bias else None
    gate = randn(B, D, dtype=dtype, device=device, gen=gen)
    alpha = randn(1, dtype=dtype, device=device, gen=gen).reshape(())
    return m, x, w, b, gate, alpha


def lowp_math(m, x, w, b, gate, alpha):
    """The same function computed by PyTorch in the inputs' dtype (cuBLAS GEMM rounded to the
    dtype, every elementwise step rounded too): the yardstick of the oracle."""
    z = torch.nn.functional.linear(x, w, b)
    lam = torch.sigmoid(alpha) * gate[:, None, :]
    return m + lam * (z - m)


def assert_oracle(out, args):
    """|out - ref64| <= 2·|lowp - ref64| + one rounding of the output dtype (max over elements),
    and a relative error in the range of bf16/fp16 operands."""
    ref = reference.gated_fusion_linear(*[a.double() if a is not None else None for a in args])
    base = lowp_math(*args)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    ref_low = ref.to(out.dtype)
    atol = 2 * (ref_low + 0.3 - 0.3 - ref_low).abs().max().item()
    assert err <= 2 * base_err + atol, f"max error {err:.3e} vs low-precision math {base_err:.3e}"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-2 if out.dtype == torch.bfloat16 else 2e-3), f"relative error {rel:.3e}"


def cutlass_gemm_kernels(fn) -> list[str]:
    """Names of the CUTLASS 3.x GEMM kernels (cutlass::device_kernel<GemmUniversal<...>>) that
    ran on the device during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()
            if "device_kernel" in e.key and "GemmUniversal" in e.key]


def require_sm90_kernels():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS sm_90a kernels run on compute capability 9.0 only")
    if not tmd_ext.build_info()["cutlass_sm90"]:
        pytest.skip("this build has no sm_90a kernels (TORCH_CUDA_ARCH_LIST without 9.0a)")


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_oracle(shape, dtype, bias, gen):
    args = make_inputs(*shape, dtype, "cuda", gen, bias=bias)
    assert_oracle(tmd_ext.gated_fusion_linear(*args), args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_batches_use_their_own_gate(dtype, gen):
    """lam is [B, D]: with the same m, x in both batches and a zero gate in the second, batch 1
    must equal m exactly while batch 0 is fused (a wrong lam batch stride would mix them)."""
    m, x, w, b, gate, alpha = make_inputs(1, 200, 256, 128, dtype, "cuda", gen)
    m2, x2 = m.expand(2, -1, -1).contiguous(), x.expand(2, -1, -1).contiguous()
    gate2 = torch.stack([gate[0], torch.zeros_like(gate[0])])
    out = tmd_ext.gated_fusion_linear(m2, x2, w, b, gate2, alpha)
    assert torch.equal(out[1], m[0])
    assert_oracle(out[:1], (m, x, w, b, gate, alpha))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_noncontiguous_inputs(dtype, gen):
    m, x, w, b, gate, alpha = make_inputs(2, 300, 512, 256, dtype, "cuda", gen)
    out = tmd_ext.gated_fusion_linear(noncontig(m), noncontig(x), w.t().contiguous().t(), b, gate, alpha)
    assert_oracle(out, (m, x, w, b, gate, alpha))


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_sm90_runs_cutlass_kernel(dtype, bias, gen):
    """On an H100 with the sm_90a build, the supported case runs the CUTLASS fused GEMM."""
    require_sm90_kernels()
    args = make_inputs(2, 333, 1536, 1536, dtype, "cuda", gen, bias=bias)
    out = {}
    names = cutlass_gemm_kernels(lambda: out.setdefault("v", tmd_ext.gated_fusion_linear(*args)))
    assert names, "the CUTLASS sm90 GEMM did not run"
    assert_oracle(out["v"], args)


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor equal to t whose data pointer is 2 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["fp32", "D%8", "K%8", "misaligned"])
def test_sm90_declines_unsupported(case, gen):
    """Cases outside the kernel's reach (fp32, D or K not a multiple of 8, a pointer off the
    16-byte grid) are declined by the sm90 path and still computed right by the fallback."""
    require_sm90_kernels()
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    shape = {"D%8": FALLBACK_SHAPES[0], "K%8": FALLBACK_SHAPES[1]}.get(case, (2, 100, 64, 64))
    args = make_inputs(*shape, dtype, "cuda", gen)
    if case == "misaligned":
        args = (args[0], _misaligned_copy(args[1])) + args[2:]
    out = {}
    names = cutlass_gemm_kernels(lambda: out.setdefault("v", tmd_ext.gated_fusion_linear(*args)))
    assert not names, f"the CUTLASS sm90 GEMM ran on an unsupported case: {names[:1]}"
    ref = reference.gated_fusion_linear(*[a.double() if a is not None else None for a in args])
    if dtype == torch.float32:
        torch.testing.assert_close(out["v"].double(), ref, atol=1e-4, rtol=1e-4)
    else:
        assert_oracle(out["v"], args)
