"""The sharded, resumable, multi-process loop every dataset-building command shares (docs/design.md §5.6).

Items ``0..N-1`` are cut into chunks of ``shard_size`` consecutive indices; chunk ``c`` becomes the shard
``shard-{c:05d}.safetensors`` of the output folder (written atomically) and its record
``.prepare/chunk-{c:05d}.json`` (the kept indices with their prompts, the skipped ones with their reasons),
written after the shard. Every random draw of item ``i`` is seeded by ``i`` alone and every chunk is split
into the same batches, so the output does not depend on the number of processes or on where a killed run
stopped: a restart with the same command skips the chunks that have a record and redoes the others. The
pending chunks are dealt round-robin to the ``WORLD_SIZE`` processes of ``torchrun`` (one process: all of
them). When every chunk is done, rank 0 writes ``prompts.jsonl``, ``skipped.jsonl`` and, last,
``index.json`` — from then on the folder is a dataset ``LatentDataset`` opens.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data.format import (
    INDEX_FILE,
    NEGATIVE_FILE,
    SHARD_TEMPLATE,
    write_index,
    write_negative,
    write_prompts,
    write_shard,
)
from ..errors import DataError, OutputError

STATE_DIR = ".prepare"
SETTINGS_FILE = "settings.json"
SKIPPED_FILE = "skipped.jsonl"
CHUNK_TEMPLATE = "chunk-{:05d}.json"


@dataclass
class Item:
    """A finished item: its global index, prompt and per-sample tensors (no leading batch dim)."""

    index: int
    prompt: str
    tensors: dict[str, torch.Tensor]


@dataclass
class Skip:
    """An item left out: its global index, a short reason (counted in the summary) and details."""

    index: int
    reason: str
    detail: str = ""
    source: str = ""


class Worker(Protocol):
    def negative(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def process(self, indices: Sequence[int]) -> list[Item | Skip]: ...


@dataclass
class Plan:
    """What to build.

    Args:
        out: the dataset folder.
        kind: the dataset kind (``"latents"`` or ``"kd"``).
        num_items: items ``0..num_items-1``.
        shard_size: items per chunk (= at most the samples of a shard).
        batch_size: items per :meth:`Worker.process` call (a chunk is split into the same batches always).
        dtype: storage dtype of float tensors.
        settings: everything that defines the output; a restart must pass the same (compared as JSON).
        teacher_config, metadata: for ``index.json``.
    """

    out: Path
    kind: str
    num_items: int
    shard_size: int
    batch_size: int
    dtype: torch.dtype
    settings: dict[str, Any]
    teacher_config: dict | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_items // self.shard_size)

    def chunk_items(self, c: int) -> range:
        return range(c * self.shard_size, min((c + 1) * self.shard_size, self.num_items))


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _write_json(path: Path, value: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _state(out: Path) -> Path:
    return out / STATE_DIR


def check_out(plan: Plan, overwrite: bool) -> str:
    """Check and create the output folder (rank 0, before any model loads): ``"new"``, ``"resume"``
    or ``"complete"``. OutputError for a folder of another run (other settings) or not of this tool."""
    out, state = plan.out, _state(plan.out)
    settings_path = state / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; name a folder")
    if out.exists() and overwrite:
        if any(out.iterdir()) and not (settings_path.is_file() or (out / INDEX_FILE).is_file()):
            raise OutputError(f"--out {out} is a non-empty folder that is neither a dataset nor a prepare run: "
                              "it is not replaced; remove it or choose another folder")
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        if not settings_path.is_file():
            raise OutputError(f"--out {out} is a non-empty folder not written by this command (no "
                              f"{STATE_DIR}/{SETTINGS_FILE}); choose a new folder")
        old = json.loads(settings_path.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(plan.settings))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise OutputError(f"--out {out} holds a run with other settings ({', '.join(diff)} differ); restart "
                              "with the same command to resume it, or pass --overwrite / a new --out")
        return "complete" if (out / INDEX_FILE).is_file() else "resume"
    state.mkdir(parents=True, exist_ok=True)
    _write_json(settings_path, plan.settings)
    return "new"


def _done_chunks(plan: Plan) -> set[int]:
    state = _state(plan.out)
    done = set()
    for c in range(plan.num_chunks):
        if (state / CHUNK_TEMPLATE.format(c)).is_file():
            done.add(c)
    return done


def _finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return k
    return None


def _run_chunk(plan: Plan, worker: Worker, c: int, bar: tqdm, skipped: Counter) -> None:
    kept: list[Item] = []
    skips: list[Skip] = []
    items = plan.chunk_items(c)
    for start in range(items.start, items.stop, plan.batch_size):
        batch = list(range(start, min(start + plan.batch_size, items.stop)))
        for r in worker.process(batch):
            if isinstance(r, Item):
                bad = _finite(r.tensors)
                if bad is not None:
                    r = Skip(r.index, f"non-finite {bad}", f"the {bad} of item {r.index} has NaN/inf values")
            if isinstance(r, Skip):
                skips.append(r)
                skipped[r.reason] += 1
            else:
                kept.append(r)
        bar.update(len(batch))
        bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
    kept.sort(key=lambda it: it.index)
    skips.sort(key=lambda s: s.index)
    name = SHARD_TEMPLATE.format(c)
    if kept:
        keys = list(kept[0].tensors)
        write_shard(plan.out / name, {k: torch.stack([it.tensors[k] for it in kept]) for k in keys}, plan.dtype)
    record = {"chunk": c, "file": name if kept else None, "indices": [it.index for it in kept],
              "prompts": [it.prompt for it in kept],
              "skipped": [{"index": s.index, "reason": s.reason, "detail": s.detail, "source": s.source}
                          for s in skips]}
    _write_json(_state(plan.out) / CHUNK_TEMPLATE.format(c), record)


def merge(plan: Plan) -> dict[str, Any]:
    """Rank 0, every chunk done: ``prompts.jsonl``, ``skipped.jsonl``, then ``index.json``; the summary."""
    state = _state(plan.out)
    if not (plan.out / NEGATIVE_FILE).is_file():
        raise DataError(f"{plan.out}: {NEGATIVE_FILE} is missing")
    shards, prompts, skipped = [], [], []
    for c in range(plan.num_chunks):
        path = state / CHUNK_TEMPLATE.format(c)
        if not path.is_file():
            raise DataError(f"{plan.out}: chunk {c} has no record ({path}); rerun the same command to finish it")
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec["file"]:
            shards.append({"file": rec["file"], "num_samples": len(rec["indices"])})
        prompts += rec["prompts"]
        skipped += rec["skipped"]
    with (plan.out / f".{SKIPPED_FILE}.tmp").open("w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(s) + "\n")
    os.replace(plan.out / f".{SKIPPED_FILE}.tmp", plan.out / SKIPPED_FILE)
    if not shards:
        raise DataError(f"no item could be prepared: all {plan.num_items} were skipped (reasons in "
                        f"{plan.out / SKIPPED_FILE})")
    write_prompts(plan.out, prompts)
    meta = dict(plan.metadata, settings=plan.settings, num_skipped=len(skipped))
    write_index(plan.out, kind=plan.kind, shards=shards, dtype=plan.dtype, teacher_config=plan.teacher_config,
                metadata=meta)
    return summary_of(plan.out)


def summary_of(out: Path) -> dict[str, Any]:
    """Samples, skipped items by reason, shards: from a finished folder."""
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    reasons: Counter = Counter()
    path = out / SKIPPED_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            reasons[json.loads(line)["reason"]] += 1
    return {"out": str(out), "num_samples": index["num_samples"], "num_skipped": sum(reasons.values()),
            "skipped": dict(sorted(reasons.items())), "num_shards": len(index["shards"])}


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(plan: Plan, make_worker: Callable[[], Worker], *, overwrite: bool = False, progress: bool = True,
        desc: str = "prepare") -> dict[str, Any]:
    """Build ``plan.out`` with workers made by ``make_worker`` (called once per process, after the output
    folder is checked). Under torchrun the processes share the pending chunks; rank 0 merges. Returns the
    summary (every rank), with ``seconds`` and ``items_done`` of this run."""
    rank, world, _ = dist_env()
    started_pg = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        started_pg = True
    try:
        status: Any
        if rank == 0:
            try:
                status = check_out(plan, overwrite)
            except OutputError as e:
                status = e
        else:
            status = None
        status = _broadcast(status, world)
        if isinstance(status, BaseException):
            raise status
        if status == "complete":
            summary = summary_of(plan.out)
            summary.update(seconds=0.0, items_done=0, status="complete")
            return summary
        todo = sorted(set(range(plan.num_chunks)) - _done_chunks(plan))
        if world > 1:
            dist.barrier()  # every rank lists the done chunks before any rank writes one
        mine = todo[rank::world]
        worker = make_worker()
        if rank == 0:
            write_negative(plan.out, *worker.negative(), dtype=plan.dtype)
        t0 = time.perf_counter()
        skipped: Counter = Counter()
        n_mine = sum(len(plan.chunk_items(c)) for c in mine)
        with tqdm(total=n_mine, desc=desc if world == 1 else f"{desc} (rank 0 of {world})", unit="clip",
                  disable=not progress or rank != 0, dynamic_ncols=True) as bar:
            for c in mine:
                _run_chunk(plan, worker, c, bar, skipped)
        seconds = time.perf_counter() - t0
        del worker
        if world > 1:
            dist.barrier()
        result: Any = None
        if rank == 0:
            try:
                result = merge(plan)
            except DataError as e:
                result = e
        result = _broadcast(result, world)
        if isinstance(result, BaseException):
            raise result
        result.update(seconds=seconds, items_done=n_mine, status="done")
        return result
    finally:
        if started_pg:
            dist.destroy_process_group()


def format_summary(summary: dict[str, Any], what: str = "clips") -> str:
    """One line: samples, skipped by reason, time and time per 1k items of this run."""
    skipped = ", ".join(f"{n} {r}" for r, n in summary["skipped"].items()) or "none"
    line = (f"{summary['num_samples']} {what} in {summary['num_shards']} shards -> {summary['out']}; "
            f"skipped {summary['num_skipped']} ({skipped})")
    if summary.get("status") == "complete":
        return line + "; already complete (nothing to do)"
    if summary.get("items_done"):
        per_k = summary["seconds"] / summary["items_done"] * 1000
        line += f"; this process: {summary['items_done']} items in {summary['seconds']:.1f} s ({per_k:.1f} s per 1k)"
    return line
