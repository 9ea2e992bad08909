"""Checkpoints and the run folder.

A run's output folder holds ``config.yaml``, ``metrics.jsonl``, ``logs/``, ``config_changes.jsonl``, the
``checkpoint-{step:07d}/`` folders and, at the end, ``student/`` (docs/design.md §6.5).

* Sharded state (:func:`module_state`, :func:`save_sharded`, :func:`load_sharded`, :func:`restore_module`):
  the models, optimizers and EMA go into the checkpoint's ``dcp/`` folder with
  ``torch.distributed.checkpoint``: each process writes only the shards it holds (``__{rank}_0.distcp``; a
  replicated tensor once) and, on resume, reads only the byte ranges of its own shards; nothing is
  gathered. The checkpoint's ``export/`` says how its weights make the exported model folder
  (:mod:`~tmd_train.engine.consolidate`; ``python -m tmd_train.export`` does it offline). A checkpoint of
  the earlier full-state format is refused (:func:`require_sharded`).
* Writing (:class:`CheckpointWriter`, :func:`write_folder`): every process writes into a hidden
  ``.tmp-checkpoint-{step:07d}/``; the processes hash the files (each a share); the main process gives the
  files the permissions of the umask (safetensors writes 0600), writes ``state.json`` last — the step, the
  run id, the method's counters and every file's size and SHA-256, the ``dcp/`` shards included — and
  renames the folder into place. Only the newest ``keep_last`` checkpoints *of this run* (same run id) are
  kept. A failed save (e.g. a full disk) removes the temporary folder, leaves the earlier checkpoints as
  they were and raises :class:`SaveError` ("no space left on device" when that is the cause). SHA-256
  (hashlib, several files at once) costs about as much as CRC-32 here (~1 GB/s per core with SHA-NI), so
  the stronger hash is used.
* Reading (:func:`verify_checkpoint`, :func:`resolve_resume`): ``state.json`` must parse and every file it
  lists must have its recorded size and hash; a damaged checkpoint is a :class:`CheckpointError` naming the
  file and what is wrong. ``--resume latest`` falls back to the newest complete earlier checkpoint with a
  warning; an explicit ``--resume DIR`` that is damaged is an error.
* The run folder (:func:`prepare_run`): a fresh run into a folder that holds a run is refused unless
  ``overwrite``, which deletes that run's files (not moved aside: the flag says the old run is not wanted,
  and a copy could fill the disk); resuming compares the checkpoint's ``config.yaml`` with the new config
  and refuses a change outside :data:`RESUMABLE_KEYS` unless ``allow_config_change`` (every change is
  recorded in ``config_changes.jsonl``).

Also: per-process RNG states.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import random
import shutil
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, MissingFileError, OutputError
from ..files import normalize_permissions
from .config import yaml_load
from .distributed import barrier, is_distributed
from .logging import METRICS_FILE, strict_json, warn

T = TypeVar("T")

CHECKPOINT_PREFIX = "checkpoint-"
DAMAGED_PREFIX = "damaged-"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
EXPORT_DIR = "student"
DCP_DIR = "dcp"                   # the sharded state (torch.distributed.checkpoint) inside a checkpoint
EXPORT_SPEC_DIR = "export"        # inside a checkpoint: what its export folder holds (consolidate.ExportSpec)
TMP_PREFIX = ".tmp-"
# what a run writes in its output folder besides its checkpoint folders
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "logs", CONFIG_CHANGES_FILE, EXPORT_DIR)
# what a run leaves before its first checkpoint (nothing to resume: --resume latest starts over)
RESTARTABLE_FILES = (CONFIG_FILE, METRICS_FILE, "logs", CONFIG_CHANGES_FILE)
# config keys a resume may change freely: they alter neither the model, the optimisation nor the data order
RESUMABLE_KEYS = frozenset({"steps", "output_dir", "log_every", "checkpoint_every", "keep_last", "num_workers",
                            "cpu_threads", "sample_every", "attention_backend"})
_CHUNK = 1 << 24
_FULL_DISK_BYTES = 1 << 20


class CheckpointError(MissingFileError):
    """A damaged or unusable checkpoint; the message names the folder, the file and what is wrong."""


class SaveError(OutputError):
    """A checkpoint or export that could not be written (its partial folder was removed); ``errno`` is
    ENOSPC when the disk or quota is full."""


# ---------------------------------------------------------------------------- sharded state
def module_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 trainable_only: bool = False) -> dict[str, Any]:
    """``{"model": state dict[, "optim": optimizer state dict]}`` of a (possibly FSDP2-sharded) module, as
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives them: keyed by parameter names, each
    process holding its shards (DTensors; plain tensors for replicated parameters), nothing gathered.
    ``trainable_only`` leaves out the frozen parameters (rebuilt, not trained: e.g. the base weights under a
    LoRA adapter). An optimizer that has not stepped gets its state initialised here (a zero-lr step:
    torch.distributed.checkpoint's rule), so pass None for one whose state must stay empty."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(ignore_frozen_params=trainable_only)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return {"model": get_model_state_dict(model, options=opts)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": model_sd, "optim": optim_sd}


def restore_module(model: nn.Module, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None, *,
                   trainable_only: bool = False) -> None:
    """Load :func:`module_state`'s dicts (filled by :func:`load_sharded`) into the module and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    if optimizer is None or "optim" not in state:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, state["model"], options=opts)
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts)


def save_sharded(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts of sharded tensors and small values) into ``folder/dcp/`` with
    ``torch.distributed.checkpoint.save`` (collective): every process writes the shards it holds to its
    own file ``__{rank}_0.distcp``; a replicated entry is written once; the coordinator writes ``.metadata``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder / DCP_DIR), sync_files=True),
                     no_dist=not is_distributed())
    except CheckpointException as e:
        raise _dcp_cause(e) from None


def load_sharded(folder: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (shaped as it was saved, e.g. built by :func:`module_state` on the fresh modules) in
    place from ``folder/dcp/``: every process reads only the byte ranges of its own shards (the world size
    may differ from the saving run's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(folder / DCP_DIR), no_dist=not is_distributed())
    except CheckpointException as e:
        raise _dcp_cause(e) from None


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence torch.distributed.checkpoint's warning that it runs in one process (it is meant to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _dcp_cause(error: BaseException) -> Exception:
    """The first process's exception inside torch.distributed.checkpoint's ``CheckpointException`` (a
    ``BaseException`` listing every process's failure), so that a full disk stays an ``OSError``."""
    failures = getattr(error, "failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(cause, (OSError, RuntimeError, ValueError, KeyError, EOFError)):
            return cause
        if isinstance(cause, Exception):                      # e.g. an AssertionError on mismatched sizes
            wrapped = RuntimeError(f"{type(cause).__name__}: {cause}")
            wrapped.__cause__ = cause
            return wrapped
    return RuntimeError(str(error))


def require_sharded(folder: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` holds sharded state (``dcp/.metadata``); a checkpoint
    of the earlier full-state format (``optimizer.pt``/``optimizers.pt`` and whole ``.safetensors`` models) is
    named as such."""
    folder = Path(folder)
    if (folder / DCP_DIR / ".metadata").is_file():
        return
    old = [name for name in ("optimizer.pt", "optimizers.pt", "generator.safetensors", "student")
           if (folder / name).exists()]
    if old:
        raise CheckpointError(f"checkpoint {folder} has the earlier full-state format ({', '.join(old)}): this "
                              f"version reads only sharded checkpoints ({DCP_DIR}/, docs/design.md §6.5); resume "
                              f"it with the tmd_train version that wrote it, or start over")
    raise CheckpointError(f"checkpoint {folder} is damaged: it has no {DCP_DIR}/.metadata (the sharded model and "
                          f"optimizer state)")


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


# ---------------------------------------------------------------------------- files: hashes, permissions
def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (hex), read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """:func:`file_sha256` of each path, several files at once (hashlib releases the GIL)."""
    if len(paths) <= 1:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return list(pool.map(file_sha256, paths))


def _manifest_share(folder: Path) -> dict[str, dict[str, Any]]:
    """This process's share of :func:`folder_manifest` (files dealt out by size to the processes)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / STATE_FILE]
    sizes = {p: p.stat().st_size for p in files}
    load = [0] * world
    mine = []
    for p in sorted(files, key=lambda q: (-sizes[q], q.as_posix())):   # largest first, to the least loaded
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[p]
        if r == rank:
            mine.append(p)
    digests = _sha256_all(mine)
    return {p.relative_to(folder).as_posix(): {"size": sizes[p], "sha256": d}
            for p, d in zip(mine, digests, strict=True)}


def _gather_dicts(mine: dict[str, Any]) -> dict[str, Any]:
    """The union of every process's dict, sorted by key (collective)."""
    if not is_distributed():
        return dict(sorted(mine.items()))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return dict(sorted((k, v) for part in gathered for k, v in part.items()))


def folder_manifest(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``folder`` but its ``state.json``."""
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / STATE_FILE]
    digests = _sha256_all(files)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d}
            for p, d in zip(files, digests, strict=True)}


# ---------------------------------------------------------------------------- checkpoint folders
def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-{step}`` folder of a run, complete or not, ``[(step, path)]`` ascending."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX):
            try:
                out.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The checkpoints of a run that hold a ``state.json`` (written last: the save was not
    interrupted), ``[(step, path)]`` ascending. :func:`verify_checkpoint` checks one fully."""
    return [(s, p) for s, p in checkpoint_folders(output_dir) if (p / STATE_FILE).is_file()]


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (``step``, ``run_id``, the method's counters, ``files``).

    Raises:
        CheckpointError: no ``state.json``, an empty or unreadable one, or one without an integer ``step``.
    """
    folder = Path(path)
    file = folder / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {folder} is damaged: it has no {STATE_FILE} (an interrupted save, "
                              f"or not a checkpoint folder)")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder} is damaged: {STATE_FILE} cannot be read ({e})") from None
    if not text.strip():
        raise CheckpointError(f"checkpoint {folder} is damaged: {STATE_FILE} is empty")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {folder} is damaged: {STATE_FILE} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {folder} is damaged: {STATE_FILE} has no integer 'step'")
    return state


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint: its ``state.json`` (:func:`read_checkpoint_state`) and every file it lists
    (present, of the recorded size, of the recorded SHA-256). Returns the state.

    Raises:
        CheckpointError: naming the folder, each bad file and what is wrong with it.
    """
    folder = Path(path)
    state = read_checkpoint_state(folder)
    files = state.get("files")
    if files is None:
        warn(f"checkpoint {folder} has no file list (written before checkpoints recorded one): its files "
             f"are not verified")
        return state
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {folder} is damaged: 'files' in {STATE_FILE} is not a mapping")
    problems: list[str] = []
    to_hash: list[tuple[str, Path, Any]] = []
    for rel, record in files.items():
        file = folder / rel
        want = record.get("size") if isinstance(record, dict) else None
        if not file.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = file.stat().st_size
        if size != want:
            problems.append(f"{rel} has {size} bytes, {want} were written" + (" (truncated)" if size < want else "")
                            if isinstance(want, int) else f"{rel} has no recorded size")
            continue
        to_hash.append((rel, file, record.get("sha256")))
    if not problems:
        digests = _sha256_all([file for _, file, _ in to_hash])
        problems = [f"{rel} does not match the SHA-256 recorded at save (corrupt)"
                    for (rel, _, want), got in zip(to_hash, digests, strict=True) if got != want]
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}")
    return state


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> the newest complete (verified) checkpoint of ``output_dir``,
    skipping damaged newer ones with a warning (None if the folder has no checkpoint: a fresh start);
    anything else -> that checkpoint folder, verified.

    Raises:
        MissingFileError: an explicit folder that does not exist.
        CheckpointError: an explicit folder that is damaged, or ``latest`` when every checkpoint is.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_folders(output_dir)
        damaged = []
        for _, path in reversed(found):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                damaged.append(str(e))
                warn(f"{e}; skipping it")
                continue
            if damaged:
                warn(f"--resume latest: resuming from {path.name}, the newest complete checkpoint")
            return path
        if damaged:
            raise CheckpointError(f"--resume latest: no complete checkpoint in {output_dir}: {'; '.join(damaged)}; "
                                  f"resume one you trust with --resume DIR, or start over without --resume and "
                                  f"with --overwrite")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise MissingFileError(f"--resume {resume}: no such checkpoint folder")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {resume}: {e}; resume an earlier checkpoint (--resume latest picks the "
                              f"newest complete one)") from None
    return path


# ---------------------------------------------------------------------------- writing folders
def _no_space(error: BaseException, where: Path) -> bool:
    """Whether ``error`` (or what caused it) comes from a full disk or quota: ENOSPC / EDQUOT, their
    message (safetensors reports them in its own exception), or — for writers that lose the errno,
    such as ``torch.save`` — a filesystem at ``where`` with less than 1 MiB free."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return free < _FULL_DISK_BYTES


@dataclass
class _Failure:
    """A failed write on one process: the exception, whether the disk is full, a one-line summary."""

    error: BaseException
    no_space: bool

    @property
    def summary(self) -> str:
        if self.no_space:
            return "no space left on device"
        e = self.error
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f": {e.filename}" if e.filename else "")
        return f"{type(e).__name__}: {e}"


def _first_failure(failure: _Failure | None) -> tuple[int, bool, str] | None:
    """Collective: the first failure of any process, ``(rank, no_space, summary)``, or None."""
    mine = None if failure is None else (dist.get_rank() if is_distributed() else 0, failure.no_space,
                                         failure.summary)
    if not is_distributed():
        return mine
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return next((g for g in gathered if g is not None), None)


def write_folder(final: Path, write: Callable[[Path, bool], None], is_main: bool,
                 finish: Callable[[Path, dict[str, dict[str, Any]] | None], None] | None = None,
                 what: str = "folder", manifest: bool = False) -> None:
    """Write the folder ``final`` atomically (collective): the main process creates the hidden
    ``.tmp-<name>`` beside it, every process writes into it (``write(folder, is_main)``), the main
    process normalises the files' permissions, runs ``finish(folder, files)`` (e.g. writes
    ``state.json``) and renames it into place, replacing an older ``final``. With ``manifest``,
    ``files`` is :func:`folder_manifest` of the written folder, its hashing shared by the processes
    (each hashes a share of the files; the folder must be on a filesystem they all see); else None.

    On a failure on any process the temporary folder is removed, ``final`` (if any) is left as it was, and
    every process raises: :class:`SaveError` ("no space left on device" when the disk or quota is full)
    for an I/O error, the original exception otherwise (a bug).
    """
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    failure: _Failure | None = None

    def attempt(fn: Callable[[], None]) -> None:
        nonlocal failure
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised on every process
            failure = _Failure(e, _no_space(e, final.parent))

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    files: dict[str, dict[str, Any]] | None = None

    def complete() -> None:
        normalize_permissions(tmp)
        if finish is not None:
            finish(tmp, files)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    if is_main:
        attempt(prepare)
    first = _first_failure(failure)
    if first is None:
        attempt(lambda: write(tmp, is_main))
        first = _first_failure(failure)
    if first is None and manifest:
        share: dict[str, dict[str, Any]] = {}
        attempt(lambda: share.update(_manifest_share(tmp)))
        first = _first_failure(failure)
        if first is None:
            files = _gather_dicts(share)
    if first is None and is_main:
        attempt(complete)
    first = _first_failure(failure)
    if first is None:
        return
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if failure is not None:
        if not failure.no_space and not isinstance(failure.error, OSError):
            raise failure.error
        no_space, summary, where = failure.no_space, failure.summary, ""
    else:
        rank, no_space, summary = first
        where = f" (on process {rank})"
    hint = "free some space" if no_space else "fix the cause"
    error = failure.error if failure is not None else None
    exc = SaveError(f"could not write the {what} {final}: {summary}{where}; the partial {what} was removed "
                    f"and the earlier files are intact; {hint} and continue with --resume latest")
    exc.errno = errno.ENOSPC if no_space else getattr(error, "errno", None)
    raise exc from error


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete the hidden ``.tmp-*`` folders a killed save left in ``output_dir``; returns them."""
    root = Path(output_dir)
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def new_run_id() -> str:
    """A random id naming one run (kept across its resumes, recorded in each checkpoint's ``state.json``)."""
    return uuid.uuid4().hex[:16]


class CheckpointWriter:
    """Writes ``checkpoint-{step:07d}/`` atomically (:func:`write_folder`) and keeps the last ``keep_last``
    of the run ``run_id``.

    :meth:`save` lets every process write into the hidden ``.tmp-checkpoint-{step:07d}`` (``write(folder,
    is_main)``, a collective: e.g. each process's shards), the processes hash the files (a share each), the
    main process then writes ``state.json`` (``state``, ``step``, ``run_id`` and ``files``: every file's
    size and SHA-256) last, renames the folder
    into place (replacing an older one of the same step) and deletes this run's checkpoints older than the
    newest ``keep_last`` (checkpoints of another run id are never counted or deleted).
    """

    def __init__(self, output_dir: str | Path, keep_last: int, is_main: bool, run_id: str | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.is_main = is_main
        self.run_id = run_id or new_run_id()

    def save(self, step: int, write: Callable[[Path, bool], None], state: dict[str, Any]) -> Path:
        final = self.output_dir / checkpoint_name(step)

        def finish(folder: Path, files: dict[str, dict[str, Any]] | None) -> None:
            record = dict(state, step=step, run_id=self.run_id, files=files)
            (folder / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")

        write_folder(final, write, self.is_main, finish, what="checkpoint", manifest=True)
        if self.is_main:
            self._keep_last(step)
        barrier()
        return final

    def _keep_last(self, step: int) -> None:
        """Delete this run's checkpoints before ``step`` but the newest ``keep_last - 1``."""
        older = []
        for s, path in list_checkpoints(self.output_dir):
            if s >= step:
                continue
            try:
                run_id = read_checkpoint_state(path).get("run_id", self.run_id)   # none recorded: an older writer's
            except CheckpointError:
                continue
            if run_id == self.run_id:
                older.append(path)
        for path in older[:max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- the run folder
@dataclass
class RunStart:
    """Where :func:`prepare_run` lets a run start: the checkpoint to load (None: a fresh start) and the run id."""

    checkpoint: Path | None
    run_id: str


def run_entries(output_dir: str | Path) -> list[Path]:
    """What a run wrote in ``output_dir`` (the config, metrics, logs, config changes, export, checkpoint
    folders and damaged ones set aside; not the hidden temporaries, not other files), sorted by name."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name in RUN_FILES
                   or (p.is_dir() and p.name.startswith((CHECKPOINT_PREFIX, DAMAGED_PREFIX + CHECKPOINT_PREFIX)))),
                  key=lambda p: p.name)


def _names(paths: Sequence[Path], limit: int = 6) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, Mapping):
        out: dict[str, Any] = {}
        for k, v in values.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: values}


_ABSENT = "(absent)"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys (dotted into sub-configs and mapping fields) whose values differ between two config
    dicts, ``{key: (old, new)}``; a key missing on one side has the value ``"(absent)"`` there."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def prepare_run(output_dir: str | Path, resume: str | None, config: Mapping[str, Any], *, overwrite: bool = False,
                allow_config_change: bool = False, resumable_keys: Collection[str] = RESUMABLE_KEYS) -> RunStart:
    """Check and prepare the output folder of a run (main process, before training); see the module
    docstring. ``config`` is the new config as :func:`~tmd_train.engine.config.config_to_dict` gives it.

    * stale ``.tmp-*`` folders of a killed save are deleted;
    * ``resume`` is resolved (:func:`resolve_resume`: verified, ``latest`` falls back past damaged ones,
      which are then renamed ``damaged-checkpoint-…`` so that they are neither resumed nor counted again);
    * a fresh run into a folder that holds a run, a resume from another folder's checkpoint into one, or a
      resume from a checkpoint of this folder that has later checkpoints (two histories) is refused with
      :class:`~tmd_train.errors.OutputError` unless ``overwrite`` (which deletes those run files and folders,
      never the checkpoint resumed from nor files the run did not write). ``--resume latest`` in a folder
      with no checkpoint at all starts over, deleting the config, metrics and logs of the run that wrote none;
    * a resume whose config differs from the checkpoint's ``config.yaml`` in a key outside ``resumable_keys``
      is refused with :class:`~tmd_train.errors.ConfigError` naming the keys and both values, unless
      ``allow_config_change``; every change at a resume is appended to ``config_changes.jsonl`` (one JSON
      line: step, checkpoint, time, the changes, the keys that needed ``--allow-config-change``).

    Returns the checkpoint to load and the run id (the checkpoint's, or a new one for a fresh start).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    for stale in remove_stale_temporaries(out):
        warn(f"removed {stale}, left by an interrupted save")
    start = resolve_resume(resume, out)
    held = run_entries(out)
    remove: list[Path] = []
    set_aside: list[Path] = []
    state: dict[str, Any] = {}
    if start is None:
        if resume == "latest" and held and all(p.name in RESTARTABLE_FILES for p in held):
            warn(f"--resume latest: {out} has no checkpoint, starting the run over (deleting {_names(held)} "
                 f"of the run that wrote none)")
            remove, held = held, []
        if held and not overwrite:
            raise OutputError(f"output_dir {out} already holds a run ({_names(held)}); continue it with --resume "
                              f"latest, replace it with --overwrite (deletes those), or choose another output_dir")
        remove += held
    else:
        state = read_checkpoint_state(start)
        if start.resolve().parent == out.resolve():
            later = [p for s, p in checkpoint_folders(out) if s > state["step"]]
            if resume == "latest":
                set_aside, later = later, []                  # all damaged: resolve_resume skipped them
            if later:
                later += [p for p in held if p.name == EXPORT_DIR]
                if not overwrite:
                    raise OutputError(f"resuming {start} would mix two histories: {out} holds later checkpoints "
                                      f"({_names(later)}); delete them with --overwrite, or resume into another "
                                      f"output_dir")
                remove = later
        elif held:
            if not overwrite:
                raise OutputError(f"output_dir {out} already holds a run ({_names(held)}) and {start} is not one of "
                                  f"its checkpoints; replace that run with --overwrite (deletes those), or choose "
                                  f"another output_dir")
            remove = held
    changes, blocked = _check_config(start, config, resumable_keys, allow_config_change)
    _remove(remove)
    for path in set_aside:
        aside = path.with_name(DAMAGED_PREFIX + path.name)
        _remove([aside])
        path.rename(aside)
        warn(f"moved the damaged {path.name} aside to {aside}; delete it when you no longer need it")
    out.mkdir(parents=True, exist_ok=True)
    if start is not None and changes:
        record = {"step": state["step"], "checkpoint": str(start),
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
                  "allowed_by_flag": sorted(blocked)}
        with (out / CONFIG_CHANGES_FILE).open("a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
    run_id = state.get("run_id") if start is not None else None
    return RunStart(start, run_id if isinstance(run_id, str) and run_id else new_run_id())


def _check_config(start: Path | None, config: Mapping[str, Any], resumable_keys: Collection[str],
                  allow: bool) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """The changes from ``start``'s ``config.yaml`` to ``config`` and those outside ``resumable_keys``;
    raises ConfigError for the latter unless ``allow``."""
    if start is None:
        return {}, []
    file = start / CONFIG_FILE
    if not file.is_file():
        warn(f"checkpoint {start} has no {CONFIG_FILE}: the config cannot be compared with the saved one")
        return {}, []
    try:
        old = yaml_load(file.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {start} is damaged: {CONFIG_FILE} is not valid YAML ({e})") from None
    new = yaml_load(yaml.safe_dump(dict(config), sort_keys=False))          # tuples -> lists, as saved
    changes = config_changes(old if isinstance(old, Mapping) else {}, new)
    blocked = [k for k in changes if k.split(".")[0] not in resumable_keys]
    if blocked and not allow:
        listed = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in blocked)
        raise ConfigError(f"resuming {start} with a changed config ({listed}); this changes the model, the "
                          f"optimisation or the data order of the run. Resume with the saved config "
                          f"({file}), or pass --allow-config-change to accept the change (it is recorded in "
                          f"config_changes.jsonl)")
    return changes, blocked


def on_main(fn: Callable[[], T], is_main: bool) -> T:
    """Run ``fn`` on the main process only; every process returns its result or raises its exception
    (a collective under distribution)."""
    result: tuple[bool, Any] | None = None
    if is_main:
        try:
            result = (True, fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every process
            result = (False, e)
    if is_distributed():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    assert result is not None
    ok, value = result
    if not ok:
        raise value
    return value
