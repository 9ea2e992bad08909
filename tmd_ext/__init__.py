"""tmd_ext: fused C++/CUDA/CUTLASS ops for Transition Matching Distillation.

The compiled library `tmd_ext._C` registers the ops in the `tmd` namespace (`torch.ops.tmd.*`)
with CPU and CUDA kernels; this package registers their autograd and fake (meta) kernels and
exposes them as plain functions with argument checks (one module per op in :mod:`tmd_ext.ops`):

* :func:`adaln_modulate` — ``LN(x)·(1+scale)+shift``
* :func:`gated_fusion` — ``m + sigmoid(alpha)·gate ⊙ (z - m)``
* :func:`gated_fusion_linear` — the same with ``z = x·Wᵀ + b`` fused into the GEMM epilogue on sm_90a
* :func:`flow_step` — ``y - (s-r)·(y1 - head_out)``
* :func:`meanflow_fd_loss` — the TM-MeanFlow loss with the finite-difference target (stage 1)

and the inner-flow loop:

* :class:`FlowHeadLoop` (C++, pybind11) — the whole inner flow of one outer step, ``N`` head
  evaluations each followed by the fused ``flow_step`` update, replayed from a captured CUDA graph
  on CUDA and run eagerly on CPU;
* :class:`StaticFlowHeadLoop` (:mod:`tmd_ext.flow_head_loop`) — that loop with a head reading its
  per-call inputs from static buffers, rebuilt on a new layout, with the eager fallback.

:mod:`tmd_ext.reference` holds a pure-PyTorch version of each (the ground truth of the tests),
``reference.inner_flow`` that of the loop.
"""
from __future__ import annotations

import torch

try:
    from . import _build_meta
except ImportError as e:  # not built yet
    raise ImportError(
        "tmd_ext is not built: run `pip install -e . --no-build-isolation` (or `make test`) in the "
        "repository root first"
    ) from e

if torch.__version__ != _build_meta.TORCH_VERSION:
    raise ImportError(
        f"tmd_ext was built against torch {_build_meta.TORCH_VERSION} but torch {torch.__version__} "
        "is installed; rebuild it with `pip install -e . --no-build-isolation`"
    )

try:
    from . import _C
except ImportError as e:
    raise ImportError(
        f"tmd_ext._C failed to load ({e}); it was built against torch {_build_meta.TORCH_VERSION}, "
        f"torch {torch.__version__} is installed — rebuild with `pip install -e . --no-build-isolation`"
    ) from e

from . import reference  # noqa: E402
from .flow_head_loop import StaticFlowHeadLoop  # noqa: E402
from .ops.adaln_modulate import adaln_modulate  # noqa: E402
from .ops.flow_step import flow_step  # noqa: E402
from .ops.gated_fusion import gated_fusion  # noqa: E402
from .ops.gated_fusion_linear import gated_fusion_linear  # noqa: E402
from .ops.meanflow_fd_loss import meanflow_fd_loss  # noqa: E402

FlowHeadLoop = _C.FlowHeadLoop

OPS = ("adaln_modulate", "flow_step", "gated_fusion", "gated_fusion_linear", "meanflow_fd_loss")


def build_info() -> dict:
    """What the compiled library was built with: ``torch_version`` (built against),
    ``cuda_compiled`` (bool), ``cuda_version``, ``cuda_archs`` (TORCH_CUDA_ARCH_LIST used),
    ``cutlass_version``, ``cutlass_sm90`` (the CUTLASS WGMMA kernels were compiled, i.e. 9.0a is
    among the archs), ``cxx`` and ``cpu_kernels`` (the build of the CPU kernels this process runs:
    ``"avx512"``, ``"avx2"`` or ``"baseline"``, the widest the CPU has, capped by ATEN_CPU_CAPABILITY)."""
    info = dict(_C.build_info())
    archs = [a.removesuffix("+PTX") for a in info["cuda_archs"].replace(",", ";").replace(" ", ";").split(";")]
    info["cutlass_sm90"] = bool(info["cuda_compiled"]) and "9.0a" in archs
    return info


__all__ = ["OPS", "FlowHeadLoop", "StaticFlowHeadLoop", "adaln_modulate", "build_info", "flow_step",
           "gated_fusion", "gated_fusion_linear", "meanflow_fd_loss", "reference"]
