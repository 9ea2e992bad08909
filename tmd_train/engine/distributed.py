"""Multi-process pieces: FSDP2 sharding, gradient averaging of replicated parameters, global
gradient clipping, all-reduced means, and the process-group teardown. Model code stays free of
them: a method shards its networks here after building them."""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard_fsdp2(root: nn.Module, blocks: Iterable[nn.Module], device_type: str) -> list[nn.Parameter]:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over all processes: each of ``blocks`` is
    its own unit, ``root`` holds the rest. On CPU the process group is gloo.

    FSDP2 cannot shard 0-d parameters (e.g. the gated fusion's α): they stay ordinary replicated
    tensors and are returned; average their gradients with :func:`average_gradients` before the
    optimizer step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    scalars = [p for p in root.parameters() if p.dim() == 0]
    ignored = set(scalars)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in ignored} or None)
    fully_shard(root, mesh=mesh, ignored_params=ignored or None)
    return scalars


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
