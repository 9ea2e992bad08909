"""Multi-process pieces: FSDP2 sharding, gradient averaging of replicated parameters, global
gradient clipping, all-reduced means, and the process-group teardown. Model code stays free of
them: a method shards its networks here after building them."""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard_fsdp2(root: nn.Module, blocks: Iterable[nn.Module], device_type: str,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                mesh: Any = None) -> list[nn.Parameter]:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over all processes: each of ``blocks`` is
    its own unit, ``root`` holds the rest. On CPU the process group is gloo.

    ``param_dtype`` / ``reduce_dtype`` (docs/design.md §7): with either set, every unit gets the
    ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` — the parameters are all-gathered (and the
    unit computes) in ``param_dtype`` while the sharded parameters, the optimizer and the gradient
    reduce-scatter stay in their own precision / ``reduce_dtype``; forward inputs are not cast
    (autocast chooses the compute dtype). Both None: no policy (the
    parameters are all-gathered as stored, which is how a frozen model stored in bf16 with a few
    float32 modules keeps them float32).

    FSDP2 cannot shard 0-d parameters (e.g. the gated fusion's α): they stay ordinary replicated
    tensors and are returned; average their gradients with :func:`average_gradients` before the
    optimizer step.

    ``mesh``: the 1-D device mesh to shard over (default: a new one over all processes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs = {}
    if param_dtype is not None or reduce_dtype is not None:
        # the forward inputs keep their dtypes (flow times are float64; autocast picks the compute dtype)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                                   cast_forward_inputs=False)
    scalars = replicated_parameters(root)
    ignored = set(scalars)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in ignored} or None,
                    **kwargs)
    fully_shard(root, mesh=mesh, ignored_params=ignored or None, **kwargs)
    return scalars


#: the attribute of a module built on the meta device that says where its weights are (a :class:`WeightSource`)
WEIGHTS_ATTR = "_tmd_weights"


@dataclass
class WeightSource:
    """Where the weights of a module built on the meta device come from (docs/design.md §7): the
    tensors of safetensors ``files`` (``{key: file}``, e.g. a diffusers folder's), a parameter
    ``name`` of the module (relative to it) reading key ``prefix + name`` with every
    ``.base_layer`` component (a LoRA wrapper's) removed; ``values`` (by relative name) are
    tensors that are not in the files (e.g. new adapters' initial values).

    Attach it with ``setattr(module, WEIGHTS_ATTR, source)`` (it follows ``copy.deepcopy``); then
    :func:`materialize` fills every meta tensor under that module."""

    files: dict[str, Path]
    prefix: str = ""
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return self.prefix + name.replace(".base_layer.", ".")


def _local(x: torch.Tensor) -> torch.Tensor:
    to_local = getattr(x, "to_local", None)
    return to_local() if callable(to_local) else x


def _shard_index(x: torch.Tensor) -> tuple[slice, ...]:
    """The index of this process's shard of ``x`` (a DTensor) in the full tensor (all of it for
    an ordinary tensor)."""
    if not callable(getattr(x, "to_local", None)):
        return tuple(slice(None) for _ in x.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def materialize(root: nn.Module, device: torch.device | str) -> None:
    """Allocate on ``device`` and fill the meta parameters and buffers of ``root`` (sharded by
    :func:`shard_fsdp2` or not), each process reading only its own shard of each tensor from the
    :class:`WeightSource` of the nearest module above it (safetensors slices are read one tensor at
    a time, so no process holds a full model). Tensors that are not on the meta device (e.g. new
    layers initialised on CPU, the RoPE tables) keep their values. A no-op when nothing is meta.
    Parameters that FSDP does not manage and that were meta are replaced by new ``Parameter``
    objects (take lists of them, e.g. :func:`replicated_parameters`, afterwards).

    Raises:
        KeyError: a meta tensor has no source, or its key is missing from the files.
        ValueError: a file's tensor has another shape than the parameter.
    """
    from safetensors import safe_open

    named = list(root.named_parameters()) + list(root.named_buffers())
    if not any(_local(t).is_meta for _, t in named):
        return
    sources = sorted(((prefix, getattr(m, WEIGHTS_ATTR)) for prefix, m in root.named_modules()
                      if getattr(m, WEIGHTS_ATTR, None) is not None), key=lambda ps: -len(ps[0]))
    kept = {name: _local(t).detach().clone() for name, t in named if not _local(t).is_meta}
    root.to_empty(device=device)
    named = list(root.named_parameters()) + list(root.named_buffers())
    show = not is_distributed() or dist.get_rank() == 0
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles: dict[Path, Any] = {}
        for name, tensor in tqdm(named, desc="loading weights", unit="tensor", disable=not show, leave=False):
            local = _local(tensor)
            if name in kept:
                local.copy_(kept[name])
                continue
            found = next(((p, src) for p, src in sources if not p or name.startswith(p + ".")), None)
            if found is None:
                raise KeyError(f"{name}: built on the meta device without a weight source")
            prefix, src = found
            rel = name[len(prefix) + 1:] if prefix else name
            index = _shard_index(tensor)
            if rel in src.values:
                value = src.values[rel]
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: initial value of shape {tuple(value.shape)}, the parameter has "
                                     f"{tuple(tensor.shape)}")
                local.copy_(value[index])
                continue
            key = src.key(rel)
            if key not in src.files:
                raise KeyError(f"{name}: no tensor {key!r} in the weight files")
            path = src.files[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            sl = handles[path].get_slice(key)
            if tuple(sl.get_shape()) != tuple(tensor.shape):
                raise ValueError(f"{name}: {path} holds {key} of shape {tuple(sl.get_shape())}, the model expects "
                                 f"{tuple(tensor.shape)}")
            if local is tensor:  # not sharded: the whole tensor
                local.copy_(handles[path].get_tensor(key))
            elif local.numel():
                local.copy_(sl[index])


def replicated_parameters(root: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``root`` that :func:`shard_fsdp2` leaves replicated (the 0-d ones). Ask
    again after :func:`materialize`: filling a meta parameter that FSDP does not manage replaces it."""
    return [p for p in root.parameters() if p.dim() == 0]


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of replicated (not FSDP-managed) parameters over processes (one
    all-reduce; a missing gradient counts as zero)."""
    if not params or not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
    device = flat.device
    if dist.get_backend() == "gloo":
        flat = flat.cpu()
    dist.all_reduce(flat)
    flat = (flat / dist.get_world_size()).to(device)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].reshape(g.shape).to(g.dtype)
        offset += n


def is_dtensor(x: torch.Tensor) -> bool:
    """Whether ``x`` is a (sharded) DTensor."""
    return callable(getattr(x, "full_tensor", None))


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (possibly) DTensor value (``full_tensor()`` of a DTensor)."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient 2-norm over FSDP-sharded (DTensor) and ordinary parameters alike, as a
    float64 CPU scalar; gradients are scaled by ``max_norm / norm`` when it exceeds ``max_norm``
    (``math.inf``: never). Non-finite norms leave the gradients as they are."""
    grads = [p.grad for p in params if p.grad is not None]
    total_sq = torch.zeros((), dtype=torch.float64)
    for group in ([g for g in grads if is_dtensor(g)], [g for g in grads if not is_dtensor(g)]):
        if group:
            norm = local_tensor(torch.nn.utils.get_total_norm(group, 2.0))
            total_sq = total_sq + norm.detach().double().cpu() ** 2
    total = total_sq.sqrt()
    if math.isfinite(float(total)) and float(total) > max_norm:
        coef = max_norm / (float(total) + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a small float64 vector (NaN-aware per entry: entries that are NaN on
    some processes average over the others; NaN where all are NaN)."""
    values = values.detach().double()
    finite = ~torch.isnan(values)
    packed = torch.cat([torch.where(finite, values, 0.0), finite.double()])
    if is_distributed():
        backend_device = values.device if dist.get_backend() != "gloo" else torch.device("cpu")
        packed = packed.to(backend_device)
        dist.all_reduce(packed)
    n = values.numel()
    total, count = packed[:n].cpu(), packed[n:].cpu()
    return torch.where(count > 0, total / count.clamp(min=1), math.nan)


def all_finite(*values: torch.Tensor) -> bool:
    """True when every value is finite on every process (a collective under distribution)."""
    finite = torch.stack([torch.isfinite(local_tensor(v).detach().double()).all() for v in values]).all()
    flag = finite.double().reshape(1)
    if is_distributed():
        flag = flag.cpu() if dist.get_backend() == "gloo" else flag
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def finish_process_group() -> None:
    """After a multi-process run: barrier, destroy the process group and leave the process at once
    (gloo sometimes aborts at interpreter exit otherwise). No-op in a single process."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
