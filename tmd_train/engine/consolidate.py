"""Streaming consolidation: a model folder (``config.json`` + one ``.safetensors`` file) written from sharded
weights one tensor at a time (docs/design.md §6.5).

An :class:`ExportSpec` says what the exported folder holds: its small files (``config.json``, …, as text),
the name of its weights file and, in order, each output tensor's name and the key of the checkpoint entry it
comes from (a key of the flattened state that :func:`~tmd_train.engine.checkpoint.save_sharded` writes).
Every checkpoint carries its spec (``export/``), so a checkpoint can become a model folder offline.

The weights file is written by :class:`SafetensorsStream`: the header (names, dtypes, shapes, offsets) is
known from the shapes alone and written first, then each tensor's bytes as it arrives. Two sources:

* :func:`write_export_live` during training (collective): per output tensor, a DTensor is all-gathered
  (``full_tensor()``), written by the main process and dropped before the next one, so a process holds at
  most one unsharded tensor and never an optimizer state;
* :func:`write_export_from_checkpoint` offline, in one process without a process group: tensors are read
  from the checkpoint's ``dcp/`` files (``torch.distributed.checkpoint.load`` of a few keys at a time, at
  most ``max_bytes`` per read; only the byte ranges of those entries are read).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import MissingFileError

SPEC_FILE = "export.json"
SPEC_VERSION = 1
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}
_READ_BYTES = 1 << 30


@dataclass
class ExportSpec:
    """What an exported model folder holds.

    Attributes:
        weights: the weights file's name (``model.safetensors``, ``diffusion_pytorch_model.safetensors``).
        tensors: ``[(name in the weights file, key of the checkpoint entry)]``, in file order.
        files: the folder's other files, ``{name: text}`` (``config.json``, ``tmd_sampling.json``).
    """

    weights: str
    tensors: list[tuple[str, str]]
    files: dict[str, str] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        """The spec as ``folder/`` (its files plus ``export.json``), as a checkpoint carries it."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (folder / name).write_text(text)
        record = {"version": SPEC_VERSION, "weights": self.weights, "files": sorted(self.files),
                  "tensors": [list(t) for t in self.tensors]}
        (folder / SPEC_FILE).write_text(json.dumps(record, indent=0) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ExportSpec:
        """The spec :meth:`write` wrote. Raises MissingFileError when it is missing or malformed."""
        file = folder / SPEC_FILE
        if not file.is_file():
            raise MissingFileError(f"{folder} has no {SPEC_FILE}: not the export part of a checkpoint")
        try:
            record = json.loads(file.read_text())
            if record.get("version") != SPEC_VERSION:
                raise ValueError(f"version {record.get('version')!r}, expected {SPEC_VERSION}")
            files = {name: (folder / name).read_text() for name in record["files"]}
            return cls(str(record["weights"]), [(str(a), str(b)) for a, b in record["tensors"]], files)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MissingFileError(f"{file} cannot be read ({type(e).__name__}: {e})") from None


def flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The entries of a nested mapping keyed by dotted paths, as ``torch.distributed.checkpoint`` names them
    (lists are not expanded: the exported entries are tensors in mappings)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class SafetensorsStream:
    """A ``.safetensors`` file written tensor by tensor: ``entries`` (name, dtype, shape) fix the header,
    then :meth:`write` is called once per entry, in that order; :meth:`close` checks that all came."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._expect: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            if dtype not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            if name in header:
                raise ValueError(f"{name}: listed twice")
            shape = tuple(int(s) for s in shape)
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
            self._expect.append((name, dtype, shape))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self._expect[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"safetensors stream: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected "
                             f"{want} {dtype} {shape}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, raise ValueError if some entries were not written."""
        self._file.close()
        if check and self._next != len(self._expect):
            raise ValueError(f"safetensors stream: {len(self._expect) - self._next} tensors were not written")


def _full(x: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a (possibly) DTensor (a collective for a DTensor)."""
    gather = getattr(x, "full_tensor", None)
    return gather() if callable(gather) else x


def write_export_live(directory: Path, spec: ExportSpec, state: Mapping[str, torch.Tensor], is_main: bool,
                      desc: str = "export") -> None:
    """Write the folder of ``spec`` from live tensors (collective; every process calls it with the same
    spec): ``state`` maps the spec's checkpoint keys to this process's (sharded) tensors. One tensor is
    unsharded at a time; the main process writes it and drops it."""
    missing = [key for _, key in spec.tensors if key not in state]
    if missing:
        raise KeyError(f"export: no tensor for {missing[:5]}")
    # a failure on the main process (e.g. a full disk) is raised after the loop: the other processes are
    # in the same all-gathers and must not be left waiting
    error: BaseException | None = None
    stream = None
    if is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, text in spec.files.items():
                (directory / name).write_text(text)
            stream = SafetensorsStream(directory / spec.weights,
                                       [(name, state[key].dtype, state[key].shape) for name, key in spec.tensors])
        except Exception as e:  # noqa: BLE001 - re-raised below
            error = e
    for name, key in tqdm(spec.tensors, desc=desc, disable=not is_main, leave=False):
        full = _full(state[key])
        if stream is not None and error is None:
            try:
                stream.write(name, full)
            except Exception as e:  # noqa: BLE001 - re-raised below
                error = e
        del full
    if stream is not None:
        try:
            stream.close(check=error is None)
        except Exception as e:  # noqa: BLE001 - re-raised below
            error = error or e
    if error is not None:
        raise error


def dcp_metadata(dcp_dir: Path) -> Any:
    """The ``torch.distributed.checkpoint`` metadata of a checkpoint's ``dcp/`` folder."""
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(dcp_dir)).read_metadata()


def read_dcp_tensors(dcp_dir: Path, keys: Iterable[str] | None = None, *, max_bytes: int = _READ_BYTES
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, full CPU tensor)`` of the tensor entries ``keys`` (default: all) of a ``dcp/`` folder, in
    order, reading at most ``max_bytes`` of tensors at a time (one process, no process group needed).

    Raises:
        KeyError: a key that is not a tensor entry of the checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .checkpoint import quiet_single_process

    meta = dcp_metadata(dcp_dir).state_dict_metadata
    wanted = list(keys) if keys is not None else [k for k, v in meta.items() if isinstance(v, TensorStorageMetadata)]
    bad = [k for k in wanted if not isinstance(meta.get(k), TensorStorageMetadata)]
    if bad:
        raise KeyError(f"{dcp_dir} has no tensor entries {bad[:5]}")
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal batch, size
        if batch:
            with quiet_single_process():
                dcp.load(batch, checkpoint_id=str(dcp_dir), no_dist=True)
            yield from batch.items()
        batch, size = {}, 0

    for key in wanted:
        m = meta[key]
        t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        if batch and size + t.nbytes > max_bytes:
            yield from flush()
        batch[key] = t
        size += t.nbytes
    yield from flush()


def write_export_from_checkpoint(directory: Path, spec: ExportSpec, dcp_dir: Path, *,
                                 max_bytes: int = _READ_BYTES, progress: bool = True) -> None:
    """Write the folder of ``spec`` from a checkpoint's ``dcp/`` files in one process, holding at most
    ``max_bytes`` of tensors (or one tensor, if larger) at a time."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp_metadata(dcp_dir).state_dict_metadata
    bad = [key for _, key in spec.tensors if not isinstance(meta.get(key), TensorStorageMetadata)]
    if bad:
        raise MissingFileError(f"{dcp_dir} lacks the entries the export needs ({', '.join(bad[:3])}"
                               f"{' …' if len(bad) > 3 else ''})")
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in spec.files.items():
        (directory / name).write_text(text)
    entries = [(name, meta[key].properties.dtype, meta[key].size) for name, key in spec.tensors]
    stream = SafetensorsStream(directory / spec.weights, entries)
    names = dict((key, name) for name, key in spec.tensors)
    if len(names) != len(spec.tensors):                       # one entry exported twice: read it per name
        names = {}
    try:
        with tqdm(total=len(spec.tensors), desc="export", disable=not progress) as bar:
            if names:
                for key, tensor in read_dcp_tensors(dcp_dir, [key for _, key in spec.tensors], max_bytes=max_bytes):
                    stream.write(names[key], tensor)
                    bar.update(1)
            else:
                for name, key in spec.tensors:
                    for _, tensor in read_dcp_tensors(dcp_dir, [key], max_bytes=max_bytes):
                        stream.write(name, tensor)
                    bar.update(1)
    except BaseException:
        stream.close(check=False)
        raise
    stream.close()
