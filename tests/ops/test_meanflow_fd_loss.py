"""meanflow_fd_loss: kernel vs reference (forward and gradient), rows with s == r, one-sided
differences, determinism, gradients, registration, compile, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

# [B, C, F, H, W]; the last two span several reduction chunks (CPU 4096, CUDA up to 8192 elements),
# the last one with a per-sample length that no vector width divides.
SHAPES = [(1, 1, 1, 1, 7), (3, 4, 2, 6, 5), (2, 16, 3, 8, 8), (4, 1, 1, 1, 1), (2, 16, 3, 17, 23),
          (3, 5, 3, 31, 37)]
DELTA = 5e-3


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inputs(shape, dtype, device, gen, time_dtype=torch.float32, plain=None, requires_grad=False):
    """(u, u_plus, u_minus, v, s, r, s_plus, s_minus) with central differences of step DELTA.
    `plain` [B] bool marks rows with r == s (default: every odd row)."""
    b = shape[0]
    u, u_plus, v = (randn(*shape, dtype=dtype, device=device, gen=gen) for _ in range(3))
    u_minus = (u_plus.double() + 0.01 * randn(*shape, dtype=torch.float64, device=device, gen=gen)).to(dtype)
    if plain is None:
        plain = torch.arange(b) % 2 == 1
    s = 0.1 + 0.8 * torch.rand(b, generator=gen, dtype=torch.float64)
    r = torch.where(plain, s, s * torch.rand(b, generator=gen, dtype=torch.float64))
    times = [t.to(time_dtype).to(device) for t in (s, r, s + DELTA, s - DELTA)]
    return (u.requires_grad_(requires_grad), u_plus, u_minus, v, *times)


def grads_of(fn, args, c, grad_loss, grad_mse):
    """grad of sum(grad_loss*loss + grad_mse*mse) w.r.t. args[0] (a fresh leaf)."""
    u = args[0].detach().requires_grad_()
    loss, mse = fn(u, *args[1:], c)
    (g,) = torch.autograd.grad((loss * grad_loss).sum() + (mse * grad_mse).sum(), [u])
    return loss.detach(), mse.detach(), g


def check_against_reference(args, c, gen, dtype):
    b = args[0].shape[0]
    device = args[0].device
    gl = torch.rand(b, generator=gen, dtype=torch.float64).to(_acc(dtype)).to(device) + 0.5
    gm = torch.rand(b, generator=gen, dtype=torch.float64).to(_acc(dtype)).to(device) + 0.5
    loss, mse, g = grads_of(tmd_ext.meanflow_fd_loss, args, c, gl, gm)
    loss_r, mse_r, g_r = grads_of(reference.meanflow_fd_loss, args, c, gl, gm)
    assert loss.dtype == mse.dtype == _acc(dtype) and loss.shape == mse.shape == (b,)
    assert g.dtype == dtype and g.shape == args[0].shape
    # loss and mse are fp32 (fp64) from the same rounded inputs: fp32 tolerance for 16-bit dtypes too
    torch.testing.assert_close(loss, loss_r, **TOL[_acc(dtype)])
    torch.testing.assert_close(mse, mse_r, **TOL[_acc(dtype)])
    torch.testing.assert_close(g, g_r, **TOL[dtype])
    return loss, mse, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device, gen):
    args = inputs(shape, dtype, device, gen)
    d = math.prod(shape[1:])
    check_against_reference(args, 0.5 * d, gen, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1e-3, 1.0, 1e4])
def test_values_of_c(c, device, gen):
    args = inputs((4, 3, 2, 4, 5), torch.float32, device, gen)
    check_against_reference(args, c, gen, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_rows_ignore_nonfinite(dtype, device, gen):
    """Rows with s == r never read u_plus/u_minus: NaN/Inf there (and s_plus == s_minus there)
    leave every output finite and equal to the result with finite values in their place."""
    plain = torch.tensor([True, False, True, False, True])
    u, up, um, v, s, r, sp, sm = inputs((5, 4, 2, 6, 5), dtype, device, gen, plain=plain)
    rows = plain.nonzero().flatten().to(device)
    up_bad, um_bad = up.clone(), um.clone()
    up_bad[rows[0]] = float("nan")
    um_bad[rows[1]] = float("inf")
    up_bad[rows[2], 0] = float("-inf")
    um_bad[rows[2], 1] = float("nan")
    sp, sm = sp.clone(), sm.clone()
    sp[rows[0]] = sm[rows[0]]  # a zero FD step is fine where no FD is taken
    c = 100.0
    bad = (u, up_bad, um_bad, v, s, r, sp, sm)
    check_against_reference(bad, c, gen, dtype)
    loss, mse, g = grads_of(tmd_ext.meanflow_fd_loss, bad, c, 1.0, 1.0)
    for t in (loss, mse, g):
        assert torch.isfinite(t).all()
    loss_f, mse_f, g_f = grads_of(reference.meanflow_fd_loss, (u, up, um, v, s, r, sp, sm), c, 1.0, 1.0)
    torch.testing.assert_close(loss, loss_f, **TOL[_acc(dtype)])
    torch.testing.assert_close(mse, mse_f, **TOL[_acc(dtype)])
    torch.testing.assert_close(g, g_f, **TOL[dtype])
    # on plain rows the target is v itself
    acc = _acc(dtype)
    d = u[0].numel()
    want = (u.to(acc) - v.to(acc))[rows].square().flatten(1).sum(1) / d
    torch.testing.assert_close(mse[rows], want, **TOL[acc])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("all_plain", [True, False])
def test_uniform_batches(all_plain, device, gen):
    b = 3
    args = inputs((b, 2, 3, 4, 4), torch.float32, device, gen, plain=torch.full((b,), all_plain))
    check_against_reference(args, 10.0, gen, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["plus", "minus"])
def test_one_sided_is_exact_for_linear_u(side, device, gen):
    """Along u(s') = A + s'·B the difference quotient is exactly B, central or one-sided, so
    û = v - (s-r)·B; checked against this closed form (no reference involved) in float64."""
    shape = (4, 3, 2, 5, 7)
    A, B, v, u = (randn(*shape, dtype=torch.float64, device=device, gen=gen) for _ in range(4))
    s = torch.tensor([0.999, 0.5, 0.3, 0.002], dtype=torch.float64, device=device)
    r = torch.tensor([0.2, 0.5, 0.1, 0.001], dtype=torch.float64, device=device)
    sp, sm = (s, s - DELTA) if side == "plus" else (s + DELTA, s)
    col = (-1, 1, 1, 1, 1)
    u_plus, u_minus = A + sp.view(col) * B, A + sm.view(col) * B
    c = 3.0
    loss, mse = tmd_ext.meanflow_fd_loss(u, u_plus, u_minus, v, s, r, sp, sm, c)
    delta = u - (v - (s - r).view(col) * B)
    dsq = delta.square().flatten(1).sum(1)
    torch.testing.assert_close(mse, dsq / delta[0].numel(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(loss, dsq / (dsq + c), atol=1e-9, rtol=1e-9)
    check_against_reference((u, u_plus, u_minus, v, s, r, sp, sm), c, gen, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("time_dtypes", [(torch.float64,) * 4, (torch.float32, torch.float64) * 2])
def test_time_dtypes_noncontiguous_and_misaligned(time_dtypes, device, gen):
    u, up, um, v, s, r, sp, sm = inputs((3, 4, 2, 6, 5), torch.float32, device, gen, torch.float64)
    s, r, sp, sm = (t.to(dt) for t, dt in zip((s, r, sp, sm), time_dtypes, strict=True))
    # a contiguous view at an odd element offset: misaligned for 16-byte loads
    buf = torch.empty(u.numel() + 1, dtype=u.dtype, device=device)
    buf[1:] = v.flatten()
    v_off = buf[1:].view(v.shape)
    args = (noncontig(u), up.transpose(-1, -2).contiguous().transpose(-1, -2), noncontig(um), v_off, s, r, sp, sm)
    loss, mse, _ = check_against_reference(args, 7.0, gen, torch.float32)
    loss_c, mse_c, _ = grads_of(tmd_ext.meanflow_fd_loss, (u, up, um, v, s, r, sp, sm), 7.0, 1.0, 1.0)
    torch.testing.assert_close(loss, loss_c, **TOL[torch.float32])
    torch.testing.assert_close(mse, mse_c, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, gen):
    args = inputs((3, 16, 3, 17, 23), torch.float32, device, gen)
    first = grads_of(tmd_ext.meanflow_fd_loss, args, 50.0, 1.0, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = grads_of(tmd_ext.meanflow_fd_loss, args, 50.0, 1.0, 1.0)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    """float64, w.r.t. u; a plain row holds NaN in u_plus. mse: gradcheck (its gradient is the true
    derivative). loss: its denominator is stop-gradient, so the true derivative is the op's
    gradient times (1 - loss) = c/(|delta|^2+c); checked along random directions."""
    u, up, um, v, s, r, sp, sm = inputs((3, 2, 1, 3, 5), torch.float64, device, gen, torch.float64,
                                        requires_grad=True)
    up = up.clone()
    up[1] = float("nan")  # row 1 is plain
    c = 2.5

    def f(u):
        return tmd_ext.meanflow_fd_loss(u, up, um, v, s, r, sp, sm, c)

    assert torch.autograd.gradcheck(lambda u: f(u)[1], (u,))
    loss, _ = f(u)
    (g,) = torch.autograd.grad(loss.sum(), [u])
    eps = 1e-6
    for _ in range(3):
        w = randn(*u.shape, dtype=torch.float64, device=device, gen=gen)
        with torch.no_grad():
            numeric = (f(u + eps * w)[0] - f(u - eps * w)[0]) / (2 * eps)
        analytic = (g * w).flatten(1).sum(1) * (1 - loss.detach())
        torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_to_other_inputs(device, gen):
    args = [t.detach().requires_grad_() for t in inputs((2, 3, 4), torch.float32, device, gen)]
    loss, mse = tmd_ext.meanflow_fd_loss(*args, 1.0)
    (loss.sum() + mse.sum()).backward()
    assert args[0].grad is not None and torch.isfinite(args[0].grad).all()
    for t in args[1:]:
        assert t.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, gen):
    args = inputs((3, 3, 5), dtype, device, gen, requires_grad=dtype == torch.float32)
    torch.library.opcheck(torch.ops.tmd.meanflow_fd_loss.default, (*args, 4.0))
    b = args[0].shape[0]
    _, mse = torch.ops.tmd.meanflow_fd_loss(*(a.detach() for a in args), 4.0)
    gl, gm = (torch.rand(b, generator=gen).to(device) for _ in range(2))
    torch.library.opcheck(torch.ops.tmd.meanflow_fd_loss_backward.default,
                          (gl, gm, args[0].detach(), *args[1:], mse, 4.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_delta(device, dtype, gen):
    """meanflow_fd_loss_delta (the forward that keeps Δ) and the backward from Δ."""
    args = inputs((3, 3, 5), dtype, device, gen, requires_grad=dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.tmd.meanflow_fd_loss_delta.default, (*args, 4.0))
    b = args[0].shape[0]
    _, mse, delta = torch.ops.tmd.meanflow_fd_loss_delta(*(a.detach() for a in args), 4.0)
    gl, gm = (torch.rand(b, generator=gen).to(device) for _ in range(2))
    torch.library.opcheck(torch.ops.tmd.meanflow_fd_loss_delta_backward.default, (gl, gm, delta, mse, 4.0))
    if delta.dtype == _acc(dtype):
        torch.library.opcheck(torch.ops.tmd.meanflow_fd_loss_delta_backward_.default, (gl, gm, delta.clone(), mse, 4.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_delta_backward(device, dtype, gen):
    """The in-place backward writes over Δ the same bits the out-of-place one returns; a non-contiguous Δ
    is refused (a contiguous copy would take the result)."""
    args = inputs((3, 5, 3, 31, 37), dtype, device, gen)
    _, mse, delta = torch.ops.tmd.meanflow_fd_loss_delta(*args, 9.0)
    gl, gm = (torch.rand(3, generator=gen, dtype=dtype).to(device) + 0.5 for _ in range(2))
    want = torch.ops.tmd.meanflow_fd_loss_delta_backward(gl, gm, delta, mse, 9.0)
    buf = delta.clone()
    assert torch.ops.tmd.meanflow_fd_loss_delta_backward_(gl, gm, buf, mse, 9.0) is None
    assert torch.equal(buf, want) and not torch.equal(buf, delta)
    with pytest.raises(RuntimeError, match="delta must be contiguous"):
        torch.ops.tmd.meanflow_fd_loss_delta_backward_(gl, gm, delta.transpose(1, 2), mse, 9.0)


def test_autograd_writes_grad_over_delta_only_when_delta_is_dead(gen, monkeypatch):
    """A plain backward takes the in-place op; retain_graph=True and create_graph=True take the
    out-of-place one (Δ is used again), and a second retained backward gives the same gradient."""
    calls = []
    for name in ("meanflow_fd_loss_delta_backward", "meanflow_fd_loss_delta_backward_"):
        op = getattr(torch.ops.tmd, name)
        monkeypatch.setattr(torch.ops.tmd, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    args = inputs((2, 3, 4, 5), torch.float32, "cpu", gen, requires_grad=True)
    u = args[0]
    _, _, g_ref = grads_of(reference.meanflow_fd_loss, args, 2.0, torch.ones(2), torch.full((2,), 0.5))

    def total():
        loss, mse = tmd_ext.meanflow_fd_loss(*args, 2.0)
        return loss.sum() + 0.5 * mse.sum()

    (g,) = torch.autograd.grad(total(), [u])
    assert calls == ["meanflow_fd_loss_delta_backward_"]
    torch.testing.assert_close(g, g_ref)
    calls.clear()
    y = total()
    first = torch.autograd.grad(y, [u], retain_graph=True)[0]
    second = torch.autograd.grad(y, [u])[0]
    assert calls == ["meanflow_fd_loss_delta_backward", "meanflow_fd_loss_delta_backward_"]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, g_ref)
    calls.clear()
    (g2,) = torch.autograd.grad(total(), [u], create_graph=True)
    assert "meanflow_fd_loss_delta_backward_" not in calls
    torch.testing.assert_close(g2, g_ref)
    calls.clear()
    loss, mse, delta = torch.ops.tmd.meanflow_fd_loss_delta(*args, 2.0)  # the op's caller holds Δ
    before = delta.clone()
    (g3,) = torch.autograd.grad(loss.sum() + 0.5 * mse.sum(), [u])
    assert calls == ["meanflow_fd_loss_delta_backward"] and torch.equal(delta, before)
    torch.testing.assert_close(g3, g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 2, 6, 5), (3, 5, 3, 31, 37)])
def test_delta_path_equals_recompute_path(shape, dtype, device, gen):
    """Both forwards give the same loss and mse bit for bit; Δ equals the reference's Δ; the two backwards
    (from the saved Δ, and recomputing Δ from the four inputs) agree with each other and the reference."""
    args = inputs(shape, dtype, device, gen)
    c = 3.0
    loss, mse = torch.ops.tmd.meanflow_fd_loss(*args, c)
    loss_d, mse_d, delta = torch.ops.tmd.meanflow_fd_loss_delta(*args, c)
    assert torch.equal(loss, loss_d) and torch.equal(mse, mse_d)
    assert delta.dtype == _acc(dtype) and delta.shape == args[0].shape and delta.is_contiguous()
    acc = _acc(dtype)
    u, up, um, v, s, r, sp, sm = (a.to(acc) if a.is_floating_point() and a.dim() > 1 else a for a in args)
    a = ((s.double() - r.double()) / (sp.double() - sm.double())).to(acc)
    fd = (s != r).view(-1, *[1] * (u.dim() - 1))
    want = torch.where(fd, u - (v - a.view_as(fd) * (up - um)), u - v)
    torch.testing.assert_close(delta, want, **TOL[acc])
    b = shape[0]
    gl, gm = (torch.rand(b, generator=gen, dtype=torch.float64).to(acc).to(device) + 0.5 for _ in range(2))
    g_delta = torch.ops.tmd.meanflow_fd_loss_delta_backward(gl, gm, delta, mse, c)
    g_recompute = torch.ops.tmd.meanflow_fd_loss_backward(gl, gm, *args, mse, c)
    assert g_delta.dtype == acc and g_recompute.dtype == dtype
    torch.testing.assert_close(g_delta.to(dtype), g_recompute, **TOL[dtype])
    _, _, g_ref = grads_of(reference.meanflow_fd_loss, args, c, gl, gm)
    torch.testing.assert_close(g_recompute, g_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_which_forward_keeps_delta(dtype, gen, monkeypatch):
    """The public function keeps Δ exactly when u is fp32/fp64 and a gradient will be taken."""
    calls = []
    for name in ("meanflow_fd_loss", "meanflow_fd_loss_delta"):
        op = getattr(torch.ops.tmd, name)
        monkeypatch.setattr(torch.ops.tmd, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    args = inputs((2, 3, 4), dtype, "cpu", gen, requires_grad=True)
    loss, mse = tmd_ext.meanflow_fd_loss(*args, 1.0)
    (loss.sum() + mse.sum()).backward()
    keeps = dtype in (torch.float32, torch.float64)
    assert calls == ["meanflow_fd_loss_delta" if keeps else "meanflow_fd_loss"]
    with torch.no_grad():
        tmd_ext.meanflow_fd_loss(*args, 1.0)
    assert calls[-1] == "meanflow_fd_loss"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", ["loss", "mse"])
def test_one_output_used(used, dtype, gen):
    """A gradient from loss alone or mse alone (the other output's gradient is None in the backward,
    which fills it in): the reference's gradient, on the Δ path (fp32/fp64) and the recompute path."""
    args = inputs((3, 4, 2, 6, 5), dtype, "cpu", gen)
    b, c = 3, 7.0
    w = torch.rand(b, generator=gen, dtype=torch.float64).to(_acc(dtype)) + 0.5
    zero = torch.zeros_like(w)
    gl, gm = (w, zero) if used == "loss" else (zero, w)
    u = args[0].detach().requires_grad_()
    out = tmd_ext.meanflow_fd_loss(u, *args[1:], c)[0 if used == "loss" else 1]
    (g,) = torch.autograd.grad((out * w).sum(), [u])
    _, _, g_ref = grads_of(reference.meanflow_fd_loss, args, c, gl, gm)
    torch.testing.assert_close(g, g_ref, **TOL[dtype])


def test_delta_backward_fills_nothing_of_u_size(gen):
    """Δ is a non-differentiable output: the backward of the Δ path materialises no zero gradient of u's
    size for it (a fill of one u-sized tensor per step; 0.15 ms at 1x1024x1536 fp32 on one core)."""
    args = inputs((2, 16, 3, 8, 8), torch.float32, "cpu", gen, requires_grad=True)
    loss, mse = tmd_ext.meanflow_fd_loss(*args, 5.0)
    with torch.profiler.profile(record_shapes=True) as prof:
        (loss.sum() + mse.sum()).backward()
    u_shape = list(args[0].shape)
    fills = [e.name for e in prof.events()
             if e.name in ("aten::fill_", "aten::zero_", "aten::zeros_like", "aten::zeros")
             and any(list(s) == u_shape for s in e.input_shapes)]
    assert fills == []
    assert args[0].grad is not None and args[0].grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_mse", [True, False])
def test_compile_fullgraph(use_mse, device, gen):
    """Forward + backward through the public function; c is an argument, so the second call (a new
    value) recompiles with a symbolic c. On CPU only the use_mse case generates code with inductor;
    the other runs aot_eager (dynamo and AOTAutograd through the fake kernels, no codegen), which
    keeps the suite fast."""
    backend = "inductor" if use_mse or device == "cuda" else "aot_eager"
    args = inputs((3, 4, 6), torch.float32, device, gen, requires_grad=True)

    def f(u, up, um, v, s, r, sp, sm, c):
        loss, mse = tmd_ext.meanflow_fd_loss(u, up, um, v, s, r, sp, sm, c)
        return loss.mean() + 0.5 * mse.mean() if use_mse else loss.mean()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    for c in (12.0, 30.0):
        got = compiled(*args, c)
        got.backward()
        g_compiled = args[0].grad.clone()
        args[0].grad = None
        want = f(*args, c)
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_compiled, args[0].grad)
        args[0].grad = None


def test_bad_input(gen):
    u, up, um, v, s, r, sp, sm = inputs((2, 3, 4), torch.float32, "cpu", gen)
    ok = (u, up, um, v, s, r, sp, sm)

    def with_(i, t):
        return tuple(t if j == i else a for j, a in enumerate(ok))

    sp_zero_step = sp.clone()
    sp_zero_step[0] = sm[0]  # row 0 has s != r
    cases = [
        ((*with_(1, up[:, :2]), 1.0), "u_plus"),
        ((*with_(2, um.double()), 1.0), "u_minus"),
        ((*with_(3, v[:1]), 1.0), "v"),
        ((*with_(4, s.half()), 1.0), "s"),
        ((*with_(5, r[:1]), 1.0), "r"),
        ((*with_(6, sp[None]), 1.0), "s_plus"),
        ((*with_(7, sm.int()), 1.0), "s_minus"),
        ((*with_(0, u.int()), 1.0), "u"),
        ((u[:, :0], up[:, :0], um[:, :0], v[:, :0], s, r, sp, sm, 1.0), "u"),
        ((torch.tensor(1.0), up, um, v, s, r, sp, sm, 1.0), "u"),
        ((*ok, 0.0), "c"),
        ((*ok, -1.0), "c"),
        ((*ok, float("nan")), "c"),
        ((*ok, float("inf")), "c"),
        ((*with_(6, sp_zero_step), 1.0), "s_plus"),
    ]
    for args, name in cases:
        with pytest.raises((ValueError, RuntimeError), match=name):
            tmd_ext.meanflow_fd_loss(*args)
        with pytest.raises(RuntimeError, match=name):  # the C++ checks, for direct op callers
            torch.ops.tmd.meanflow_fd_loss(*args)
    # an empty batch: the public function returns the reference's result (test_empty); the kernels reject it
    with pytest.raises(RuntimeError, match="u"):
        torch.ops.tmd.meanflow_fd_loss(u[:0], up[:0], um[:0], v[:0], s[:0], r[:0], sp[:0], sm[:0], 1.0)
    with pytest.raises(TypeError, match="c"):
        tmd_ext.meanflow_fd_loss(*ok, torch.tensor(1.0))

    _, mse = tmd_ext.meanflow_fd_loss(*ok, 1.0)
    g = torch.ones(2)
    bwd_cases = [
        ((g[:1], g, *ok, mse, 1.0), "grad_loss"),
        ((g, g.int(), *ok, mse, 1.0), "grad_mse"),
        ((g, g, *ok, mse[None], 1.0), "mse"),
        ((g, g, *with_(3, v.double()), mse, 1.0), "v"),
        ((g, g, *ok, mse, 0.0), "c"),
        ((g, g, *with_(6, sp_zero_step), mse, 1.0), "s_plus"),
    ]
    for args, name in bwd_cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.tmd.meanflow_fd_loss_backward(*args)

    _, mse, delta = torch.ops.tmd.meanflow_fd_loss_delta(*ok, 1.0)
    delta_cases = [
        ((g[:1], g, delta, mse, 1.0), "grad_loss"),
        ((g, g.int(), delta, mse, 1.0), "grad_mse"),
        ((g, g, delta, mse[None], 1.0), "mse"),
        ((g, g, delta.half(), mse, 1.0), "delta"),
        ((g, g, delta[:, :0], mse, 1.0), "delta"),
        ((g, g, torch.tensor(1.0), mse, 1.0), "delta"),
        ((g, g, delta, mse, float("nan")), "c"),
    ]
    for args, name in delta_cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.tmd.meanflow_fd_loss_delta_backward(*args)
        with pytest.raises(RuntimeError, match=name):
            torch.ops.tmd.meanflow_fd_loss_delta_backward_(*args)


@pytest.mark.cuda
def test_bad_device(gen):
    u, up, um, v, s, r, sp, sm = inputs((2, 3, 4), torch.float32, "cuda", gen)
    for args, name in (((u, up, um.cpu(), v, s, r, sp, sm), "u_minus"), ((u, up, um, v, s, r, sp.cpu(), sm), "s_plus")):
        with pytest.raises((ValueError, RuntimeError), match=name):
            tmd_ext.meanflow_fd_loss(*args, 1.0)
        with pytest.raises(RuntimeError, match=name):
            torch.ops.tmd.meanflow_fd_loss(*args, 1.0)
