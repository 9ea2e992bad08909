"""Stage-2 pieces: the roll-out generator sample, the DMD loss (analytic gradient), the fake-score
loss, and the Conv3D discriminator on teacher features — tiny random Wan models, CPU."""
from __future__ import annotations

import pytest
import torch
from support.tiny import DIM, LATENT, TINY_CONFIG, randomize_zero_init, tiny_inputs, tiny_teacher

from tmd_train.models import TMDStudent, teacher_velocity
from tmd_train.models.discriminator import (
    Conv3DDiscriminator,
    default_blocks,
    gan_discriminator_loss,
    gan_generator_loss,
    teacher_block_features,
)
from tmd_train.objectives.dmd import (
    DMDConfig,
    dmd_loss,
    fake_score_loss,
    gan_inputs,
    generator_sample,
    generator_sample_plain,
)
from tmd_train.schedules import shift_time, shifted_grid

B = 2


def frozen(seed):
    return tiny_teacher(seed=seed).requires_grad_(False)


def make_student(seed=0):
    student = TMDStudent.from_teacher(tiny_teacher(seed=seed), head_blocks=2)
    randomize_zero_init(student, torch.Generator().manual_seed(seed + 100))
    return student


def per(t, like):
    return t.to(like.dtype).reshape(-1, 1, 1, 1, 1)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, t, text = tiny_inputs(B, g)
    x1 = torch.randn(B, *LATENT, generator=g)
    y1 = torch.randn(B, *LATENT, generator=g)
    neg = torch.randn(text.shape[1:], generator=g)
    return x0, x1, t, text, y1, neg


def grads(module):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()]


# ---------------------------------------------------------------------------- DMD loss
def test_dmd_gradient_is_analytic():
    teacher, fake = frozen(1), frozen(2)
    x0, _, _, text, _, neg = data()
    x_hat = (x0 * torch.tensor([1.0, 3.0]).reshape(-1, 1, 1, 1, 1)).requires_grad_(True)
    cfg = DMDConfig()
    losses, log = dmd_loss(x_hat, teacher, fake, text, neg, cfg, torch.Generator().manual_seed(7))
    losses["loss"].backward()

    g = torch.Generator().manual_seed(7)
    tau = shift_time(torch.rand(B, generator=g, dtype=torch.float64), 5.0).clamp(0.001, 0.999)
    eps = torch.randn(x_hat.shape, generator=g)
    x = x_hat.detach()
    x_tau = (1 - per(tau, x)) * x + per(tau, x) * eps
    v_c = teacher_velocity(teacher, x_tau, tau, text)
    v_n = teacher_velocity(teacher, x_tau, tau, neg.expand(B, -1, -1))
    x0_real = x_tau - per(tau, x) * (v_n + 5.0 * (v_c - v_n))
    x0_fake = x_tau - per(tau, x) * teacher_velocity(fake, x_tau, tau, text)
    norm = (x - x0_real).abs().flatten(1).mean(1)
    expected = (x0_fake - x0_real) / per(norm, x) / x.numel()
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(x_hat.grad, expected, rtol=1e-4, atol=1e-9)
    expected_loss = 0.5 * ((x0_fake - x0_real) / per(norm, x)).pow(2).mean()
    torch.testing.assert_close(losses["loss"].detach(), expected_loss, rtol=1e-4, atol=0)
    assert all(torch.isfinite(v).all() for v in log.values())
    assert all(p.grad is None for p in (*teacher.parameters(), *fake.parameters()))


def test_dmd_config_validation():
    with pytest.raises(ValueError, match="fake_time"):
        DMDConfig(fake_time="x")
    with pytest.raises(ValueError, match="tau_min"):
        DMDConfig(tau_min=0.5, tau_max=0.4)


# ---------------------------------------------------------------------------- generator samples
def rollout_grads(student, teacher, fake, detach_first: bool):
    """Grads of the student after the DMD loss of a hand-written N=2 roll-out, optionally with the
    first inner step's output detached."""
    x0, x1, t, text, y1, neg = data()
    s_grid = shifted_grid(2, 10.0, 0.999)
    student.zero_grad()
    x_t = (1 - per(t, x0)) * x0 + per(t, x0) * x1
    feats = student.backbone(x_t, t, text)
    y = y1
    for j in (2, 1):
        s, r = s_grid[j].expand(B).contiguous(), s_grid[j - 1].expand(B).contiguous()
        y = student._inner_step(y, s, r, feats, y1)
        if j == 2 and detach_first:
            y = y.detach()
    x_hat = x_t - per(t, x_t) * y
    dmd_loss(x_hat, teacher, fake, text, neg, DMDConfig(), torch.Generator().manual_seed(3))[0]["loss"].backward()
    return x_hat.detach(), grads(student)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_rollout_gradient_flows_through_every_inner_step(checkpoint):
    teacher, fake = frozen(1), frozen(2)
    student = make_student()
    x0, x1, t, text, y1, neg = data()
    x_hat = generator_sample(student, x0, x1, t, text, y1, shifted_grid(2, 10.0, 0.999), checkpoint=checkpoint)
    assert x_hat.shape == x0.shape and torch.isfinite(x_hat).all()
    dmd_loss(x_hat, teacher, fake, text, neg, DMDConfig(), torch.Generator().manual_seed(3))[0]["loss"].backward()
    full = grads(student)
    ref_x, ref = rollout_grads(student, teacher, fake, detach_first=False)
    _, cut = rollout_grads(student, teacher, fake, detach_first=True)
    torch.testing.assert_close(x_hat.detach(), ref_x)
    names = [n for n, _ in student.named_parameters()]
    head = [i for i, n in enumerate(names) if n.startswith(("fusion.", "transformer.blocks.3"))]
    assert head and all(full[i] is not None for i in head)
    for i in head:
        torch.testing.assert_close(full[i], ref[i], rtol=1e-4, atol=1e-8)
    diff = max(float((full[i] - cut[i]).abs().max()) for i in head)
    scale = max(float(full[i].abs().max()) for i in head)
    assert diff > 1e-3 * scale, "the first inner step contributes no gradient: the roll-out is detached"


def test_plain_generator_sample():
    student = tiny_teacher(seed=3)
    x0, x1, t, text, _, _ = data()
    x_hat = generator_sample_plain(student, x0, x1, t, text)
    x_t = (1 - per(t, x0)) * x0 + per(t, x0) * x1
    with torch.no_grad():
        torch.testing.assert_close(x_hat, x_t - per(t, x_t) * teacher_velocity(student, x_t, t, text))
    x_hat.square().mean().backward()
    assert student.proj_out.weight.grad is not None and float(student.proj_out.weight.grad.abs().max()) > 0


# ---------------------------------------------------------------------------- fake score
@pytest.mark.parametrize("fake_time", ["shifted", "uniform"])
def test_fake_score_loss(fake_time):
    fake = tiny_teacher(seed=2)
    x0, _, _, text, _, _ = data()
    x_hat = x0.clone().requires_grad_(True)
    cfg = DMDConfig(fake_time=fake_time)
    losses, _ = fake_score_loss(fake, x_hat, text, cfg, torch.Generator().manual_seed(5))
    losses["loss"].backward()
    assert x_hat.grad is None
    assert all(p.grad is not None for p in fake.blocks.parameters())

    g = torch.Generator().manual_seed(5)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    tau = shift_time(u, 5.0).clamp(0.001, 0.999) if fake_time == "shifted" else 0.001 + 0.998 * u
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        v = teacher_velocity(fake, (1 - per(tau, x0)) * x0 + per(tau, x0) * eps, tau, text)
    torch.testing.assert_close(losses["loss"].detach(), (v - (eps - x0)).pow(2).mean())


# ---------------------------------------------------------------------------- discriminator
def test_default_blocks():
    assert default_blocks(30) == (15, 22, 29)                            # the paper's lists, 0-based
    assert default_blocks(40) == (19, 29, 39)
    assert default_blocks(4) == (1, 2, 3)
    assert default_blocks(1) == (0,)


def test_teacher_block_features_match_forward_hooks():
    teacher = frozen(1)
    x, t, text = tiny_inputs(B, torch.Generator().manual_seed(0))
    seen = {}
    handles = [teacher.blocks[k].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
               for k in (1, 3)]
    with torch.no_grad():
        teacher_velocity(teacher, x, t, text)
    for h in handles:
        h.remove()
    feats = teacher_block_features(teacher, x, t, text, [3, 1])
    grid = (LATENT[1], LATENT[2] // 2, LATENT[3] // 2)
    for f, k in zip(feats, (3, 1), strict=True):
        assert f.shape == (B, DIM, *grid)
        torch.testing.assert_close(f, seen[k].transpose(1, 2).reshape(B, DIM, *grid))
    with pytest.raises(ValueError, match="blocks"):
        teacher_block_features(teacher, x, t, text, [4])
    with pytest.raises(ValueError, match="frozen"):
        teacher_block_features(tiny_teacher(seed=1), x, t, text, [1])


def test_discriminator_parameters_and_shapes():
    disc = Conv3DDiscriminator(DIM, TINY_CONFIG["num_layers"], width=8, depth=2, groups=4)
    assert disc.blocks == (1, 2, 3)
    assert disc.num_parameters() == Conv3DDiscriminator.expected_parameters(DIM, 8, 2, 3)
    big = Conv3DDiscriminator(1536, 30)
    assert big.num_parameters() == Conv3DDiscriminator.expected_parameters(1536, 256, 2, 3)
    feats = [torch.randn(B, DIM, 3, 4, 4) for _ in range(3)]
    assert disc(feats).shape == (B, 3)
    with pytest.raises(ValueError, match="width"):
        Conv3DDiscriminator(DIM, 4, width=6, groups=4)


def test_gan_losses_route_gradients():
    teacher = frozen(1)
    student = make_student(seed=4)
    disc = Conv3DDiscriminator.for_teacher(teacher, width=8, groups=4)
    x0, x1, t, text, y1, _ = data()
    x_hat = generator_sample(student, x0, x1, t, text, y1, shifted_grid(2, 10.0, 0.999))
    real_t, fake_t, tau = gan_inputs(x0, x_hat, DMDConfig(), torch.Generator().manual_seed(9))
    assert real_t.shape == fake_t.shape == x0.shape and tau.shape == (B,)
    assert bool(((tau >= 0.001) & (tau <= 0.999)).all())
    torch.testing.assert_close(real_t - fake_t, (1 - per(tau, x0)) * (x0 - x_hat))

    g_loss = gan_generator_loss(disc, teacher, fake_t, tau, text)
    assert g_loss.ndim == 0 and torch.isfinite(g_loss)
    g_loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert float(student.transformer.proj_out.weight.grad.abs().max()) > 0

    student.zero_grad(set_to_none=True)
    d_loss = gan_discriminator_loss(disc, teacher, real_t, fake_t, tau, text)
    assert d_loss.ndim == 0 and torch.isfinite(d_loss)
    d_loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())
    assert all(float(h.out.weight.grad.abs().max()) > 0 for h in disc.heads)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())
