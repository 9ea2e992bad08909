"""The one on-disk dataset format every stage reads (docs/design.md §5).

A dataset is a folder::

    index.json               written last; see below
    prompts.jsonl            one {"id": i, "prompt": "..."} per sample, i = 0..N-1 in order
    shard-00000.safetensors  latents [n, C, F, H, W], text_emb [n, L, D], text_mask [n, L]
    shard-00001.safetensors  ...
    negative.safetensors     text_emb [L, D], text_mask [L]: the negative-prompt embedding

Kinds: ``"latents"`` datasets hold ``latents``; ``"kd"`` (knowledge-distillation pairs of the
teacher's ODE) hold ``noise`` and ``target`` instead, both ``[n, C, F, H, W]``. A ``"latents"``
dataset may also hold ``noise`` ``[n, C, F, H, W]`` (optional): the start of the teacher ODE that
produced the latents (teacher-synthesised data), which makes it usable as KD pairs too. Float tensors
are stored in one float dtype (bfloat16 by default), masks as ``bool`` (safetensors has a BOOL dtype).

``index.json``::

    {"format": "tmd-dataset", "format_version": 1, "kind": "latents", "num_samples": N,
     "tensors": {"latents": {"shape": [C, F, H, W], "dtype": "bfloat16"},
                 "text_emb": {"shape": [L, D], "dtype": "bfloat16"},
                 "text_mask": {"shape": [L], "dtype": "bool"}},
     "teacher_config": {...} | null,     # the teacher config the data was encoded for
     "metadata": {...},                  # free-form provenance (e.g. the toy world's settings)
     "shards": [{"file": "shard-00000.safetensors", "num_samples": n0}, ...],
     "negative": "negative.safetensors"}

Shapes in ``tensors`` are per sample (without the leading ``n``). A dataset may be built shard by shard
instead (:func:`write_shard`, :func:`write_prompts`, :func:`write_negative`, then :func:`write_index` last;
each file replaced atomically), as ``python -m tmd_train.prepare`` does. :class:`DatasetWriter` builds the
folder in a hidden temporary sibling and renames it into place only after ``index.json`` is
written, so a reader never sees a half-written dataset. :class:`LatentDataset` reads lazily with
``safetensors.safe_open``: opening a dataset reads ``index.json`` and ``prompts.jsonl`` only, and
each item reads one row of one shard.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DataError, MissingFileError, OutputError
from ..files import normalize_permissions

FORMAT_NAME = "tmd-dataset"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PROMPTS_FILE = "prompts.jsonl"
NEGATIVE_FILE = "negative.safetensors"
SHARD_TEMPLATE = "shard-{:05d}.safetensors"

#: Per-kind sample tensors (besides the text tensors every kind has).
KIND_TENSORS: dict[str, tuple[str, ...]] = {"latents": ("latents",), "kd": ("noise", "target")}
#: Per-kind optional sample tensors: a teacher-synthesised ``"latents"`` dataset keeps each clip's start noise.
OPTIONAL_TENSORS: dict[str, tuple[str, ...]] = {"latents": ("noise",), "kd": ()}
TEXT_TENSORS = ("text_emb", "text_mask")
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()} | {torch.bool: "bool"}


class DatasetFormatError(DataError):
    """A dataset folder that exists but is not a valid dataset of this format version (a
    :class:`~tmd_train.errors.DataError`, so a ``ValueError`` too)."""


class DatasetExistsError(OutputError, FileExistsError):
    """The destination of a :class:`DatasetWriter` exists and may not be replaced."""


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


class DatasetWriter:
    """Writes a dataset folder; use as a context manager (or call :meth:`close` / :meth:`abort`).

    Args:
        folder: destination; must not exist unless ``overwrite``.
        kind: ``"latents"`` or ``"kd"``.
        shard_size: samples per shard (the last shard may hold fewer).
        dtype: storage dtype of the float tensors (bfloat16, float16 or float32).
        teacher_config: the teacher config the data was encoded for (a JSON-serialisable dict), or None.
        metadata: free-form JSON-serialisable provenance.
        overwrite: replace an existing dataset folder (only once the new one is complete). A file, or a
            non-empty folder that is not a dataset (no ``index.json``), is never replaced.

    On a clean exit the folder appears atomically (tmp folder renamed); on an exception inside the
    ``with`` block nothing is left behind. :meth:`set_negative` must be called before closing.
    """

    def __init__(self, folder: str | os.PathLike, *, kind: str = "latents", shard_size: int = 256,
                 dtype: torch.dtype = torch.bfloat16, teacher_config: dict | None = None,
                 metadata: dict | None = None, overwrite: bool = False) -> None:
        if kind not in KIND_TENSORS:
            raise ValueError(f"DatasetWriter: kind must be one of {sorted(KIND_TENSORS)}, got {kind!r}")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"DatasetWriter: shard_size must be a positive int, got {shard_size!r}")
        if dtype not in FLOAT_DTYPES.values():
            raise ValueError(f"DatasetWriter: dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype}")
        if teacher_config is not None and not isinstance(teacher_config, dict):
            raise ValueError("DatasetWriter: teacher_config must be a dict or None")
        self.folder = Path(folder)
        if self.folder.exists() and not overwrite:
            raise DatasetExistsError(f"{self.folder} already exists (pass overwrite=True / --overwrite to replace it)")
        if self.folder.exists() and not self.folder.is_dir():
            raise DatasetExistsError(f"{self.folder} is a file, not a dataset folder: it is not replaced; remove it "
                                     "or choose another destination")
        if self.folder.exists() and any(self.folder.iterdir()) and not (self.folder / INDEX_FILE).is_file():
            raise DatasetExistsError(f"{self.folder} is a non-empty folder but not a dataset (no {INDEX_FILE}): it "
                                     "is not replaced; remove it or choose another destination")
        # Serialisability is checked now rather than after all the work.
        json.dumps(teacher_config)
        json.dumps(metadata or {})
        self.kind = kind
        self.keys = KIND_TENSORS[kind]
        self.shard_size = shard_size
        self.dtype = dtype
        self.teacher_config = teacher_config
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.folder.parent / f".{self.folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self._prompts = (self._tmp / PROMPTS_FILE).open("w", encoding="utf-8")
        self._buffer: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys + TEXT_TENSORS}
        self._buffered = 0
        self._shards: list[dict[str, Any]] = []
        self._shapes: dict[str, list[int]] | None = None
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None
        self._count = 0
        self._open = True

    # ------------------------------------------------------------------ adding
    def _check_batch(self, n: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in self.keys + TEXT_TENSORS if k not in tensors]
        extra = [k for k in tensors if k not in self.keys + TEXT_TENSORS]
        if missing or extra:
            raise ValueError(f"DatasetWriter({self.kind!r}): expected tensors {list(self.keys + TEXT_TENSORS)}; "
                             f"missing {missing}, unexpected {extra}")
        out = {}
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"DatasetWriter: {k} must be a tensor, got {type(t).__name__}")
            if t.ndim < 1 or t.shape[0] != n:
                raise ValueError(f"DatasetWriter: {k} must have leading dim {n} (one row per prompt), "
                                 f"got shape {tuple(t.shape)}")
            if k == "text_mask":
                if t.dtype != torch.bool:
                    raise ValueError(f"DatasetWriter: text_mask must be bool, got {t.dtype}")
                out[k] = t.detach().cpu().contiguous()
            else:
                if not t.is_floating_point():
                    raise ValueError(f"DatasetWriter: {k} must be a float tensor, got {t.dtype}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"DatasetWriter: {k} has non-finite values")
                out[k] = t.detach().cpu().to(self.dtype).contiguous()
        layout = {"text_emb": "[n, L, D]", "text_mask": "[n, L]"} | {k: "[n, C, F, H, W]" for k in self.keys}
        for k, t in out.items():
            if t.ndim != layout[k].count(",") + 1:
                raise ValueError(f"DatasetWriter: {k} must be {layout[k]}, got shape {tuple(t.shape)}")
        if out["text_mask"].shape[1] != out["text_emb"].shape[1]:
            raise ValueError(f"DatasetWriter: text_mask [n, L] and text_emb [n, L, D] disagree on L: "
                             f"{tuple(out['text_mask'].shape)} vs {tuple(out['text_emb'].shape)}")
        if self.kind == "kd" and out["noise"].shape != out["target"].shape:
            raise ValueError(f"DatasetWriter: noise and target shapes differ: "
                             f"{tuple(out['noise'].shape)} vs {tuple(out['target'].shape)}")
        shapes = {k: list(t.shape[1:]) for k, t in out.items()}
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(f"DatasetWriter: per-sample shapes {shapes} differ from the dataset's {self._shapes}")
        return out

    def add_batch(self, prompts: Sequence[str], **tensors: torch.Tensor) -> None:
        """Append ``n = len(prompts)`` samples.

        Keyword tensors: ``text_emb [n, L, D]`` (float), ``text_mask [n, L]`` (bool) and, for kind
        ``"latents"``, ``latents [n, C, F, H, W]``; for kind ``"kd"``, ``noise`` and ``target``
        ``[n, C, F, H, W]``. Float tensors are cast to the storage dtype.
        """
        if not self._open:
            raise RuntimeError("DatasetWriter: already closed")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("DatasetWriter: prompts must be a sequence of str")
        n = len(prompts)
        if n == 0:
            return
        checked = self._check_batch(n, tensors)
        for i, p in enumerate(prompts):
            self._prompts.write(json.dumps({"id": self._count + i, "prompt": p}) + "\n")
        self._count += n
        start = 0
        while start < n:
            take = min(n - start, self.shard_size - self._buffered)
            for k, t in checked.items():
                self._buffer[k].append(t[start:start + take])
            self._buffered += take
            start += take
            if self._buffered == self.shard_size:
                self._flush()

    def add(self, prompt: str, **tensors: torch.Tensor) -> None:
        """Append one sample: the tensors of :meth:`add_batch` without the leading ``n``."""
        self.add_batch([prompt], **{k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v
                                    for k, v in tensors.items()})

    def set_negative(self, text_emb: torch.Tensor, text_mask: torch.Tensor) -> None:
        """The negative-prompt embedding: ``text_emb [L, D]`` (float), ``text_mask [L]`` (bool)."""
        if not isinstance(text_emb, torch.Tensor) or text_emb.ndim != 2 or not text_emb.is_floating_point():
            raise ValueError("DatasetWriter.set_negative: text_emb must be a float tensor [L, D]")
        if not isinstance(text_mask, torch.Tensor) or text_mask.ndim != 1 or text_mask.dtype != torch.bool:
            raise ValueError("DatasetWriter.set_negative: text_mask must be a bool tensor [L]")
        if text_mask.shape[0] != text_emb.shape[0]:
            raise ValueError(f"DatasetWriter.set_negative: text_mask [L] and text_emb [L, D] disagree on L: "
                             f"{tuple(text_mask.shape)} vs {tuple(text_emb.shape)}")
        if not torch.isfinite(text_emb).all():
            raise ValueError("DatasetWriter.set_negative: text_emb has non-finite values")
        self._negative = (text_emb.detach().cpu().to(self.dtype).contiguous(), text_mask.detach().cpu().contiguous())

    # ------------------------------------------------------------- finalising
    def _flush(self) -> None:
        if self._buffered == 0:
            return
        name = SHARD_TEMPLATE.format(len(self._shards))
        tensors = {k: torch.cat(v) for k, v in self._buffer.items()}
        save_file(tensors, str(self._tmp / name),
                  metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                            "num_samples": str(self._buffered)})
        self._shards.append({"file": name, "num_samples": self._buffered})
        self._buffer = {k: [] for k in self._buffer}
        self._buffered = 0

    def close(self) -> Path:
        """Flush, write ``negative.safetensors`` and ``index.json`` (last), and move the folder into place."""
        if not self._open:
            raise RuntimeError("DatasetWriter: already closed")
        try:
            if self._count == 0:
                raise ValueError("DatasetWriter: no samples were added")
            if self._negative is None:
                raise ValueError("DatasetWriter: set_negative(text_emb, text_mask) was not called")
            assert self._shapes is not None
            neg_emb, neg_mask = self._negative
            if list(neg_emb.shape) != self._shapes["text_emb"]:
                raise ValueError(f"DatasetWriter: negative text_emb shape {tuple(neg_emb.shape)} differs from "
                                 f"the samples' {tuple(self._shapes['text_emb'])}")
            self._flush()
            self._prompts.close()
            save_file({"text_emb": neg_emb, "text_mask": neg_mask}, str(self._tmp / NEGATIVE_FILE),
                      metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
            index = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "num_samples": self._count,
                "tensors": {k: {"shape": self._shapes[k],
                                "dtype": _dtype_name(torch.bool if k == "text_mask" else self.dtype)}
                            for k in self.keys + TEXT_TENSORS},
                "teacher_config": self.teacher_config,
                "metadata": self.metadata,
                "shards": self._shards,
                "negative": NEGATIVE_FILE,
            }
            with (self._tmp / INDEX_FILE).open("w", encoding="utf-8") as f:
                json.dump(index, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            self._install()
        except BaseException:
            self.abort()
            raise
        self._open = False
        return self.folder

    def _install(self) -> None:
        old = None
        if self.folder.exists():
            if not self.overwrite:
                raise DatasetExistsError(f"{self.folder} appeared while writing")
            old = self.folder.parent / f".{self.folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.folder, old)
        normalize_permissions(self._tmp)
        os.rename(self._tmp, self.folder)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        """Discard everything written so far."""
        self._open = False
        if not self._prompts.closed:
            self._prompts.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._open:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return self._count


# ------------------------------------------------------- building shard by shard
def _replace_atomically(path: Path, write) -> None:
    """``write(tmp_path)`` then rename ``tmp_path`` onto ``path`` (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        normalize_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.bool: "BOOL"}


def save_deterministic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                       metadata: dict[str, str] | None = None) -> None:
    """A safetensors file whose bytes depend only on its content (``safetensors.torch.save_file`` orders the
    metadata as a hash map does, differently from one process to the next): header JSON with sorted keys,
    tensors in name order, padded to 8 bytes as the format asks. Read by ``safe_open`` like any other."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"save_deterministic: {name} has unsupported dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> int:
    """Write one shard atomically: float tensors cast to ``dtype``, ``text_mask`` bool, all with the same
    leading ``n`` (returned). Non-finite values are refused (ValueError)."""
    out, n = {}, None
    for k, t in tensors.items():
        if n is None:
            n = int(t.shape[0])
        if t.ndim < 1 or t.shape[0] != n:
            raise ValueError(f"write_shard: {k} must have leading dim {n}, got shape {tuple(t.shape)}")
        if k == "text_mask":
            if t.dtype != torch.bool:
                raise ValueError(f"write_shard: text_mask must be bool, got {t.dtype}")
            out[k] = t.detach().cpu().contiguous()
        else:
            if not torch.isfinite(t).all():
                raise ValueError(f"write_shard: {k} has non-finite values")
            out[k] = t.detach().cpu().to(dtype).contiguous()
    if not n:
        raise ValueError("write_shard: no samples")
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "num_samples": str(n)}
    _replace_atomically(Path(path), lambda tmp: save_deterministic(out, tmp, meta))
    return n


def write_negative(folder: str | os.PathLike, text_emb: torch.Tensor, text_mask: torch.Tensor,
                   dtype: torch.dtype = torch.bfloat16) -> None:
    """``negative.safetensors`` of ``folder`` (``text_emb [L, D]``, ``text_mask [L]`` bool), atomically."""
    if text_emb.ndim != 2 or text_mask.ndim != 1 or text_mask.dtype != torch.bool or \
            text_mask.shape[0] != text_emb.shape[0]:
        raise ValueError(f"write_negative: need text_emb [L, D] and a bool text_mask [L], got "
                         f"{tuple(text_emb.shape)} / {tuple(text_mask.shape)} {text_mask.dtype}")
    tensors = {"text_emb": text_emb.detach().cpu().to(dtype).contiguous(), "text_mask": text_mask.cpu().contiguous()}
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    _replace_atomically(Path(folder) / NEGATIVE_FILE, lambda tmp: save_deterministic(tensors, tmp, meta))


def write_prompts(folder: str | os.PathLike, prompts: Sequence[str]) -> None:
    """``prompts.jsonl`` of ``folder`` (ids 0..N-1 in order), atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    _replace_atomically(Path(folder) / PROMPTS_FILE, write)


def write_index(folder: str | os.PathLike, *, kind: str, shards: Sequence[dict[str, Any]],
                dtype: torch.dtype = torch.bfloat16, teacher_config: dict | None = None,
                metadata: dict | None = None) -> dict[str, Any]:
    """Write ``index.json`` of a folder whose shards (``[{"file", "num_samples"}, ...]`` in order),
    ``prompts.jsonl`` and ``negative.safetensors`` are in place (write it last: it makes the folder a
    dataset). The tensor shapes are read from the first shard; every shard is checked against them.
    Returns the index (validated by :func:`read_index`)."""
    folder = Path(folder)
    if not shards:
        raise ValueError("write_index: no shards")
    spec: dict[str, dict[str, Any]] = {}
    for s in shards:
        with safe_open(str(folder / s["file"]), framework="pt", device="cpu") as h:
            shapes = {k: list(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118
        if any(v[0] != s["num_samples"] for v in shapes.values()):
            raise ValueError(f"write_index: shard {s['file']} does not hold {s['num_samples']} samples")
        if not spec:
            spec = {k: {"shape": v[1:], "dtype": "bool" if k == "text_mask" else _dtype_name(dtype)}
                    for k, v in sorted(shapes.items())}
        elif {k: v[1:] for k, v in shapes.items()} != {k: v["shape"] for k, v in spec.items()}:
            raise ValueError(f"write_index: shard {s['file']} has shapes {shapes}, the first shard {spec}")
    index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
             "num_samples": sum(int(s["num_samples"]) for s in shards), "tensors": spec,
             "teacher_config": teacher_config, "metadata": dict(metadata or {}),
             "shards": [{"file": s["file"], "num_samples": int(s["num_samples"])} for s in shards],
             "negative": NEGATIVE_FILE}
    _check_index_fields(index)

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    _replace_atomically(folder / INDEX_FILE, write)
    return read_index(folder)


# ---------------------------------------------------------------------- reading
def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``index.json`` of a dataset folder.

    Raises :class:`~tmd_train.errors.MissingFileError` (a ``FileNotFoundError``: no folder / no index) or
    :class:`DatasetFormatError` (corrupt JSON,
    another format, another format version, missing or inconsistent fields).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"dataset folder {folder} does not exist")
    path = folder / INDEX_FILE
    if not path.is_file():
        raise MissingFileError(f"{folder} is not a tmd dataset: no {INDEX_FILE} (an interrupted write leaves "
                                f"only a hidden .{folder.name}.tmp-* folder)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"corrupt {path}: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{path} is not a {FORMAT_NAME!r} index")
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(f"{path}: format_version {version!r}, this code reads version {FORMAT_VERSION}")
    try:
        _check_index_fields(index)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DatasetFormatError(f"{path}: {e}") from e
    return index


def _check_index_fields(index: dict[str, Any]) -> None:
    """Structural checks of a parsed index (raises KeyError/TypeError/ValueError on a bad one)."""
    for key in ("kind", "num_samples", "tensors", "shards", "negative"):
        if key not in index:
            raise KeyError(f"missing field {key!r}")
    kind = index["kind"]
    if kind not in KIND_TENSORS:
        raise ValueError(f"unknown kind {kind!r}")
    expected = set(KIND_TENSORS[kind] + TEXT_TENSORS)
    allowed = expected | set(OPTIONAL_TENSORS[kind])
    if not expected <= set(index["tensors"]) <= allowed:
        raise ValueError(f"kind {kind!r} needs tensors {sorted(expected)} (optional: "
                         f"{sorted(OPTIONAL_TENSORS[kind])}), index lists {sorted(index['tensors'])}")
    for k, spec in index["tensors"].items():
        allowed = ("bool",) if k == "text_mask" else tuple(FLOAT_DTYPES)
        if spec["dtype"] not in allowed:
            raise ValueError(f"tensor {k!r} has unsupported dtype {spec['dtype']!r}")
        if not all(isinstance(d, int) and d > 0 for d in spec["shape"]):
            raise ValueError(f"tensor {k!r} has a bad shape {spec['shape']!r}")
    if not isinstance(index["num_samples"], int) or index["num_samples"] < 1:
        raise ValueError(f"bad num_samples {index['num_samples']!r}")
    for shard in index["shards"]:
        if not isinstance(shard["file"], str) or Path(shard["file"]).name != shard["file"]:
            raise ValueError(f"bad shard file name {shard['file']!r}")
        if not isinstance(shard["num_samples"], int) or shard["num_samples"] < 1:
            raise ValueError(f"shard {shard['file']!r} has bad num_samples {shard['num_samples']!r}")
    total = sum(shard["num_samples"] for shard in index["shards"])
    if total != index["num_samples"]:
        raise ValueError(f"shards hold {total} samples, num_samples says {index['num_samples']}")


def _torch_dtype(name: str) -> torch.dtype:
    return torch.bool if name == "bool" else FLOAT_DTYPES[name]


class LatentDataset(torch.utils.data.Dataset):
    """Random access to a dataset folder, reading lazily.

    ``ds[i]`` returns ``{"latents": [C, F, H, W]`` (or ``"noise"``, ``"target"`` for kind ``"kd"``; plus
    ``"noise"`` where a ``"latents"`` dataset holds it),
    ``"text_emb": [L, D], "text_mask": [L] (bool), "prompt": str, "index": int}``; float tensors
    in the stored dtype. Only the shard holding sample ``i`` is opened (handles are cached per
    process and dropped when the dataset is pickled to DataLoader workers), and only its row ``i``
    is read.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.kind: str = self.index["kind"]
        self.tensor_keys: tuple[str, ...] = (KIND_TENSORS[self.kind] + tuple(
            k for k in OPTIONAL_TENSORS[self.kind] if k in self.index["tensors"]) + TEXT_TENSORS)
        self.teacher_config: dict | None = self.index.get("teacher_config")
        self.metadata: dict = self.index.get("metadata") or {}
        self.shapes = {k: tuple(v["shape"]) for k, v in self.index["tensors"].items()}
        self.dtypes = {k: _torch_dtype(v["dtype"]) for k, v in self.index["tensors"].items()}
        self._shard_files = [self.folder / s["file"] for s in self.index["shards"]]
        self._starts = []
        start = 0
        for s in self.index["shards"]:
            self._starts.append(start)
            start += int(s["num_samples"])
        self._counts = [int(s["num_samples"]) for s in self.index["shards"]]
        for f in self._shard_files:
            if not f.is_file():
                raise MissingFileError(f"dataset {self.folder}: shard {f.name} listed in {INDEX_FILE} is missing")
        self.prompts = self._read_prompts()
        self._handles: dict[int, Any] = {}

    def _read_prompts(self) -> list[str]:
        path = self.folder / PROMPTS_FILE
        if not path.is_file():
            raise MissingFileError(f"dataset {self.folder}: {PROMPTS_FILE} is missing")
        prompts = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                try:
                    row = json.loads(line)
                    ok = row["id"] == line_no and isinstance(row["prompt"], str)
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DatasetFormatError(f"corrupt {path} at line {line_no + 1}: {e}") from e
                if not ok:
                    raise DatasetFormatError(f"corrupt {path} at line {line_no + 1}: expected id {line_no}")
                prompts.append(row["prompt"])
        if len(prompts) != len(self):
            raise DatasetFormatError(f"{path} has {len(prompts)} prompts, {INDEX_FILE} says {len(self)} samples")
        return prompts

    def __len__(self) -> int:
        return int(self.index["num_samples"])

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            path = self._shard_files[shard]
            try:
                h = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise DatasetFormatError(f"dataset {self.folder}: corrupt shard {path.name}: {e}") from e
            keys = set(h.keys())
            if keys != set(self.tensor_keys):
                raise DatasetFormatError(f"dataset {self.folder}: shard {path.name} holds {sorted(keys)}, "
                                         f"expected {sorted(self.tensor_keys)}")
            for k in self.tensor_keys:
                shape = tuple(h.get_slice(k).get_shape())
                want = (self._counts[shard], *self.shapes[k])
                if shape != want:
                    raise DatasetFormatError(f"dataset {self.folder}: shard {path.name} tensor {k} has shape "
                                             f"{shape}, index says {want}")
            self._handles[shard] = h
        return self._handles[shard]

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, row)`` of sample ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n}")
        i %= n
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return lo, i - self._starts[lo]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        shard, row = self.locate(i)
        h = self._handle(shard)
        item: dict[str, Any] = {}
        for k in self.tensor_keys:
            t = h.get_slice(k)[row:row + 1][0]
            if t.dtype != self.dtypes[k]:
                raise DatasetFormatError(f"dataset {self.folder}: shard {self._shard_files[shard].name} tensor "
                                         f"{k} is {t.dtype}, index says {self.dtypes[k]}")
            item[k] = t
        item["prompt"] = self.prompts[i % len(self)]
        item["index"] = i % len(self)
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def load_negative(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative-prompt embedding of a dataset: ``(text_emb [L, D], text_mask [L] bool)``."""
    index = read_index(folder)
    path = Path(folder) / index["negative"]
    if not path.is_file():
        raise MissingFileError(f"dataset {folder}: {path.name} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            emb, mask = f.get_tensor("text_emb"), f.get_tensor("text_mask")
    except (SafetensorError, OSError) as e:
        raise DatasetFormatError(f"dataset {folder}: corrupt {path.name}: {e}") from e
    except KeyError as e:
        raise DatasetFormatError(f"dataset {folder}: {path.name} lacks {e}") from e
    want = tuple(index["tensors"]["text_emb"]["shape"])
    if tuple(emb.shape) != want or tuple(mask.shape) != want[:1] or mask.dtype != torch.bool:
        raise DatasetFormatError(f"dataset {folder}: negative shapes {tuple(emb.shape)}/{tuple(mask.shape)} "
                                 f"({mask.dtype}) do not match text_emb {want}")
    return emb, mask
