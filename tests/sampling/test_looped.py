"""LoopedInnerFlow / sample_tmd_looped: the student's inner flow through tmd_ext.FlowHeadLoop equals
student.inner_flow, sample_tmd and Algorithm 1 written with tmd_ext.reference.inner_flow (tiny random
Wan, CPU; CUDA graph path on a GPU)."""
from __future__ import annotations

import warnings

import pytest
import torch
from support.tiny import LATENT, TEXT_LEN, TINY_CONFIG, randomize_zero_init, tiny_inputs, tiny_teacher

from tmd_ext import reference
from tmd_train import TMDStudent, effective_nfe, sample_tmd, shifted_grid
from tmd_train.sampling import LoopedInnerFlow, sample_tmd_looped

B = 2


@pytest.fixture(scope="module")
def student():
    s = TMDStudent.from_teacher(tiny_teacher(seed=3), head_blocks=2)
    randomize_zero_init(s, torch.Generator().manual_seed(4))  # a trained-like head: s, r matter
    return s.eval()


@pytest.mark.parametrize("n", [1, 3])
def test_inner_flow_matches_student(student, n, gen):
    x, t, text = tiny_inputs(B, gen)
    grid = shifted_grid(n, 10.0, 0.999)
    inner = LoopedInnerFlow(student, grid)
    for _ in range(2):  # the second call reuses the loop with the features copied in
        x, t, text = tiny_inputs(B, gen)
        with torch.no_grad():
            feats = student.backbone(x, t, text)
        y1 = torch.randn(B, *LATENT, generator=gen)
        got = inner(feats, y1)
        want = student.inner_flow(feats, y1, grid)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert inner.num_head_calls == 2 * n and inner.loop.num_head_calls == 2 * n


def test_new_layout_builds_new_loop(student, gen):
    grid = shifted_grid(2, 10.0, 0.999)
    inner = LoopedInnerFlow(student, grid)
    for batch in (2, 1, 1):
        x, t, text = tiny_inputs(batch, gen)
        with torch.no_grad():
            feats = student.backbone(x, t, text)
        y1 = torch.randn(batch, *LATENT, generator=gen)
        torch.testing.assert_close(inner(feats, y1), student.inner_flow(feats, y1, grid), atol=0, rtol=0)
    assert inner.num_head_calls == 6 and inner.loop.num_head_calls == 4


def test_sample_matches_sample_tmd(student, gen):
    text = torch.randn(B, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen)
    kw = {"shape": (B, *LATENT), "M": 2, "N": 3}
    want = sample_tmd(student, text, generator=torch.Generator().manual_seed(7), **kw)
    got = sample_tmd_looped(student, text, generator=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(got.x0, want.x0, atol=0, rtol=0)
    assert got.nfe == pytest.approx(want.nfe)
    assert got.nfe == pytest.approx(effective_nfe(2, 3, student.head_blocks, student.num_layers))
    # A reused loop keeps counting only this call's head evaluations.
    inner = LoopedInnerFlow(student, shifted_grid(3, 10.0, 0.999))
    for _ in range(2):
        again = sample_tmd_looped(student, text, generator=torch.Generator().manual_seed(7), inner=inner, **kw)
        torch.testing.assert_close(again.x0, want.x0, atol=0, rtol=0)
        assert again.nfe == pytest.approx(want.nfe)
    with pytest.raises(ValueError, match="inner grid"):
        sample_tmd_looped(student, text, generator=torch.Generator().manual_seed(7), inner=inner,
                          shape=(B, *LATENT), M=2, N=2)


def test_sample_matches_reference_inner_flow(student, gen):
    """Algorithm 1 with the pure-PyTorch reference inner flow of the student's head: the same draws
    from the generator (start noise, then y1 per outer step), the same x0."""
    text = torch.randn(B, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen)
    M, N = 2, 3
    got = sample_tmd_looped(student, text, shape=(B, *LATENT), generator=torch.Generator().manual_seed(5),
                            M=M, N=N, outer_shift=5.0, inner_shift=3.0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, *LATENT, generator=g)
    t_grid, s_grid = shifted_grid(M, 5.0, 0.999), shifted_grid(N, 3.0, 0.999)
    with torch.no_grad():
        for i in range(M, 0, -1):
            feats = student.backbone(x, t_grid[i].expand(B), text)
            y1 = torch.randn(B, *LATENT, generator=g)
            y = reference.inner_flow(lambda y, s, r, feats=feats: student.head(y, s, r, feats), y1, s_grid)
            x = x - float(t_grid[i] - t_grid[i - 1]) * y
    torch.testing.assert_close(got.x0, x, atol=1e-5, rtol=1e-5)


def test_bad_args(student, gen):
    with pytest.raises(ValueError, match="s_grid must be a 1-D"):
        LoopedInnerFlow(student, torch.zeros(2, 3))
    inner = LoopedInnerFlow(student, shifted_grid(2, 10.0, 0.999))
    x, t, text = tiny_inputs(B, gen)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
    with pytest.raises(ValueError, match="batch"):
        inner(feats, torch.randn(1, *LATENT))


@pytest.mark.cuda
def test_cuda_graph_sampling_matches_eager(gen):
    """On a GPU: the head is captured (no fallback) and the graph path reproduces sample_tmd."""
    s = TMDStudent.from_teacher(tiny_teacher(seed=3), head_blocks=2)
    randomize_zero_init(s, torch.Generator().manual_seed(4))
    s = s.to("cuda").eval()
    text = torch.randn(B, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen).cuda()
    kw = {"shape": (B, *LATENT), "M": 2, "N": 2}
    want = sample_tmd(s, text, generator=torch.Generator().manual_seed(1), **kw)
    inner = LoopedInnerFlow(s, shifted_grid(2, 10.0, 0.999, device="cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sample_tmd_looped(s, text, generator=torch.Generator().manual_seed(1), inner=inner, **kw)
    # the student's head is capturable: a fallback here (counted, warned) is a failure
    assert inner.loop.captured and inner.flow.fallbacks == 0, [str(w.message) for w in caught]
    torch.testing.assert_close(got.x0, want.x0, atol=1e-4, rtol=1e-4)
    assert got.nfe == pytest.approx(want.nfe)
