"""Shared test fixtures: device parametrisation (CUDA cases are marked `cuda` and skipped without a
device), dtype tolerances, and fresh random inputs."""
from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Tolerances of kernel vs reference. Both compute in fp32 (fp64) and round once to the output
# dtype, so they differ by at most an ulp of the output plus fp32 reassociation in reductions.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed on failure via the test id's repr)."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    g = torch.Generator().manual_seed(seed)
    return g


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, requires_grad=False):
    """Fresh normal noise generated on CPU (reproducible from `gen`) and moved to `device`."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t` in a non-contiguous layout (every other element of a wider buffer)."""
    buf = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    buf[..., 0] = t
    out = buf[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out
