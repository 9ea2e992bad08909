"""FlowHeadLoop: the C++ inner-flow loop vs a plain Python loop with tmd_ext.flow_step (bit-exact)
and vs the pure-PyTorch reference.inner_flow (CPU eager path, CUDA graph path and CUDA eager path),
call accounting, static-buffer updates, no host sync on CUDA, and bad input; StaticFlowHeadLoop,
its Python side (static buffers copied per call, rebuilt on a new layout, the eager fallback)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import DTYPES, TOL, noncontig, randn

import tmd_ext
from tmd_ext import reference

SHAPES = [(1, 3), (3, 7), (2, 4, 1, 3, 5), (2, 16, 2, 4, 8)]


class MixHead(torch.nn.Module):
    """A small deterministic head mixing y, s and r: ``tanh(W·y + b)·(1 + s) + (s - r)·y² - r``
    along the last dim (per-sample s, r broadcast)."""

    def __init__(self, d: int, dtype: torch.dtype, device, gen: torch.Generator):
        super().__init__()
        self.lin = torch.nn.Linear(d, d, dtype=dtype, device=device)
        with torch.no_grad():
            self.lin.weight.copy_(randn(d, d, gen=gen) / math.sqrt(d))
            self.lin.bias.copy_(randn(d, gen=gen))

    def forward(self, y: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        b = (-1,) + (1,) * (y.dim() - 1)
        s_, r_ = s.view(b).to(y.dtype), r.view(b).to(y.dtype)
        return torch.tanh(self.lin(y)) * (1 + s_) + (s_ - r_) * y * y - r_


def python_loop(head, y1: torch.Tensor, s_grid: torch.Tensor) -> torch.Tensor:
    """The reference: ``y = y1; for j = N..1: y = flow_step(y, head(y, s_j, s_{j-1}), y1, s_j, s_{j-1})``."""
    b = y1.shape[0]
    y = y1
    for j in range(s_grid.numel() - 1, 0, -1):
        s, r = s_grid[j].expand(b), s_grid[j - 1].expand(b)
        y = tmd_ext.flow_step(y, head(y, s, r), y1, s, r)
    return y


def make_grid(n: int, dtype=torch.float32, device="cpu", gamma: float = 10.0) -> torch.Tensor:
    """An increasing shifted grid [n+1] from 0 to 1 (the inner-grid shift of docs/design.md §1.1)."""
    u = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    return (gamma * u / ((gamma - 1) * u + 1)).to(dtype=dtype, device=device)


def setup(shape, dtype, device, gen, n=3, time_dtype=torch.float32):
    head = MixHead(shape[-1], dtype, device, gen)
    y1 = randn(*shape, dtype=dtype, device=device, gen=gen)
    return head, y1, make_grid(n, time_dtype, device)


# ---------------------------------------------------------------- CPU (eager C++ loop)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 4])
def test_cpu_matches_python_loop(shape, dtype, n, gen):
    head, y1, grid = setup(shape, dtype, "cpu", gen, n)
    loop = tmd_ext.FlowHeadLoop(head, shape, dtype, "cpu", grid)
    assert loop.num_steps == n and not loop.uses_graph
    with torch.no_grad():
        want = python_loop(head, y1, grid)
    got = loop(y1)
    assert got.dtype == dtype and got.shape == shape and not got.requires_grad
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # same ops, same order: bit-identical
    assert loop.num_head_calls == n and loop.num_warmup_calls == 0


@pytest.mark.parametrize("time_dtype", [torch.float32, torch.float64])
def test_cpu_time_dtypes_and_calls(time_dtype, gen):
    """The head sees [B] times of s_grid's dtype; every call runs N heads; y1 is left alone."""
    shape = (2, 3, 1, 2, 5)
    head, _, grid = setup(shape, torch.float64, "cpu", gen, 5, time_dtype)
    seen = []

    def spy(y, s, r):
        seen.append((s.clone(), r.clone()))
        return head(y, s, r)

    loop = tmd_ext.FlowHeadLoop(spy, torch.Size(shape), torch.float64, torch.device("cpu"), grid)
    for call in range(1, 4):
        y1 = randn(*shape, dtype=torch.float64, gen=gen)
        y1_before = y1.clone()
        got = loop(y1)
        assert got.data_ptr() != y1.data_ptr()
        assert torch.equal(y1, y1_before)
        with torch.no_grad():
            torch.testing.assert_close(got, python_loop(head, y1, grid), atol=0, rtol=0)
        assert loop.num_head_calls == 5 * call
    for k, (s, r) in enumerate(seen[:5]):
        j = 5 - k
        assert s.dtype == time_dtype and s.shape == (2,)
        assert torch.equal(s, grid[j].expand(2)) and torch.equal(r, grid[j - 1].expand(2))


def test_cpu_noncontiguous_y1(gen):
    shape = (3, 2, 7)
    head, y1, grid = setup(shape, torch.float32, "cpu", gen)
    loop = tmd_ext.FlowHeadLoop(head, shape, torch.float32, "cpu", grid)
    with torch.no_grad():
        want = python_loop(head, y1, grid)
    torch.testing.assert_close(loop(noncontig(y1)), want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 4])
def test_cpu_matches_reference(shape, dtype, n, gen):
    """The loop against the pure-PyTorch inner flow (reference.flow_step per step)."""
    head, y1, grid = setup(shape, dtype, "cpu", gen, n)
    got = tmd_ext.FlowHeadLoop(head, shape, dtype, "cpu", grid)(y1)
    with torch.no_grad():
        want = reference.inner_flow(head, y1, grid)
    assert want.dtype == dtype and want.shape == shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_reference_is_the_recurrence(gen):
    """reference.inner_flow written out in float64: y <- y - (s_j - s_{j-1})·(y1 - head(y, s_j, s_{j-1})),
    for a shared [N+1] grid and for per-sample [B, N+1] grids."""
    shape = (3, 2, 5)
    head, y1, grid = setup(shape, torch.float64, "cpu", gen, 4, torch.float64)
    per_sample = torch.stack([grid, grid ** 2, grid.sqrt()])
    for g in (grid, per_sample):
        rows = g[None, :].expand(3, -1) if g.dim() == 1 else g
        y = y1
        with torch.no_grad():
            for j in range(4, 0, -1):
                s, r = rows[:, j], rows[:, j - 1]
                y = y - (s - r).view(3, 1, 1) * (y1 - head(y, s, r))
            torch.testing.assert_close(reference.inner_flow(head, y1, g), y, atol=1e-12, rtol=1e-12)


def test_constant_velocity_lands_on_data(gen):
    """With head_out = y (the data) the inner velocity y1 - y is constant: from s=1 to s=0 the loop
    must land exactly on y for any grid."""
    shape = (2, 4, 1, 3, 3)
    x = randn(*shape, dtype=torch.float64, gen=gen)
    y1 = randn(*shape, dtype=torch.float64, gen=gen)
    grid = torch.tensor([0.0, 0.05, 0.4, 0.41, 1.0], dtype=torch.float64)
    loop = tmd_ext.FlowHeadLoop(lambda y, s, r: x, shape, torch.float64, "cpu", grid)
    torch.testing.assert_close(loop(y1), x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(reference.inner_flow(lambda y, s, r: x, y1, grid), x, atol=1e-12, rtol=1e-12)


def test_static_feature_buffer_update(gen):
    """The head reads features from a closure; updating them in place changes the next call."""
    shape = (2, 6)
    feats = randn(*shape, gen=gen)
    head = MixHead(6, torch.float32, "cpu", gen)

    def h(y, s, r):
        return head(y + feats, s, r)

    grid = make_grid(2)
    loop = tmd_ext.FlowHeadLoop(h, shape, torch.float32, "cpu", grid)
    y1 = randn(*shape, gen=gen)
    first = loop(y1)
    feats.copy_(randn(*shape, gen=gen))
    second = loop(y1)
    with torch.no_grad():
        torch.testing.assert_close(second, python_loop(h, y1, grid), atol=0, rtol=0)
    assert not torch.equal(first, second)


def test_grad_free(gen):
    """Inference only: no autograd graph even with parameters and inputs that require grad."""
    shape = (2, 5)
    head, _, grid = setup(shape, torch.float32, "cpu", gen)
    y1 = randn(*shape, gen=gen, requires_grad=True)
    out = tmd_ext.FlowHeadLoop(head, shape, torch.float32, "cpu", grid)(y1)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.is_grad_enabled()


def test_properties_and_repr(gen):
    grid = make_grid(3, torch.float64)
    loop = tmd_ext.FlowHeadLoop(lambda y, s, r: y, [2, 3], torch.bfloat16, "cpu", grid, warmup=4)
    assert loop.shape == (2, 3) and loop.dtype == torch.bfloat16 and loop.device == torch.device("cpu")
    assert torch.equal(loop.s_grid, grid) and loop.s_grid.dtype == torch.float64
    assert loop.warmup == 4 and not loop.captured and not loop.uses_graph
    assert "num_steps=3" in repr(loop) and "uses_graph=False" in repr(loop)


# ---------------------------------------------------------------- bad input


def _good(**kw):
    args = {"head": lambda y, s, r: y, "shape": (2, 3), "dtype": torch.float32, "device": "cpu",
            "s_grid": make_grid(2)}
    args.update(kw)
    return args


@pytest.mark.parametrize("kw, exc, match", [
    ({"head": 3}, TypeError, "head must be callable"),
    ({"shape": "ab"}, TypeError, "shape must be a sequence of ints"),
    ({"shape": ()}, ValueError, "shape must be"),
    ({"shape": (2, 0)}, ValueError, "shape must have every size >= 1"),
    ({"dtype": "float32"}, TypeError, "dtype must be a torch.dtype"),
    ({"dtype": torch.int32}, ValueError, "dtype must be"),
    ({"device": 3}, TypeError, "device must be"),
    ({"device": "blah"}, ValueError, "device must be a valid device string"),
    ({"device": "meta"}, ValueError, "device must be a CPU or CUDA device"),
    ({"s_grid": [0.0, 1.0]}, TypeError, "s_grid must be a torch.Tensor"),
    ({"s_grid": torch.zeros(2, 2)}, ValueError, "s_grid must be 1-D"),
    ({"s_grid": torch.tensor([0.5])}, ValueError, "s_grid must have at least 2 points"),
    ({"s_grid": torch.tensor([0, 1])}, ValueError, "s_grid must have dtype"),
    ({"s_grid": torch.tensor([0.0, 0.5], dtype=torch.float16)}, ValueError, "s_grid must have dtype"),
    ({"s_grid": torch.tensor([0.0, float("nan"), 1.0])}, ValueError, "s_grid must be finite"),
    ({"s_grid": torch.tensor([0.0, float("inf")])}, ValueError, "s_grid must be finite"),
    ({"s_grid": torch.tensor([0.0, 0.5, 0.5, 1.0])}, ValueError, "s_grid must be strictly increasing"),
    ({"s_grid": torch.tensor([1.0, 0.0])}, ValueError, "s_grid must be strictly increasing"),
    ({"s_grid": torch.tensor([-0.1, 1.0])}, ValueError, r"s_grid must lie in \[0, 1\]"),
    ({"s_grid": torch.tensor([0.0, 1.5])}, ValueError, r"s_grid must lie in \[0, 1\]"),
    ({"use_graph": True}, ValueError, "use_graph=True needs a CUDA device"),
    ({"warmup": 0}, ValueError, "warmup must be >= 1"),
])
def test_bad_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        tmd_ext.FlowHeadLoop(**_good(**kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_cuda_device_without_gpu():
    with pytest.raises(ValueError, match="cuda"):
        tmd_ext.FlowHeadLoop(**_good(device="cuda"))


@pytest.mark.parametrize("y1, match", [
    (torch.randn(3, 3), r"y1 must have shape \(2, 3\)"),
    (torch.randn(2, 3, 1), r"y1 must have shape \(2, 3\)"),
    (torch.randn(2, 3, dtype=torch.float64), "y1 must have dtype torch.float32"),
    (torch.randn(2, 3, device="meta"), "y1 must be on device cpu"),
])
def test_bad_y1(y1, match):
    loop = tmd_ext.FlowHeadLoop(**_good())
    with pytest.raises(ValueError, match=match):
        loop(y1)
    with pytest.raises(TypeError, match="y1 must be a torch.Tensor"):
        loop([[1.0, 2.0, 3.0]] * 2)
    assert loop.num_head_calls == 0


@pytest.mark.parametrize("head, exc, match", [
    (lambda y, s, r: y[:1], ValueError, r"head returned a tensor of shape \(1, 3\), expected \(2, 3\)"),
    (lambda y, s, r: y.reshape(3, 2), ValueError, r"head returned a tensor of shape \(3, 2\)"),
    (lambda y, s, r: y.double(), ValueError, "head returned a tensor of dtype torch.float64"),
    (lambda y, s, r: y.to("meta"), ValueError, "head returned a tensor on device meta"),
    (lambda y, s, r: None, TypeError, "head must return a torch.Tensor"),
    (lambda y, s, r: (y,), TypeError, "head must return a torch.Tensor"),
    (lambda y: y, TypeError, "positional argument"),
    (lambda y, s, r: 1 / 0, ZeroDivisionError, "division by zero"),
])
def test_bad_head(head, exc, match):
    loop = tmd_ext.FlowHeadLoop(**_good(head=head))
    with pytest.raises(exc, match=match):
        loop(torch.randn(2, 3))
    # The loop stays usable after a failed call (the busy flag is released).
    with pytest.raises(exc, match=match):
        loop(torch.randn(2, 3))


def test_reentrant_call_is_refused():
    holder = {}

    def head(y, s, r):
        return holder["loop"](y)

    holder["loop"] = tmd_ext.FlowHeadLoop(**_good(head=head))
    with pytest.raises(RuntimeError, match="already running"):
        holder["loop"](torch.randn(2, 3))


# ---------------------------------------------------------------- CUDA (graph path)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_graph_matches_eager(shape, dtype, gen):
    head, y1, grid = setup(shape, dtype, "cuda", gen, 4)
    graph = tmd_ext.FlowHeadLoop(head, shape, dtype, "cuda", grid)
    eager = tmd_ext.FlowHeadLoop(head, shape, dtype, "cuda", grid, use_graph=False)
    assert graph.uses_graph and not eager.uses_graph and graph.device == torch.device("cuda", 0)
    with torch.no_grad():
        want = python_loop(head, y1, grid)
    got_eager = eager(y1)
    torch.testing.assert_close(got_eager, want, atol=0, rtol=0)
    for call in range(1, 4):  # first call captures, the others replay
        y1 = randn(*shape, dtype=dtype, device="cuda", gen=gen)
        with torch.no_grad():
            want = python_loop(head, y1, grid)
        got = graph(y1)
        assert got.dtype == dtype and got.shape == shape and got.device == y1.device
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got, eager(y1), **TOL[dtype])
        assert graph.captured and graph.num_head_calls == 4 * call
        assert graph.num_warmup_calls == graph.warmup + 1  # warm-up + capture, once


@pytest.mark.cuda
def test_cuda_graph_no_host_sync(gen):
    shape = (2, 16, 1, 4, 8)
    head, y1, grid = setup(shape, torch.bfloat16, "cuda", gen, 5)
    loop = tmd_ext.FlowHeadLoop(head, shape, torch.bfloat16, "cuda", grid)
    loop(y1)  # capture
    y1 = randn(*shape, dtype=torch.bfloat16, device="cuda", gen=gen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = loop(y1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        torch.testing.assert_close(got, python_loop(head, y1, grid), **TOL[torch.bfloat16])


@pytest.mark.cuda
def test_cuda_graph_static_features_and_side_stream(gen):
    """Features updated in place between calls are seen by the replays; calls on a non-default
    current stream are ordered correctly."""
    shape = (3, 2, 1, 4, 8)
    feats = randn(*shape, device="cuda", gen=gen)
    head = MixHead(8, torch.float32, "cuda", gen)

    def h(y, s, r):
        return head(y * feats, s, r)

    grid = make_grid(3, device="cuda")
    loop = tmd_ext.FlowHeadLoop(h, shape, torch.float32, "cuda", grid)
    stream = torch.cuda.Stream()
    for _ in range(3):
        feats.copy_(randn(*shape, device="cuda", gen=gen))
        y1 = randn(*shape, device="cuda", gen=gen)
        with torch.no_grad():
            want = python_loop(h, y1, grid)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = loop(y1)
        torch.cuda.current_stream().wait_stream(stream)
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.cuda
def test_cuda_uncapturable_head_fails_cleanly(gen):
    def head(y, s, r):
        return y * float(s[0].item())  # a host sync: cannot be captured

    loop = tmd_ext.FlowHeadLoop(head, (2, 3), torch.float32, "cuda", make_grid(2, device="cuda"))
    with pytest.raises(RuntimeError, match="capturable"):
        loop(torch.randn(2, 3, device="cuda"))
    assert not loop.captured
    # The stream left capture mode: ordinary work still runs, eagerly the same head is fine.
    x = torch.randn(4, device="cuda")
    torch.testing.assert_close((x * 2).cpu(), x.cpu() * 2)
    eager = tmd_ext.FlowHeadLoop(head, (2, 3), torch.float32, "cuda", make_grid(2, device="cuda"),
                                 use_graph=False)
    y1 = torch.randn(2, 3, device="cuda")
    torch.testing.assert_close(eager(y1), python_loop(head, y1, make_grid(2, device="cuda")))


@pytest.mark.cuda
def test_cuda_bad_head_output_before_capture():
    loop = tmd_ext.FlowHeadLoop(lambda y, s, r: y[:1], (2, 3), torch.float32, "cuda",
                                make_grid(2, device="cuda"))
    with pytest.raises(ValueError, match=r"head returned a tensor of shape \(1, 3\)"):
        loop(torch.randn(2, 3, device="cuda"))
    assert not loop.captured and loop.num_head_calls == 0
    with pytest.raises(ValueError, match="y1 must be on device cuda:0"):
        loop(torch.randn(2, 3))


# ---------------------------------------------------------------- StaticFlowHeadLoop (Python side)


def feature_head(head: MixHead):
    """A head reading two per-call tensors: ``head(y·a + b, s, r)``."""
    def h(y, s, r, a, b):
        return head(y * a + b, s, r)
    return h


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_matches_reference(dtype, gen):
    """Each call copies its inputs into the static buffers: the result is the reference inner flow
    of the head with this call's inputs, and the loop is built once."""
    shape = (3, 2, 1, 4, 5)
    head = MixHead(5, dtype, "cpu", gen)
    h = feature_head(head)
    grid = make_grid(3)
    flow = tmd_ext.StaticFlowHeadLoop(h, grid)
    assert flow.num_steps == 3 and flow.loop is None and flow.num_head_calls == 0
    for call in range(1, 4):
        a, b, y1 = (randn(*shape, dtype=dtype, gen=gen) for _ in range(3))
        a_before = a.clone()
        got = flow(y1, (a, b))
        with torch.no_grad():
            want = reference.inner_flow(lambda y, s, r, a=a, b=b: h(y, s, r, a, b), y1, grid)
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert got.dtype == dtype and not got.requires_grad
        assert torch.equal(a, a_before) and flow.static[0].data_ptr() != a.data_ptr()
        assert flow.num_head_calls == 3 * call
    first_loop = flow.loop
    flow(y1, (a, b))
    assert flow.loop is first_loop


def test_static_new_layout_or_key_builds_new_loop(gen):
    """Another shape or dtype of y1 or of an input, or another key, builds fresh buffers and a new
    loop; num_head_calls keeps counting across loops."""
    head = MixHead(4, torch.float32, "cpu", gen)
    grid = make_grid(2, torch.float64)

    def h(y, s, r, a):
        return head(y + a, s, r)

    flow = tmd_ext.StaticFlowHeadLoop(h, grid)
    calls = [((2, 4), (2, 4), "k"), ((2, 4), (2, 4), "k"), ((3, 4), (3, 4), "k"), ((3, 4), (1, 4), "k"),
             ((3, 4), (1, 4), "other")]
    loops = []
    for y_shape, a_shape, key in calls:
        y1, a = randn(*y_shape, gen=gen), randn(*a_shape, gen=gen)
        got = flow(y1, [a], key=key)
        with torch.no_grad():
            torch.testing.assert_close(got, reference.inner_flow(lambda y, s, r, a=a: h(y, s, r, a), y1, grid),
                                       **TOL[torch.float32])
        loops.append(flow.loop)
    assert loops[0] is loops[1] and len({id(x) for x in loops[1:]}) == 4
    assert flow.num_head_calls == 2 * len(calls) and flow.loop.num_head_calls == 2
    assert flow.loop.s_grid.dtype == torch.float64


def test_static_without_inputs_and_grid_dtype(gen):
    """A head of (y, s, r) only; a non-float grid is cast to float64 for the loop."""
    shape = (2, 3, 4)
    head, y1, _ = setup(shape, torch.float32, "cpu", gen)
    grid = torch.tensor([0.0, 0.25, 1.0], dtype=torch.bfloat16)
    flow = tmd_ext.StaticFlowHeadLoop(head, grid, use_graph=False)
    got = flow(y1)
    assert flow.loop.s_grid.dtype == torch.float64 and not flow.loop.uses_graph
    with torch.no_grad():
        torch.testing.assert_close(got, reference.inner_flow(head, y1, grid.double()), **TOL[torch.float32])


def test_static_bad_args(gen):
    with pytest.raises(TypeError, match="head must be callable"):
        tmd_ext.StaticFlowHeadLoop(3, make_grid(2))
    with pytest.raises(ValueError, match="s_grid must be a 1-D"):
        tmd_ext.StaticFlowHeadLoop(lambda y, s, r: y, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="s_grid must be a 1-D"):
        tmd_ext.StaticFlowHeadLoop(lambda y, s, r: y, [0.0, 1.0])
    flow = tmd_ext.StaticFlowHeadLoop(lambda y, s, r, a: y + a, make_grid(2))
    with pytest.raises(TypeError, match="y1 must be a torch.Tensor"):
        flow([[1.0]], (torch.zeros(1, 1),))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a torch.Tensor"):
        flow(torch.zeros(1, 1), (torch.zeros(1, 1), 2.0))
    assert flow.num_head_calls == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_static_graph_replays_new_inputs(dtype, gen):
    """On CUDA the first call captures, later calls replay the graph with the new inputs copied in."""
    shape = (2, 8, 1, 4, 8)
    head = MixHead(8, dtype, "cuda", gen)
    h = feature_head(head)
    grid = make_grid(3, device="cuda")
    flow = tmd_ext.StaticFlowHeadLoop(h, grid)
    for call in range(1, 4):
        a, b, y1 = (randn(*shape, dtype=dtype, device="cuda", gen=gen) for _ in range(3))
        got = flow(y1, (a, b))
        with torch.no_grad():
            want = reference.inner_flow(lambda y, s, r, a=a, b=b: h(y, s, r, a, b), y1, grid)
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert flow.loop.uses_graph and flow.loop.captured and flow.num_head_calls == 3 * call


@pytest.mark.cuda
def test_cuda_static_uncapturable_head_falls_back(gen):
    """use_graph=None: a head that cannot be captured runs the eager C++ loop, with a warning;
    use_graph=True: the capture error is raised."""
    def head(y, s, r, a):
        return y * float(s[0].item()) + a  # a host sync: cannot be captured

    grid = make_grid(2, device="cuda")
    y1, a = torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda")
    flow = tmd_ext.StaticFlowHeadLoop(head, grid)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = flow(y1, (a,))
    assert any("CUDA graph" in str(w.message) for w in caught)
    assert not flow.loop.uses_graph
    assert flow.fallbacks == 1 and flow.fallback_reason
    torch.testing.assert_close(got, reference.inner_flow(lambda y, s, r: head(y, s, r, a), y1, grid))
    with pytest.raises(RuntimeError, match="capturable"):
        tmd_ext.StaticFlowHeadLoop(head, grid, use_graph=True)(y1, (a,))


def test_static_head_runs_without_autocast_cache(gen):
    """Under autocast the head runs with the autocast weight cache off (a captured graph must not
    read casts the cache frees), and outside autocast it is not put under one."""
    seen = []

    def head(y, s, r, a):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
        return y * 0.5 + a

    grid = make_grid(2)
    y1, a = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    flow = tmd_ext.StaticFlowHeadLoop(head, grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flow(y1, (a,))
    assert seen and all(enabled and not cache for enabled, cache in seen)
    seen.clear()
    flow(y1, (a,))
    assert seen and not any(enabled for enabled, _ in seen)
    assert flow.fallbacks == 0 and flow.fallback_reason is None


@pytest.mark.cuda
def test_cuda_static_error_during_capture_falls_back(gen):
    """A C++ error raised only while the head is being captured (whatever its message) falls back
    to the eager loop, counted and warned; the result is the eager one."""
    def head(y, s, r, a):
        if torch.cuda.is_current_stream_capturing():
            torch.empty(2, device="cuda").view(3)  # a c10 error from a shape check, during capture only
        return torch.tanh(y) + a * (s - r)[:, None]

    grid = make_grid(2, device="cuda")
    y1, a = torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda")
    flow = tmd_ext.StaticFlowHeadLoop(head, grid)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = flow(y1, (a,))
    assert flow.fallbacks == 1 and not flow.loop.uses_graph
    assert any("eagerly" in str(w.message) for w in caught)
    torch.testing.assert_close(got, reference.inner_flow(lambda y, s, r: head(y, s, r, a), y1, grid))
