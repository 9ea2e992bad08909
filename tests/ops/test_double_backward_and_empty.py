"""Second (and third) derivatives through every op, and empty tensors (docs/design.md §3.4):
gradgradcheck in float64, the first-order values unchanged by create_graph, the meanflow loss's
stop-gradient Hessian, and empty inputs against the reference (forward and backward)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import randn

import tmd_ext
from tmd_ext import reference


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _scalar(dtype, gen) -> torch.Tensor:
    return randn(1, dtype=dtype, gen=gen).reshape(())


def cases(dtype, gen, b=2, t=3, d=5, k=4):
    """op name -> (fn of the differentiable tensors, those tensors); the other arguments closed over."""
    def r(*shape):
        return randn(*shape, dtype=dtype, gen=gen)

    time_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = (0.1 + 0.8 * torch.rand(b, generator=gen, dtype=torch.float64)).to(time_dtype)
    rr = s * torch.rand(b, generator=gen, dtype=torch.float64).to(time_dtype)
    # meanflow: sample 1 plain (s == r) with NaN in u_plus there (never read)
    up, um, v = r(b, t, d), r(b, t, d), r(b, t, d)
    r_mf = rr.clone()
    if b > 1:
        r_mf[1] = s[1]
        up[1] = float("nan")
    sp, sm = s + 5e-3, s - 5e-3
    return {
        "adaln_modulate": (lambda x, sh, sc: tmd_ext.adaln_modulate(x, sh, sc, 1e-3), (r(b, t, d), r(b, d), r(b, d))),
        "gated_fusion": (tmd_ext.gated_fusion, (r(b, t, d), r(b, t, d), r(b, d), _scalar(dtype, gen))),
        "gated_fusion_linear": (tmd_ext.gated_fusion_linear,
                                (r(b, t, d), r(b, t, k), r(d, k), r(d), r(b, d), _scalar(dtype, gen))),
        "gated_fusion_linear_nobias": (
            lambda m, x, w, g, a: tmd_ext.gated_fusion_linear(m, x, w, None, g, a),
            (r(b, t, d), r(b, t, k), r(d, k), r(b, d), _scalar(dtype, gen))),
        "flow_step": (lambda y, h, y1: tmd_ext.flow_step(y, h, y1, s, rr), (r(b, t, d), r(b, t, d), r(b, t, d))),
        # mse's gradient is its true derivative; the loss's is not (stop-gradient denominator): below
        "meanflow_fd_loss_mse": (lambda u: tmd_ext.meanflow_fd_loss(u, up, um, v, s, r_mf, sp, sm, 2.5)[1],
                                 (r(b, t, d),)),
    }


OPS = list(cases(torch.float64, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("op", OPS)
def test_gradgradcheck(op, gen):
    fn, args = cases(torch.float64, gen, b=2, t=2, d=4, k=3)[op]
    args = tuple(_leaf(a) for a in args)
    with warnings.catch_warnings():  # a backward op differentiated without autograd only warns
        warnings.simplefilter("error")
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_fusion", "gated_fusion_linear"])
def test_third_derivatives(op, gen):
    """gradgradcheck of the gradient itself (recorded with create_graph): third derivatives."""
    fn, args = cases(torch.float64, gen, b=2, t=2, d=3, k=2)[op]
    args = tuple(_leaf(a) for a in args)
    w = randn(*fn(*args).shape, dtype=torch.float64, gen=gen, requires_grad=True)

    def grad_fn(w, *xs):
        return torch.autograd.grad((fn(*xs) * w).sum(), xs, create_graph=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradgradcheck(grad_fn, (w, *args))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_create_graph_keeps_kernel_values(op, dtype, gen):
    """Recording the backward changes no first-order value: the kernel's gradients, bit for bit."""
    fn, args = cases(dtype, gen, b=2, t=5, d=24, k=16)[op]
    leaves = tuple(_leaf(a) for a in args)
    out = fn(*leaves)
    w = randn(*out.shape, dtype=out.dtype, gen=gen, requires_grad=True)
    plain = torch.autograd.grad(fn(*leaves), leaves, w)
    recorded = torch.autograd.grad(fn(*leaves), leaves, w, create_graph=True)
    for a, b in zip(plain, recorded, strict=True):
        assert b.requires_grad and torch.equal(a, b.detach())


def test_meanflow_loss_hessian_holds_stop_gradients_constant(gen):
    """The loss's second derivative w.r.t. u is that of the reference: with û and the denominator
    sg(‖Δ‖²+c) constant, d²(gl·loss + gm·mse)/du² · w = (2·gl/(‖Δ‖²+c) + 2·gm/d)·w per sample."""
    fn, (u,) = cases(torch.float64, gen, b=3, t=2, d=4)["meanflow_fd_loss_mse"]
    del fn
    b, d, c = u.shape[0], math.prod(u.shape[1:]), 2.5
    rest = [randn(*u.shape, dtype=torch.float64, gen=gen) for _ in range(3)]
    s = 0.1 + 0.8 * torch.rand(b, generator=gen, dtype=torch.float64)
    r = s * 0.4
    r[1] = s[1]
    times = (s, r, s + 5e-3, s - 5e-3)
    gl, gm = torch.rand(b, dtype=torch.float64, generator=gen) + 0.5, torch.rand(b, dtype=torch.float64, generator=gen)
    w = randn(*u.shape, dtype=torch.float64, gen=gen)

    def hvp(f):
        x = _leaf(u)
        loss, mse = f(x, *rest, *times, c)
        (g,) = torch.autograd.grad((gl * loss + gm * mse).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * w).sum(), x)
        return h, mse.detach()

    got, mse = hvp(tmd_ext.meanflow_fd_loss)
    want = (2 * gl / (mse * d + c) + 2 * gm / d)[:, None, None] * w
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, hvp(reference.meanflow_fd_loss)[0], atol=1e-12, rtol=1e-10)


def test_gated_fusion_alpha_curvature(gen):
    """d²/dα² of a loss of the output (‖out‖²) equals the reference's."""
    m, z, gate, alpha = (randn(2, 3, 4, dtype=torch.float64, gen=gen), randn(2, 3, 4, dtype=torch.float64, gen=gen),
                         randn(2, 4, dtype=torch.float64, gen=gen), _scalar(torch.float64, gen))

    def curvature(f):
        a = _leaf(alpha)
        (g,) = torch.autograd.grad(f(m, z, gate, a).square().sum(), a, create_graph=True)
        return torch.autograd.grad(g, a)[0]

    torch.testing.assert_close(curvature(tmd_ext.gated_fusion), curvature(reference.gated_fusion),
                               atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# empty tensors


def _empty_cases(gen, dtype=torch.float32):
    """(op, label) -> (public fn, reference fn, args, indices of the differentiable args)."""
    def r(*shape):
        return randn(*shape, dtype=dtype, gen=gen)

    def times(b):
        s = 0.1 + 0.8 * torch.rand(b, generator=gen)
        return s, s * 0.5, s + 5e-3, s - 5e-3

    out = {}
    for label, (b, t, d) in {"B=0": (0, 3, 4), "T=0": (2, 0, 4), "D=0": (2, 3, 0)}.items():
        out["adaln_modulate", label] = (tmd_ext.adaln_modulate, reference.adaln_modulate,
                                        (r(b, t, d), r(b, d), r(b, d), 1e-6), (0, 1, 2))
        out["gated_fusion", label] = (tmd_ext.gated_fusion, reference.gated_fusion,
                                      (r(b, t, d), r(b, t, d), r(b, d), r(1).reshape(())), (0, 1, 2, 3))
        out["gated_fusion_linear", label] = (tmd_ext.gated_fusion_linear, reference.gated_fusion_linear,
                                             (r(b, t, d), r(b, t, 5), r(d, 5), r(d), r(b, d), r(1).reshape(())),
                                             (0, 1, 2, 3, 4, 5))
        s, rr, _, _ = times(b)
        out["flow_step", label] = (tmd_ext.flow_step, reference.flow_step, (r(b, t, d), r(b, t, d), r(b, t, d), s, rr),
                                   (0, 1, 2))
    for label, bias in (("K=0", True), ("K=0,nobias", False)):
        out["gated_fusion_linear", label] = (tmd_ext.gated_fusion_linear, reference.gated_fusion_linear,
                                             (r(2, 3, 4), r(2, 3, 0), r(4, 0), r(4) if bias else None, r(2, 4),
                                              r(1).reshape(())), (0, 1, 2, 3, 4, 5) if bias else (0, 1, 2, 4, 5))
    out["meanflow_fd_loss", "B=0"] = (tmd_ext.meanflow_fd_loss, reference.meanflow_fd_loss,
                                      (r(0, 2, 3), r(0, 2, 3), r(0, 2, 3), r(0, 2, 3), *times(0), 1.0), (0,))
    return out


EMPTY = list(_empty_cases(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("case", EMPTY, ids=[f"{op}-{label}" for op, label in EMPTY])
def test_empty_matches_reference(case, gen):
    """Empty inputs work like the reference, forward and backward: empty outputs, and gradients
    that sum over an empty dimension are zeros."""
    fn, ref, args, diff = _empty_cases(gen)[case]

    def run(f):
        leaves = [_leaf(a) if i in diff else a for i, a in enumerate(args)]
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        total = sum((o.double() * (1 + torch.arange(o.numel(), dtype=torch.float64).reshape(o.shape))).sum()
                    for o in outs)
        grads = torch.autograd.grad(total, [leaves[i] for i in diff], allow_unused=True)
        return outs, grads

    outs, grads = run(fn)
    want_outs, want_grads = run(ref)
    for o, w in zip(outs, want_outs, strict=True):
        assert o.shape == w.shape and o.dtype == w.dtype
        torch.testing.assert_close(o, w, atol=0, rtol=0)
    for i, g, w in zip(diff, grads, want_grads, strict=True):
        assert g is not None and g.shape == args[i].shape
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    op, label = case
    if label == "T=0" and op != "flow_step":  # per-sample [B, D] and scalar gradients: sums over no tokens
        for i, g in zip(diff, grads, strict=True):
            if args[i].dim() < 3:
                assert g.numel() > 0 and torch.equal(g, torch.zeros_like(g))
    if label.startswith("K=0"):  # z = bias (or 0): a non-empty output
        m, _, _, bias, gate, alpha = args
        z = bias if bias is not None else torch.zeros(4)
        torch.testing.assert_close(outs[0], m + torch.sigmoid(alpha) * gate[:, None, :] * (z - m))


def test_meanflow_rejects_empty_samples(gen):
    """d = 0 elements per sample: mse = ‖Δ‖²/d would be 0/0."""
    u = randn(2, 3, 0, gen=gen)
    s = torch.rand(2, generator=gen)
    with pytest.raises(ValueError, match="u must have at least one element per sample"):
        tmd_ext.meanflow_fd_loss(u, u, u, u, s, s * 0.5, s + 1e-3, s - 1e-3, 1.0)
