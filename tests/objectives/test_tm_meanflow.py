"""Stage-1 objective (TM-MeanFlow): the (t, s, r) samplers, the fused FD-JVP pass against the exact
forward-mode JVP through the head, the guided tangent and target against MeanFlow's formulas, the
whole loss against a naive re-implementation (two full FD passes along the guided velocity,
pure-PyTorch loss), and the FD pass skipped when no row needs it — tiny random Wan student, CPU,
float64 where accuracy is measured."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from support.run import TESTS, output, torchrun
from support.tiny import LATENT, TEXT_LEN, TINY_CONFIG, randomize_zero_init, tiny_inputs, tiny_teacher

import tmd_ext
import tmd_train.objectives.tm_meanflow as tmmf
from tmd_train.models import TMDStudent
from tmd_train.objectives.tm_meanflow import (
    TMMeanFlowConfig,
    exact_total_derivative,
    fd_head_pass,
    fd_times,
    sample_inner_times,
    sample_outer_time,
    select_features,
    tm_meanflow,
)
from tmd_train.sampling import count_blocks
from tmd_train.schedules import shift_time, shifted_grid

F64 = torch.float64


def per(t, like):
    return t.to(like.dtype).reshape(-1, 1, 1, 1, 1)


def make_student(seed=0, dtype=torch.float32, head_blocks=2, gen=None, **options):
    student = TMDStudent.from_teacher(tiny_teacher(seed=seed), head_blocks=head_blocks, **options).to(dtype)
    randomize_zero_init(student, gen or torch.Generator().manual_seed(seed + 100))
    return student


def make_batch(batch, gen, dtype=torch.float32):
    x, _, text = tiny_inputs(batch, gen, dtype)
    neg = torch.randn(TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen, dtype=F64).to(dtype)
    return {"latents": x, "text": text, "negative_text": neg}


def rel_err(a, b):
    """Per-sample ‖a - b‖ / ‖b‖."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


# ------------------------------------------------------------------ samplers
def test_outer_time_sampler(gen):
    grid = shifted_grid(3, 10.0, 0.999)
    t = sample_outer_time(3000, 3, 10.0, 0.999, gen, torch.device("cpu"))
    assert t.dtype == F64 and t.shape == (3000,)
    values = set(t.tolist())
    assert values == set(grid[1:].tolist())          # every t_i, never t_0 = 0


def test_inner_time_sampler(gen):
    cfg = TMMeanFlowConfig(inner_steps=3)
    s, r = sample_inner_times(20000, cfg, gen, torch.device("cpu"))
    grid = shifted_grid(3, 10.0, 0.999)
    assert s.dtype == F64 and r.dtype == F64
    assert float(s.min()) >= 0.001 and float(s.max()) <= 0.999
    assert bool((r <= s).all())
    equal = r == s
    assert abs(equal.double().mean().item() - 0.75) < 0.02
    # r != s rows: r is the largest grid point <= s
    rs, ss = r[~equal], s[~equal]
    assert bool(torch.isin(rs, grid).all())
    nxt = grid[torch.searchsorted(grid, rs, right=True)]
    assert bool((nxt > ss).all())
    # s ~ shift(U, 3): the median of shift(U, γ) is shift(0.5, γ) = 0.75
    assert abs(s.median().item() - shift_time(0.5, 3.0)) < 0.02
    frac = TMMeanFlowConfig(equal_fraction=0.3)
    s2, r2 = sample_inner_times(20000, frac, gen, torch.device("cpu"))
    assert abs((r2 == s2).double().mean().item() - 0.3) < 0.02
    s3, r3 = sample_inner_times(1000, TMMeanFlowConfig(variant="tm"), gen, torch.device("cpu"))
    assert torch.equal(s3, r3)


def test_fd_times():
    s = torch.tensor([0.5, 0.001, 0.999, 0.996], dtype=F64)
    sp, sm = fd_times(s, 5e-3)
    torch.testing.assert_close(sp, torch.tensor([0.505, 0.006, 1.0, 1.0], dtype=F64))
    torch.testing.assert_close(sm, torch.tensor([0.495, 0.0, 0.994, 0.991], dtype=F64))
    assert bool((sp - sm >= 5e-3).all())


def test_config_validation():
    for bad in (dict(variant="meanflow"), dict(cfg_source="ema"), dict(inner_steps=0), dict(delta=0.0),
                dict(equal_fraction=1.5), dict(cond_dropout=-0.1), dict(s_min=0.5, s_max_clip=0.4),
                dict(cfg_scale=0.0), dict(c_scale=-1.0), dict(t_max=0.0), dict(fd_autocast=1)):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            TMMeanFlowConfig(**bad)


# ------------------------------------------------------------------ FD pass vs exact JVP
@contextlib.contextmanager
def true_float64():
    """Wan's blocks and output norm cast activations with ``.float()`` (float32 islands inside a
    float64 model: rounding noise ~1e-7 that a difference quotient divides by 2δ). Inside, that
    cast keeps float64 tensors as they are, so only the FD truncation error is measured."""
    original = torch.Tensor.float

    def keep_f64(self, *args, **kwargs):
        return self if self.dtype == F64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep_f64
    try:
        yield
    finally:
        torch.Tensor.float = original


S_TEST = torch.tensor([0.3, 0.7, 0.05, 0.55, 0.9], dtype=F64)
R_TEST = torch.tensor([0.1, 0.2, 0.0, 0.5, 0.3], dtype=F64)


def _fd_vs_exact(student, gen, s, r, deltas=(5e-3,)):
    """Per-sample relative error of the fused FD pass's du/ds against torch.func.jvp for each δ,
    and the share ‖∂u/∂s‖/‖du/ds‖ of the time direction."""
    B = s.shape[0]
    x, t, text = tiny_inputs(B, gen, F64)
    y, y1 = (torch.randn(B, *LATENT, generator=gen, dtype=F64) for _ in range(2))
    y_s = (1 - per(s, y)) * y + per(s, y) * y1
    v_in = y1 - y
    with torch.no_grad():
        feats = student.backbone(x, t, text)
        u, exact = exact_total_derivative(student, feats, y_s, v_in, y1, s, r)
        _, along_s = exact_total_derivative(student, feats, y_s, torch.zeros_like(v_in), y1, s, r)
        torch.testing.assert_close(u, student.velocity(y_s, s, r, feats, y1), atol=1e-12, rtol=1e-12)
    errors = []
    for delta in deltas:
        sp, sm = fd_times(s, delta)
        u_plus, u_minus = fd_head_pass(student, feats, y_s, v_in, y1, s, r, sp, sm)
        errors.append(rel_err((u_plus - u_minus) / per(sp - sm, u_plus), exact))
    return errors, along_s.flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)


def test_fd_pass_matches_exact_jvp(gen):
    """The accuracy bar: float64, zero-initialised time layers made non-zero (else ∂u/∂s = 0 and
    only the y direction would be checked; the s direction is checked to be a large share), a
    head with the default sinusoids of s (ω_max = 4 rad/unit, ω_max·δ = 0.02): the fused FD derivative
    matches the exact JVP (tangent (v_in, 1, 0) in (y_s, s, r), features fixed) to < 1e-4 per
    sample at δ = 5e-3 (measured 5–7e-5), and the error is second order: ×4 at 2δ."""
    student = make_student(seed=5, dtype=F64, gen=gen)
    with true_float64():
        (err, err2), s_share = _fd_vs_exact(student, gen, S_TEST, R_TEST, deltas=(5e-3, 1e-2))
    assert bool((s_share > 0.3).all()), s_share
    assert float(err.max()) < 1e-4, err
    ratio = err2 / err
    assert bool(((ratio > 3.5) & (ratio < 4.5)).all()), ratio


def test_fd_error_default_time_embedding(gen, capsys):
    """Measured, not hidden (docs/design.md §2.5): with ω_max = 10 rad/unit (ω_max·δ = 0.05, docs/design.md's ceiling)
    the truncation error at δ = 5e-3 is ≈ (ω_max·δ)²/6 ≈ 4e-4; with Wan's float32 islands kept,
    their rounding noise adds ~1e-4·(scale of the model). Both stay below 1e-3."""
    student = make_student(seed=5, dtype=F64, gen=gen, time_max_freq=10.0)
    with true_float64():
        (err,), s_share = _fd_vs_exact(student, gen, S_TEST, R_TEST)
    (err_islands,), _ = _fd_vs_exact(student, gen, S_TEST, R_TEST)
    with capsys.disabled():
        print(f"\n[time_max_freq=10] FD(δ=5e-3) vs JVP relative error: {err.max().item():.2e} (float64), "
              f"{err_islands.max().item():.2e} (float64 with Wan's float32 norms)")
    assert bool((s_share > 0.3).all()), s_share
    assert float(err.max()) < 1e-3 and float(err_islands.max()) < 1e-3, (err, err_islands)


def test_fd_pass_at_the_ends(gen):
    """Near s = 0 and s = 1 the clamped (off-centre) difference is first order: still close."""
    student = make_student(seed=5, dtype=F64, gen=gen, time_max_freq=4.0)
    s = torch.tensor([0.999, 0.002], dtype=F64)
    r = torch.tensor([0.5, 0.0], dtype=F64)
    with true_float64():
        (err,), _ = _fd_vs_exact(student, gen, s, r)
    assert float(err.max()) < 3e-2, err


def test_fd_pass_is_one_batched_head_pass(gen):
    student = make_student()
    B = 3
    s = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    r = torch.zeros(B, dtype=F64)
    x, t, text = tiny_inputs(B, gen)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
    y_s, v, y1 = (torch.randn(B, *LATENT, generator=gen) for _ in range(3))
    sp, sm = fd_times(s, 5e-3)
    calls = []
    hook = student.transformer.blocks[-1].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        up, um = fd_head_pass(student, feats, y_s, v, y1, s, r, sp, sm)
    finally:
        hook.remove()
    assert calls == [2 * B]
    assert not up.requires_grad
    with torch.no_grad():
        ref_p = student.velocity(y_s + per(sp - s, y_s) * v, sp, r, feats, y1)
        ref_m = student.velocity(y_s + per(sm - s, y_s) * v, sm, r, feats, y1)
    torch.testing.assert_close(up, ref_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(um, ref_m, atol=1e-5, rtol=1e-5)


def test_select_features(gen):
    student = make_student()
    x, t, text = tiny_inputs(4, gen)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
    rows = torch.tensor([3, 1])
    sel = select_features(feats, rows, repeats=2, dtype=F64)
    assert sel.m.shape[0] == 4 and sel.m.dtype == F64
    torch.testing.assert_close(sel.m[1], feats.m[1].double())
    torch.testing.assert_close(sel.m[2], feats.m[3].double())
    torch.testing.assert_close(sel.t, t[[3, 1, 3, 1]])
    assert sel.grid == feats.grid and sel.rotary_emb is feats.rotary_emb


def test_forward_ad_friendly_restores_ops():
    op = tmd_ext.adaln_modulate
    with tmmf.forward_ad_friendly():
        assert tmd_ext.adaln_modulate is tmd_ext.reference.adaln_modulate
    assert tmd_ext.adaln_modulate is op


# ------------------------------------------------------------------ the objective
def naive_draws(batch, cfg, gen):
    """Every draw of one evaluation in the documented order (dropout, t, x1, y1, s, the r = s
    choice), and the points built from them."""
    x, text = batch["latents"], batch["text"]
    neg = batch["negative_text"].expand(x.shape[0], -1, -1)
    B, dt = x.shape[0], x.dtype
    dropped = torch.rand(B, generator=gen, dtype=F64) < cfg.cond_dropout
    grid_t = shifted_grid(cfg.outer_steps, cfg.outer_shift, cfg.t_max)
    t = grid_t[torch.randint(1, cfg.outer_steps + 1, (B,), generator=gen)]
    x1 = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(dt)
    y1 = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(dt)
    s = shift_time(torch.rand(B, generator=gen, dtype=F64), cfg.s_shift).clamp(cfg.s_min, cfg.s_max_clip)
    equal = torch.rand(B, generator=gen, dtype=F64) < cfg.equal_fraction
    grid_s = shifted_grid(cfg.inner_steps, cfg.inner_shift, cfg.s_max)
    r = torch.stack([grid_s[grid_s <= si].max() for si in s])
    r = s.clone() if cfg.variant == "tm" else torch.where(equal, s, r)
    x_t = (1 - per(t, x)) * x + per(t, x) * x1
    y = x1 - x
    y_s = (1 - per(s, y)) * y + per(s, y) * y1
    return dict(dropped=dropped, t=t, x_t=x_t, y1=y1, s=s, r=r, y_s=y_s, v_in=y1 - y, neg=neg,
                text=torch.where(dropped[:, None, None], neg, text))


def naive_guided_velocity(student, teacher, d, cfg):
    """MeanFlow's guided field ṽ = ω·v_in + (1-ω)·u_uncond (v_in on dropped rows), no grad; u_uncond
    from the student's own r = s prediction with the negative prompt, or from the teacher."""
    with torch.no_grad():
        if cfg.cfg_source == "student":
            u_unc = d["y1"] - student.head(d["y_s"], d["s"], d["s"], student.backbone(d["x_t"], d["t"], d["neg"]))
        else:
            u_unc = d["y1"] - teacher(d["x_t"], 1000 * d["t"], d["neg"], return_dict=False)[0]
        v_g = cfg.cfg_scale * d["v_in"] + (1 - cfg.cfg_scale) * u_unc
        return torch.where(per(d["dropped"], v_g) > 0, d["v_in"], v_g)


def naive_tm_meanflow(student, teacher, batch, cfg, gen):
    """The objective written out from the formulas without row selection: two full-batch FD
    passes along the guided velocity, the pure-PyTorch loss."""
    d = naive_draws(batch, cfg, gen)
    s, r, y_s, y1 = d["s"], d["r"], d["y_s"], d["y1"]
    feats = student.backbone(d["x_t"], d["t"], d["text"])
    u = y1 - student.head(y_s, s, r, feats)
    v_g = naive_guided_velocity(student, teacher, d, cfg)
    sp, sm = (s + cfg.delta).clamp(max=1.0), (s - cfg.delta).clamp(min=0.0)
    with torch.no_grad():
        fd_feats = feats.detach()
        u_p = y1 - student.head(y_s + per(sp - s, y_s) * v_g, sp, r, fd_feats)
        u_m = y1 - student.head(y_s + per(sm - s, y_s) * v_g, sm, r, fd_feats)
    loss, mse = tmd_ext.reference.meanflow_fd_loss(u, u_p, u_m, v_g, s, r, sp, sm, cfg.c_scale * u[0].numel())
    return loss.mean(), mse.mean(), (r != s).double().mean()


@pytest.mark.parametrize("objective,source", [("tm_meanflow", "student"), ("tm_meanflow", "teacher"),
                                               ("tm", "student")])
def test_objective_matches_naive_reference(objective, source):
    """Loss, MSE, r≠s fraction and every gradient (backbone included: m is not detached) equal a
    plain re-implementation; float64 so only reassociation differs."""
    gen = torch.Generator().manual_seed(1234)
    student = make_student(seed=3, dtype=F64, gen=gen)
    teacher = tiny_teacher(seed=3).double()
    batch = make_batch(6, gen, F64)
    cfg = TMMeanFlowConfig(variant=objective, equal_fraction=0.5, cond_dropout=0.4, inner_steps=3, cfg_source=source)
    loss_dict, log = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(7), teacher=teacher)
    loss_dict["loss"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    ref_loss, ref_mse, ref_frac = naive_tm_meanflow(student, teacher, batch, cfg, torch.Generator().manual_seed(7))
    ref_loss.backward()
    torch.testing.assert_close(loss_dict["loss"], ref_loss, atol=0, rtol=1e-6)
    torch.testing.assert_close(log["loss"], ref_loss.detach(), atol=0, rtol=1e-6)
    torch.testing.assert_close(log["mse"], ref_mse.detach(), atol=0, rtol=1e-6)
    assert log["frac_fd"].item() == ref_frac.item()
    if objective == "tm_meanflow":
        assert 0 < ref_frac.item() < 1          # both kinds of rows present in this draw
    else:
        assert ref_frac.item() == 0
    assert 0 < log["frac_dropped"].item() < 1
    assert any(n.startswith("transformer.blocks.0.") for n in grads)   # backbone block 0 trains
    for n, p in student.named_parameters():
        if p.grad is None:
            assert n not in grads
            continue
        torch.testing.assert_close(grads[n], p.grad, atol=1e-9, rtol=1e-5, msg=n)


def test_objective_pass_rows(gen):
    """Rows pushed through the blocks: the backbone once over B, the head over B (with grad) plus
    2·B' in the single FD pass; the plain TM objective adds none. The student's unconditional
    pass adds the kept rows to both (none with the teacher as the source)."""
    student = make_student()
    teacher = tiny_teacher(seed=0)
    batch = make_batch(8, gen)
    L, H = 4, 2
    for objective, source in (("tm_meanflow", "teacher"), ("tm", "teacher"), ("tm_meanflow", "student"),
                              ("tm", "student")):
        cfg = TMMeanFlowConfig(variant=objective, equal_fraction=0.5, cfg_source=source, cond_dropout=0.3)
        with count_blocks(student.transformer.blocks[:L - H], 1) as backbone, \
                count_blocks(student.transformer.blocks[L - H:], 1) as head:
            _, log = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(3), teacher=teacher)
        n_fd = round(log["frac_fd"].item() * 8)
        n_unc = 8 - round(log["frac_dropped"].item() * 8) if source == "student" else 0
        assert 0 < n_unc < 8 or source == "teacher"
        assert backbone.rows == (8 + n_unc) * (L - H)
        assert head.rows == (8 + n_unc + 2 * n_fd) * H
        assert (n_fd > 0) == (objective == "tm_meanflow")


def test_objective_deterministic_and_seed_dependent(gen):
    student = make_student()
    teacher = tiny_teacher(seed=0)
    batch = make_batch(4, gen)
    cfg = TMMeanFlowConfig()
    a = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(5), teacher=teacher)[0]["loss"]
    b = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(5), teacher=teacher)[0]["loss"]
    c = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(6), teacher=teacher)[0]["loss"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_source_default_and_errors(gen):
    """The student is its own unconditional source by default (no teacher needed); the teacher
    source without a teacher is an error."""
    assert TMMeanFlowConfig().cfg_source == "student"
    student = make_student()
    batch = make_batch(4, gen)
    cfg = TMMeanFlowConfig(cond_dropout=0.0)
    loss_dict, log = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(0))
    loss_dict["loss"].backward()
    assert torch.isfinite(loss_dict["loss"])
    with pytest.raises(ValueError, match="teacher"):
        tm_meanflow(student, batch, TMMeanFlowConfig(cfg_source="teacher"), torch.Generator().manual_seed(0))
    # cfg_scale 1 needs no unconditional prediction at all
    tm_meanflow(student, batch, TMMeanFlowConfig(cfg_scale=1.0, cfg_source="teacher"),
                torch.Generator().manual_seed(0))
    bad = dict(batch)
    del bad["negative_text"]
    with pytest.raises(ValueError, match="negative_text"):
        tm_meanflow(student, bad, cfg, torch.Generator().manual_seed(0))
    bad = dict(batch, negative_text=torch.zeros(TEXT_LEN + 1, TINY_CONFIG["text_dim"]))
    with pytest.raises(ValueError, match="negative_text"):
        tm_meanflow(student, bad, cfg, torch.Generator().manual_seed(0))


def spy_on_loss_op(monkeypatch):
    """Record the arguments every ``meanflow_fd_loss`` call receives (then run the reference)."""
    seen = []

    def spy(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c):
        seen.append(dict(u=u.detach().clone(), u_plus=u_plus.clone(), u_minus=u_minus.clone(), v=v.detach().clone(),
                         s=s.clone(), r=r.clone(), s_plus=s_plus.clone(), s_minus=s_minus.clone(), c=c))
        return tmd_ext.reference.meanflow_fd_loss(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c)

    monkeypatch.setattr(tmmf.tmd_ext, "meanflow_fd_loss", spy)
    return seen


def test_fd_derivative_along_the_guided_tangent(monkeypatch):
    """MeanFlow's guided objective (docs/design.md §1.4): the velocity handed to the loss op is
    ṽ = ω·v_in + (1-ω)·u_uncond with u_uncond = y1 - head(y_s, s, s; backbone(x_t, t, ∅)), and the op's
    difference quotient (u⁺ - u⁻)/(s⁺ - s⁻) on the r≠s rows is the total derivative of
    u(y, s, r) = y1 - head(y, s, r; m) along the tangent (ṽ, 1, 0), computed exactly by
    torch.func.jvp — float64, zero-initialised layers made non-zero, ω = 3 (dropped rows: ṽ = v_in)."""
    gen = torch.Generator().manual_seed(77)
    student = make_student(seed=5, dtype=F64, gen=gen)
    batch = make_batch(8, gen, F64)
    cfg = TMMeanFlowConfig(equal_fraction=0.25, cond_dropout=0.25, cfg_scale=3.0)
    seen = spy_on_loss_op(monkeypatch)
    with true_float64():
        tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(9))
        d = naive_draws(batch, cfg, torch.Generator().manual_seed(9))
        v_tilde = naive_guided_velocity(student, None, d, cfg)
        fd = d["r"] != d["s"]
        assert 0 < int(fd.sum()) < 8 and 0 < int(d["dropped"].sum()) < 8 and bool((fd & ~d["dropped"]).any())
        with torch.no_grad():
            feats = student.backbone(d["x_t"], d["t"], d["text"])

            def u_of(y, sigma):
                return d["y1"] - student.head(y, sigma, d["r"], feats)
            with tmmf.forward_ad_friendly():
                _, exact = torch.func.jvp(u_of, (d["y_s"], d["s"]), (v_tilde, torch.ones_like(d["s"])))
    (op,) = seen
    torch.testing.assert_close(op["v"], v_tilde, atol=1e-10, rtol=1e-10)
    assert rel_err(v_tilde - d["v_in"], d["v_in"])[~d["dropped"]].min() > 0.1     # guidance moves the tangent
    quotient = (op["u_plus"] - op["u_minus"]) / per(op["s_plus"] - op["s_minus"], op["u_plus"])
    err = rel_err(quotient[fd], exact[fd])
    # the FD truncation error grows with the tangent (|ṽ| ≈ 2.6·|v_in| here): measured 0.6–1.9e-4;
    # along the conditional v_in instead the error on the guided rows is 0.3–0.4
    assert float(err.max()) < 5e-4, err


def test_bf16_autocast_step(gen):
    """Under bf16 autocast (CPU) the step runs and backpropagates into the backbone, with the FD
    pass at float32 (default) and under autocast (fd_autocast=True)."""
    student = make_student()
    teacher = tiny_teacher(seed=0)
    batch = make_batch(4, gen)
    for fd_autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict, log = tm_meanflow(student, batch, TMMeanFlowConfig(equal_fraction=0.0, fd_autocast=fd_autocast),
                                         torch.Generator().manual_seed(2), teacher=teacher)
        loss_dict["loss"].backward()
        assert torch.isfinite(loss_dict["loss"]) and log["frac_fd"].item() > 0
        assert student.transformer.blocks[0].attn1.to_q.weight.grad is not None
        student.zero_grad(set_to_none=True)


def test_fd_pass_only_when_needed(gen):
    """With no r≠s row the FD pass does not run (no stand-in rows): the head sees only the B rows
    of the loss and the loss equals the plain TM objective's on the same draws. ``any_process``
    (the or over the processes under FSDP) is asked exactly once per evaluation, with the local
    flag, whatever it is; when it says another process runs the pass, this one runs it on one
    stand-in row (2 head rows) and discards it."""
    student = make_student()
    teacher = tiny_teacher(seed=0)
    batch = make_batch(4, gen)
    H = 2
    none_fd = TMMeanFlowConfig(equal_fraction=1.0, cond_dropout=1.0, cfg_source="teacher")

    def run(cfg, any_process=None):
        with count_blocks(student.transformer.blocks[-H:], 1) as head:
            loss, log = tm_meanflow(student, batch, cfg, torch.Generator().manual_seed(4), teacher=teacher,
                                    any_process=any_process)
        return loss["loss"], log, head.rows

    loss_tm, _, rows_tm = run(dataclasses.replace(none_fd, variant="tm"))
    loss_alone, log, rows_alone = run(none_fd)
    assert log["frac_fd"].item() == 0 and log["frac_dropped"].item() == 1
    assert rows_tm == rows_alone == 4 * H
    torch.testing.assert_close(loss_alone, loss_tm, atol=0, rtol=0)
    for others_need_it in (False, True):
        calls: list[bool] = []
        loss, _, rows = run(none_fd, lambda flag, o=others_need_it, seen=calls: seen.append(flag) or flag or o)
        assert calls == [False]
        assert rows == (4 + 2 * others_need_it) * H
        torch.testing.assert_close(loss, loss_tm, atol=0, rtol=0)
    calls = []
    some_fd = dataclasses.replace(none_fd, equal_fraction=0.0)
    loss_some, log, rows = run(some_fd, lambda flag: calls.append(flag) or flag)
    assert calls == [True] and rows == (4 + 2 * 4) * H and log["frac_fd"].item() == 1
    torch.testing.assert_close(loss_some, run(some_fd)[0], atol=0, rtol=0)
    calls = []
    run(dataclasses.replace(none_fd, variant="tm"), lambda flag: calls.append(flag) or flag)
    assert calls == []                         # the plain TM objective has no FD pass on any process


@pytest.mark.slow
@pytest.mark.dist
def test_fd_pass_decided_collectively_under_fsdp2(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2 on every block and the root, as the method shards):
    process 0 has only r≠s rows, process 1 none. The head's blocks are all-gathered inside the FD
    pass, so process 1 runs it on a stand-in row (2 head rows) because process 0 needs it; the
    losses equal those of an unsharded student. (Each process deciding alone times out.)"""
    proc = torchrun([str(TESTS / "objectives" / "tm_meanflow_dist_worker.py"), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, output(proc)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["frac_fd"] == [1.0, 1.0] and ranks[1]["frac_fd"] == [0.0, 0.0]
    # per step, the last head block sees: u (2 rows), the unconditional pass (2), the FD pass
    assert ranks[0]["head_rows"] == [2, 2, 4] * 2
    assert ranks[1]["head_rows"] == [2, 2, 2] * 2
    for r in ranks:
        torch.testing.assert_close(r["losses"], r["reference"], atol=0, rtol=1e-5)
