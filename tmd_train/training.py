"""Training plumbing shared by the stages (stage 1 TM-MF, stage 2 DMD2-v): seeding, the step-indexed
data order, FSDP2 sharding, full (gathered) state dicts, atomic checkpoints with keep-last-K and
``--resume latest``, per-rank RNG states, the non-finite guard, and scalar logging.

Conventions (CONVENTIONS.md): checkpoints are folders ``checkpoint-{step:07d}/`` under the run's
output folder, written to a hidden temporary folder and renamed into place when complete; every
stochastic choice of a step draws from a generator seeded by ``(seed, step, chunk)`` where
``chunk = rank·grad_accum_steps + micro_step`` (= the rank without accumulation), so a resumed
run repeats the uninterrupted one exactly and a 1-process run with accumulation repeats the
multi-process one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import load_config

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------- seeding
def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends on every key (SHA-256 of their text), so nearby keys give
    unrelated streams."""
    digest = hashlib.sha256(":".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, step: int, chunk: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's chunk (``chunk = rank·accum + micro``), on ``device``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "step", step, chunk))


class StepSampler:
    """The data order: the dataset is visited epoch by epoch, each epoch a permutation seeded by
    ``(seed, epoch)``; step ``k`` (1-based) takes the next ``global_batch`` positions of that
    endless sequence, and chunk ``c`` of the step takes its ``c``-th slice of ``chunk_size``.
    Pure function of ``(step, chunk)``: resuming needs no sampler state.

    Args:
        num_samples: dataset size.
        chunk_size: samples per chunk (the per-process micro-batch).
        num_chunks: chunks per step (processes × accumulation steps).
        seed: the run's seed.
    """

    def __init__(self, num_samples: int, chunk_size: int, num_chunks: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.num_chunks = num_chunks
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.chunk_size * self.num_chunks

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._perms[epoch] = torch.randperm(self.num_samples, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, chunk: int) -> list[int]:
        """Dataset indices of ``chunk`` of ``step`` (``chunk_size`` of them)."""
        if step < 1 or not 0 <= chunk < self.num_chunks:
            raise ValueError(f"bad (step, chunk) = ({step}, {chunk}) for {self.num_chunks} chunks")
        start = (step - 1) * self.global_batch + chunk * self.chunk_size
        out = []
        for p in range(start, start + self.chunk_size):
            out.append(int(self._perm(p // self.num_samples)[p % self.num_samples]))
        return out


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler for a ``DataLoader``: the index lists of ``chunks`` for every step in
    ``[first_step, last_step]``, step-major (so DataLoader workers can prefetch)."""

    def __init__(self, sampler: StepSampler, first_step: int, last_step: int, chunks: Sequence[int]) -> None:
        self.sampler = sampler
        self.first_step = first_step
        self.last_step = last_step
        self.chunks = list(chunks)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step, self.last_step + 1):
            for chunk in self.chunks:
                yield self.sampler.indices(step, chunk)

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1) * len(self.chunks)


# ---------------------------------------------------------------------------- distributed
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


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient 2-norm over FSDP-sharded (DTensor) and ordinary parameters alike, as a
    float64 CPU scalar; gradients are scaled by ``max_norm / norm`` when it exceeds ``max_norm``
    (``math.inf``: never). Non-finite norms leave the gradients as they are."""
    grads = [p.grad for p in params if p.grad is not None]
    total_sq = torch.zeros((), dtype=torch.float64)
    for group in ([g for g in grads if _is_dtensor(g)], [g for g in grads if not _is_dtensor(g)]):
        if group:
            norm = local_tensor(torch.nn.utils.get_total_norm(group, 2.0))
            total_sq = total_sq + norm.detach().double().cpu() ** 2
    total = total_sq.sqrt()
    if math.isfinite(float(total)) and float(total) > max_norm:
        coef = max_norm / (float(total) + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def _is_dtensor(x: torch.Tensor) -> bool:
    return callable(getattr(x, "full_tensor", None))


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


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (possibly) DTensor value (``full_tensor()`` of a DTensor)."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


# ---------------------------------------------------------------------------- state dicts
def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter names. Collective
    under FSDP: every process must call it; the main process gets the dicts, the others may get
    empty ones."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_sd, optim_sd


def load_state(model: nn.Module, model_sd: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
               optim_sd: dict[str, Any] | None = None) -> None:
    """Load full state dicts (as :func:`gather_state` returns them, present on every process) into
    a (possibly FSDP2-sharded) model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The global RNG states of this process (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding ``state.json``) of a run, ``[(step, path)]`` ascending."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file():
            try:
                out.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> the newest complete checkpoint of ``output_dir`` (None
    if there is none yet: a fresh start); anything else -> that checkpoint folder.

    Raises:
        FileNotFoundError: an explicit folder that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (``step``, counters, …)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


class CheckpointWriter:
    """Writes ``checkpoint-{step:07d}/`` atomically and keeps the last ``keep_last``.

    :meth:`save` creates the hidden ``.tmp-checkpoint-{step:07d}`` (main process), lets every
    process write into it (``write(folder, is_main)``, a collective: e.g. gathering FSDP state),
    writes ``state.json`` last, renames the folder into place (replacing an older one of the same
    step) and deletes all but the newest ``keep_last`` complete checkpoints.
    """

    def __init__(self, output_dir: str | Path, keep_last: int, is_main: bool) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.is_main = is_main

    def save(self, step: int, write: Callable[[Path, bool], None], state: dict[str, Any]) -> Path:
        final = self.output_dir / checkpoint_name(step)
        tmp = self.output_dir / f".tmp-{checkpoint_name(step)}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp, self.is_main)
        barrier()
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in list_checkpoints(self.output_dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final


# ---------------------------------------------------------------------------- guard / logging
class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite (on any process) and counts
    them (``skipped``)."""

    def __init__(self, skipped: int = 0) -> None:
        self.skipped = skipped

    def ok(self, *values: torch.Tensor) -> bool:
        """True when every value is finite on every process (a collective under distribution);
        counts a skip otherwise."""
        finite = torch.stack([torch.isfinite(local_tensor(v).detach().double()).all() for v in values]).all()
        flag = finite.double().reshape(1)
        if is_distributed():
            flag = flag.cpu() if dist.get_backend() == "gloo" else flag
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        good = bool(flag.item() > 0)
        if not good:
            self.skipped += 1
        return good


class ScalarLogger:
    """Main-process scalars: TensorBoard (``SummaryWriter`` in ``<output_dir>/logs``) and one JSON
    line per logged step in ``<output_dir>/metrics.jsonl``. Other processes log nothing."""

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # drop lines of an interrupted run beyond the step we resume from
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.writer = SummaryWriter(str(Path(output_dir) / "logs"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The rows of ``<output_dir>/metrics.jsonl``."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class Throughput:
    """Samples per second between calls of :meth:`rate`."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.samples / max(now - self.t, 1e-9)
        self.t, self.samples = now, 0
        return r


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Constant learning rate after a linear warm-up over ``warmup_steps`` (step is 1-based)."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, step / warmup_steps)


def parse_stage_args(name: str, config_cls: type, default_config: Callable[[], Any], description: str,
                     argv: Sequence[str] | None = None, usage: str = "") -> tuple[Any, str | None]:
    """The command line every stage shares: ``[--config cfg.yaml] [key=value ...] [--resume latest|DIR]``.

    With neither ``--config`` nor overrides the stage's ``default_config()`` (the toy world) is used;
    if it raises FileNotFoundError the process exits with status 2 and a message saying what to pass.
    Returns ``(config, resume)``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tmd_train.{name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file with {config_cls.__name__} fields")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in output_dir, if any) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values parsed as YAML)")
    args = parser.parse_args(argv)
    if args.config is None and not args.overrides:
        try:
            return default_config(), args.resume
        except FileNotFoundError as e:
            parser.exit(2, f"{name}: no arguments and no toy world: {e}\n"
                           f"usage: python -m tmd_train.{name} teacher=<Wan2.1 folder> data=<dataset folder> "
                           f"{usage}[key=value ...]\n")
    return load_config(config_cls, args.config, args.overrides), args.resume


def finish_process_group() -> None:
    """After a multi-process run: barrier, destroy the process group and leave the process at once
    (gloo sometimes aborts at interpreter exit otherwise). No-op in a single process."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
