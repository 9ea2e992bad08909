"""The one training loop: :func:`fit` drives any :class:`Method` (resume, progress bar, logging,
checkpoint cadence, final export).

Before the first step, :func:`~tmd_train.engine.checkpoint.prepare_run` checks the output folder: a fresh
run into a folder that holds a run is refused unless ``overwrite``; a resume is verified (``latest`` falls
back past damaged checkpoints) and a changed config refused unless ``allow_config_change`` (see there).

A method owns its networks, optimizers and data order; per step the loop asks it for the batch
(:meth:`Method.batches`), runs :meth:`Method.train_step`, averages the returned scalars over
processes (NaN-aware) and logs them with the method's counters every ``log_every`` steps (and at
the last step, and whenever :meth:`Method.log_now` says so); every ``checkpoint_every`` steps (and
at the last) it writes a checkpoint. Checkpoint folder (``checkpoint-{step:07d}/``): the method's
files (:meth:`Method.save`: its sharded state in ``dcp/``, one file per process, and ``export/``),
``config.yaml``, ``rng_state_{rank}.pt`` and ``state.json`` (``step``, ``world_size``, the run id,
:meth:`Method.state` and every file's size and SHA-256). At the end :meth:`Method.export` writes
``student/`` (atomically, like a checkpoint; streamed one tensor at a time). Checkpoint and export files
get the permissions of the umask (0644 under the usual one).
"""
from __future__ import annotations

import abc
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..errors import UserError
from .checkpoint import (
    EXPORT_DIR,
    RESUMABLE_KEYS,
    CheckpointError,
    CheckpointWriter,
    on_main,
    prepare_run,
    read_checkpoint_state,
    require_sharded,
    rng_state,
    set_rng_state,
    write_folder,
)
from .config import TrainConfig, config_to_dict, save_config
from .context import RunContext
from .distributed import all_reduce_mean
from .logging import ScalarLogger, Throughput


class Method(abc.ABC):
    """The interface :func:`fit` drives; a training method subclasses it and registers itself
    (:func:`tmd_train.methods.register`).

    Class attributes: ``name`` (set by the registry), ``config_cls`` (the config it trains with),
    ``samples_per_step`` (set by a method that logs ``samples_per_s``; None: not logged),
    ``resumable_keys`` (the config keys a resume may change without ``--allow-config-change``).
    Attributes kept by the loop: ``step`` (the last completed step) and ``timings`` (seconds per
    step, keyed by :meth:`step_kind`).
    """

    name: str = ""
    config_cls: type[TrainConfig] = TrainConfig
    samples_per_step: int | None = None
    resumable_keys: frozenset[str] = RESUMABLE_KEYS

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ctx = RunContext.create(cfg)
        self.step = 0
        self.timings: dict[str, list[float]] = {}

    # the run context, for short access
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.ctx.autocast_dtype

    # ------------------------------------------------------------------ what a method provides
    @property
    def total_steps(self) -> int:
        """The last step of the run."""
        return self.cfg.steps

    @abc.abstractmethod
    def batches(self, first_step: int) -> Iterator[Any]:
        """This process's batch of every step ``first_step..total_steps``."""

    @abc.abstractmethod
    def train_step(self, step: int, batch: Any) -> dict[str, float]:
        """One step (forward, backward, guarded updates); returns this process's scalars."""

    def step_kind(self, step: int) -> str:
        """The kind of ``step`` (its timings are kept apart)."""
        return "train"

    def log_now(self, step: int) -> bool:
        """Whether to log ``step`` besides the ``log_every`` cadence."""
        return False

    def counters(self) -> dict[str, float]:
        """Run-wide scalars logged with every row (skipped updates, …)."""
        return {}

    def after_step(self, step: int, logger: ScalarLogger) -> None:
        """Called after every step (collective): e.g. sample grids to TensorBoard. Nothing by default."""
        return None

    @abc.abstractmethod
    def save(self, folder: Path, is_main: bool) -> None:
        """Write the method's checkpoint files into ``folder`` (collective: every process writes its own
        shards, :func:`~tmd_train.engine.checkpoint.save_sharded`)."""

    def state(self) -> dict[str, Any]:
        """The method's counters for ``state.json``."""
        return {}

    @abc.abstractmethod
    def load(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore what :meth:`save` and :meth:`state` wrote."""

    @abc.abstractmethod
    def export(self, directory: Path) -> None:
        """Write the trained model to ``directory`` (collective; main process writes; never more than one
        tensor unsharded at a time, :func:`~tmd_train.engine.consolidate.write_export_live`)."""

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, writer: CheckpointWriter, step: int) -> Path:
        """Write ``checkpoint-{step:07d}/`` (collective)."""
        def write(folder: Path, is_main: bool) -> None:
            torch.save(rng_state(), folder / f"rng_state_{self.rank}.pt")
            self.save(folder, is_main)
            if is_main:
                save_config(self.cfg, folder / "config.yaml")
        return writer.save(step, write, {**self.state(), "world_size": self.world})

    def load_checkpoint(self, folder: Path) -> int:
        """Restore a checkpoint (method state, this process's RNG states, the step); returns the step.
        A file that cannot be read or does not fit the model, or a checkpoint of the earlier full-state
        format, is a :class:`CheckpointError` naming the folder."""
        state = read_checkpoint_state(folder)
        require_sharded(folder)
        try:
            self.load(folder, state)
            rng_file = folder / f"rng_state_{self.rank}.pt"
            if rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=False))
        except UserError:
            raise
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as e:
            raise CheckpointError(f"could not load checkpoint {folder}: {type(e).__name__}: {e}") from e
        self.step = int(state["step"])
        return self.step

    def timing_summary(self) -> str:
        """Mean seconds per step of each kind run by the last :func:`fit`."""
        parts = [f"{k} {sum(v) / len(v):.3f} s/iter ({len(v)})" for k, v in self.timings.items() if v]
        return ", ".join(parts) or "no iterations"


def fit(method: Method, resume: str | None = None, *, overwrite: bool = False,
        allow_config_change: bool = False) -> Path:
    """Train ``method`` to its ``total_steps``, resuming from ``resume`` (``"latest"``: the newest
    complete checkpoint of the output folder, if any; or a checkpoint folder). Returns the exported
    ``<output_dir>/student`` folder.

    ``overwrite``: a fresh run may replace the run in its output folder (its files are deleted first);
    ``allow_config_change``: a resume may change config keys that alter the run (recorded in
    ``config_changes.jsonl``). Without them those cases raise a :class:`~tmd_train.errors.UserError`.
    """
    cfg = method.cfg
    out = Path(cfg.output_dir)
    run = on_main(lambda: prepare_run(out, resume, config_to_dict(cfg), overwrite=overwrite,
                                      allow_config_change=allow_config_change,
                                      resumable_keys=method.resumable_keys), method.is_main)
    if run.checkpoint is not None:
        method.load_checkpoint(run.checkpoint)
    if method.is_main:
        save_config(cfg, out / "config.yaml")
    writer = CheckpointWriter(out, cfg.keep_last, method.is_main, run_id=run.run_id)
    logger = ScalarLogger(out, method.is_main, resume_step=method.step)
    total = method.total_steps
    progress = tqdm(total=total, initial=method.step, disable=not method.is_main, desc=f"{method.name}")
    speed = Throughput()
    method.timings = {}
    try:
        for step, batch in zip(range(method.step + 1, total + 1), method.batches(method.step + 1), strict=True):
            kind = method.step_kind(step)
            t0 = time.perf_counter()
            logs = method.train_step(step, batch)
            method.timings.setdefault(kind, []).append(time.perf_counter() - t0)
            keys = sorted(logs)
            values = all_reduce_mean(torch.tensor([logs[k] for k in keys], dtype=torch.float64))
            scalars = dict(zip(keys, values.tolist(), strict=True))
            method.step = step
            if method.samples_per_step is not None:
                speed.add(method.samples_per_step)
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in scalars.items() if k.startswith("loss")})
            if step % cfg.log_every == 0 or step == total or method.log_now(step):
                scalars.update(method.counters())
                if method.samples_per_step is not None:
                    scalars["samples_per_s"] = speed.rate()
                logger.log(step, scalars)
            method.after_step(step, logger)
            if step % cfg.checkpoint_every == 0 or step == total:
                method.save_checkpoint(writer, step)
        final = out / EXPORT_DIR
        write_folder(final, lambda folder, is_main: method.export(folder), method.is_main, what="export")
    finally:
        progress.close()
        logger.close()
    return final
