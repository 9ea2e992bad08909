"""Samplers, NFE accounting and schedules (tiny random Wan, float32, CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from support.tiny import LATENT, TEXT_LEN, TINY_CONFIG, randomize_zero_init, tiny_teacher

import tmd_ext
from tmd_train import (
    TMDStudent,
    effective_nfe,
    sample_few_step,
    sample_teacher,
    sample_tmd,
    shift_time,
    shifted_grid,
)
from tmd_train.models import teacher_velocity

ATOL = {"atol": 1e-5, "rtol": 1e-5}
B = 2
SHAPE = (B, *LATENT)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(seed=0)


@pytest.fixture
def text(gen):
    return torch.randn(B, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ NFE and schedules
def test_effective_nfe():
    assert effective_nfe(2, 2, 5, 30) == pytest.approx(7 / 3)
    assert effective_nfe(1, 2, 5, 30) == pytest.approx(7 / 6)
    assert effective_nfe(1, 4, 5, 40) == pytest.approx(1.375)
    assert effective_nfe(2, 4, 5, 30) == pytest.approx(3.0)
    assert effective_nfe(4, 1, 5, 30) == 4.0
    for bad in ((0, 2, 5, 30), (2, 2, 31, 30), (2, 2.0, 5, 30), (2, 2, 5, -1)):
        with pytest.raises(ValueError):
            effective_nfe(*bad)


def test_shift_and_grid():
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    t = torch.rand(100, dtype=torch.float64)
    assert torch.all(shift_time(t, 10.0) >= t)
    g = shifted_grid(4, 10.0, 0.999)
    assert g.dtype == torch.float64 and g.shape == (5,)
    assert g[0] == 0 and g[-1] == 0.999 and torch.all(g[1:] > g[:-1])
    torch.testing.assert_close(g[2], torch.tensor(0.999 * 10 / 11, dtype=torch.float64))
    assert torch.all(shifted_grid(1000, 10.0, 0.999).diff() > 0)
    with pytest.raises(ValueError):
        shifted_grid(0, 10.0)
    with pytest.raises(ValueError):
        shifted_grid(3, 10.0, 1.5)
    with pytest.raises(ValueError):
        shift_time(0.5, 0.0)


# ------------------------------------------------------------------ sign check
def test_flow_step_constant_velocity_one_step_exact(gen):
    """docs/design.md §1.2: on the straight conditional path y_s = (1-s)·y + s·y1 the velocity y1 - y is
    constant; with head = y (so u = y1 - y) one step from s = 1 to r = 0 returns y exactly, and a
    step between any s > r lands on the path. The printed sign (+) would give 2·y1 - y."""
    y, y1 = (torch.randn(3, 4, 5, generator=gen) for _ in range(2))
    s = torch.tensor([1.0, 0.7, 0.4])
    r = torch.tensor([0.0, 0.2, 0.4])
    y_s = (1 - s)[:, None, None] * y + s[:, None, None] * y1
    out = tmd_ext.flow_step(y_s, y, y1, s, r)
    torch.testing.assert_close(out, (1 - r)[:, None, None] * y + r[:, None, None] * y1, **ATOL)
    torch.testing.assert_close(out[0], y[0], **ATOL)


# ------------------------------------------------------------------ teacher sampler
def test_teacher_euler_matches_manual(teacher, text, gen):
    neg = torch.randn(1, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen)
    res = sample_teacher(teacher, text, negative_text=neg, shape=SHAPE, generator=seeded(3), steps=3,
                         cfg=4.0, shift=3.0)
    assert res.x0.shape == SHAPE and res.nfe == pytest.approx(6.0)
    x = torch.randn(SHAPE, generator=seeded(3))
    grid = shifted_grid(3, 3.0, 1.0)
    with torch.no_grad():
        for i in (3, 2, 1):
            t = grid[i].expand(B)
            v_c = teacher_velocity(teacher, x, t, text)
            v_u = teacher_velocity(teacher, x, t, neg.expand(B, -1, -1))
            x = x - float(grid[i] - grid[i - 1]) * (v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(res.x0, x, **ATOL)


def test_teacher_cfg_unbatched_path_and_defaults(teacher, text, gen):
    """A negative prompt of another length runs as two passes; nfe still 2 per step. cfg=1 is one
    pass per step and ignores the negative prompt."""
    neg_long = torch.randn(1, TEXT_LEN + 2, TINY_CONFIG["text_dim"], generator=gen)
    res = sample_teacher(teacher, text, negative_text=neg_long, shape=SHAPE, generator=seeded(1), steps=2)
    assert res.nfe == pytest.approx(4.0) and torch.isfinite(res.x0).all()
    plain = sample_teacher(teacher, text, shape=SHAPE, generator=seeded(1), steps=2, cfg=1.0)
    assert plain.nfe == pytest.approx(2.0)
    assert (plain.x0 - res.x0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="negative_text"):
        sample_teacher(teacher, text, shape=SHAPE, steps=2)


def test_samplers_deterministic_given_generator(teacher, text):
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, seeded(9))
    for fn in (lambda g: sample_teacher(teacher, text, shape=SHAPE, generator=g, steps=2, cfg=1.0),
               lambda g: sample_tmd(student, text, shape=SHAPE, generator=g, M=2, N=2),
               lambda g: sample_few_step(teacher, text, shape=SHAPE, generator=g, steps=2)):
        a, b, c = fn(seeded(5)).x0, fn(seeded(5)).x0, fn(seeded(6)).x0
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert (a - c).abs().max() > 1e-3


def test_sampler_input_errors(teacher, text):
    with pytest.raises(ValueError, match="exactly one"):
        sample_teacher(teacher, text, steps=1, cfg=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        sample_few_step(teacher, text, noise=torch.randn(SHAPE), shape=SHAPE)
    with pytest.raises(ValueError, match="text"):
        sample_few_step(teacher, text[:1], shape=SHAPE)
    with pytest.raises(ValueError, match="shape"):
        sample_few_step(teacher, text, shape=SHAPE[1:])


# ------------------------------------------------------------------ TMD sampler
@pytest.mark.parametrize("K", [1, 3])
def test_student_at_init_N1_matches_teacher_euler(teacher, text, K):
    """An untrained student with N=1 (s from 1 to 0: y = y1 - (y1 - v) = v) and M=K is the teacher's
    K-step Euler sampler without CFG, on the same grid from the same noise."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    res = sample_tmd(student, text, shape=SHAPE, generator=seeded(7), M=K, N=1, outer_shift=10.0,
                     t_max=0.999, s_max=1.0)
    ref = sample_teacher(teacher, text, shape=SHAPE, generator=seeded(7), steps=K, cfg=1.0, shift=10.0,
                         t_max=0.999)
    torch.testing.assert_close(res.x0, ref.x0, **ATOL)
    assert res.nfe == pytest.approx(K) and ref.nfe == pytest.approx(K)


def test_tmd_sampler_is_algorithm_1(teacher, text):
    """sample_tmd == Algorithm 1 written out (draw order: start noise, then y1 per outer step), and
    its measured NFE is M·(1 + (N-1)·H/L)."""
    student = TMDStudent.from_teacher(teacher, head_blocks=3)
    randomize_zero_init(student, seeded(2))
    M, N = 2, 3
    res = sample_tmd(student, text, shape=SHAPE, generator=seeded(4), M=M, N=N, outer_shift=5.0, inner_shift=3.0)
    assert res.nfe == pytest.approx(effective_nfe(M, N, 3, 4))
    g = seeded(4)
    x = torch.randn(SHAPE, generator=g)
    tg, sg = shifted_grid(M, 5.0, 0.999), shifted_grid(N, 3.0, 0.999)
    with torch.no_grad():
        for i in range(M, 0, -1):
            feats = student.backbone(x, tg[i].expand(B), text)
            y1 = torch.randn(SHAPE, generator=g)
            y = y1
            for j in range(N, 0, -1):
                s, r = sg[j].expand(B), sg[j - 1].expand(B)
                y = y - float(sg[j] - sg[j - 1]) * (y1 - student.head(y, s, r, feats))
            x = x - float(tg[i] - tg[i - 1]) * y
    torch.testing.assert_close(res.x0, x, **ATOL)


def test_tmd_sampler_fresh_inner_noise(teacher, text, monkeypatch):
    """Each outer step draws its own y1 (App. A.5): the inner flows see different noises."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    seen = []
    original = student.inner_flow

    def spy(feats, y1, s_grid, **kw):
        seen.append(y1.clone())
        return original(feats, y1, s_grid, **kw)

    monkeypatch.setattr(student, "inner_flow", spy)
    sample_tmd(student, text, shape=SHAPE, generator=seeded(0), M=3, N=2)
    assert len(seen) == 3
    assert (seen[0] - seen[1]).abs().max() > 0.1 and (seen[1] - seen[2]).abs().max() > 0.1


def test_tmd_sampler_noise_argument(teacher, text):
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    noise = torch.randn(SHAPE, generator=seeded(8))
    a = sample_tmd(student, text, noise=noise, generator=seeded(1), M=1, N=2)
    b = sample_tmd(student, text, noise=noise.clone(), generator=seeded(1), M=1, N=2)
    torch.testing.assert_close(a.x0, b.x0, atol=0, rtol=0)
    assert a.nfe == pytest.approx(effective_nfe(1, 2, 2, 4))


# ------------------------------------------------------------------ plain few-step student
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_few_step_eq18(teacher, text, steps):
    """Eq. 18 with x̂ = x_t - t·v is algebraically x_t - (t - t')·v: the deterministic few-step
    sampler equals the Euler sampler of the same model on the same grid; nfe = steps."""
    res = sample_few_step(teacher, text, shape=SHAPE, generator=seeded(2), steps=steps, shift=10.0)
    ref = sample_teacher(teacher, text, shape=SHAPE, generator=seeded(2), steps=steps, cfg=1.0, shift=10.0,
                         t_max=0.999)
    torch.testing.assert_close(res.x0, ref.x0, **ATOL)
    assert res.nfe == pytest.approx(steps)


@pytest.mark.cuda
def test_cuda_matches_cpu(teacher, text):
    """On a GPU: identity at init holds and the TMD sampler (noise drawn from a CPU generator) gives
    the CPU result up to kernel round-off."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, seeded(1))
    cpu = sample_tmd(student, text, shape=SHAPE, generator=seeded(3), M=2, N=2)
    gpu_student = copy.deepcopy(student).cuda()
    gpu = sample_tmd(gpu_student, text.cuda(), shape=SHAPE, generator=seeded(3), M=2, N=2)
    assert gpu.x0.device.type == "cuda" and gpu.nfe == cpu.nfe
    torch.testing.assert_close(gpu.x0.cpu(), cpu.x0, atol=2e-3, rtol=2e-3)
    fresh = TMDStudent.from_teacher(teacher, head_blocks=2).cuda()
    x = torch.randn(SHAPE, generator=seeded(4)).cuda()
    t = torch.tensor([0.3, 0.8], device="cuda")
    with torch.no_grad():
        out = fresh.head(torch.randn_like(x), t, 0.5 * t, fresh.backbone(x, t, text.cuda()))
        ref = fresh.transformer(x, 1000 * t, text.cuda(), return_dict=False)[0]
    torch.testing.assert_close(out, ref, **ATOL)
