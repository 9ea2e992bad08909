"""FlowHeadLoop: the C++ inner-flow loop vs a plain Python loop with tmd_ext.flow_step (CPU eager
path, CUDA graph path and CUDA eager path), call accounting, static-buffer updates, no host sync
on CUDA, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPES, TOL, noncontig, randn

import tmd_ext

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
    """An increasing shifted grid [n+1] from 0 to 1 (the inner-grid shift of DESIGN.md §1)."""
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


def test_constant_velocity_lands_on_data(gen):
    """With head_out = y (the data) the inner velocity y1 - y is constant: from s=1 to s=0 the loop
    must land exactly on y for any grid."""
    shape = (2, 4, 1, 3, 3)
    x = randn(*shape, dtype=torch.float64, gen=gen)
    y1 = randn(*shape, dtype=torch.float64, gen=gen)
    grid = torch.tensor([0.0, 0.05, 0.4, 0.41, 1.0], dtype=torch.float64)
    loop = tmd_ext.FlowHeadLoop(lambda y, s, r: x, shape, torch.float64, "cpu", grid)
    torch.testing.assert_close(loop(y1), x, atol=1e-12, rtol=1e-12)


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
