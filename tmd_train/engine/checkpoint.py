"""Checkpoints: folders ``checkpoint-{step:07d}/`` under the run's output folder, written to a
hidden temporary folder and renamed into place when complete (:class:`CheckpointWriter`, keeping
the newest ``keep_last``), ``--resume latest|DIR`` (:func:`resolve_resume`), full (gathered)
state dicts of FSDP2-sharded models, and per-process RNG states."""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .distributed import barrier

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "state.json"


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


def strip_prefix(prefix: str, sd: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``sd`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(prefix: str, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` with ``prefix`` prepended to every key."""
    return {prefix + k: v for k, v in sd.items()}


def save_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as a ``.safetensors`` file (CPU, contiguous)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


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


# ---------------------------------------------------------------------------- checkpoint folders
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
