"""Export CLI: ``python -m tmd_train.export CHECKPOINT --out DIR [--overwrite]``.

Turns a training checkpoint (``<output_dir>/checkpoint-{step}/``, of stage 1 or stage 2, written by any
number of processes) into the model folder the run writes at its end (``student/``): a TMD student
(``config.json`` + ``model.safetensors``, for ``TMDStudent.from_pretrained``) or, for ``method=dmd2v``, a
plain diffusers ``WanTransformer3DModel`` folder, with ``tmd_sampling.json`` for stage 2 (the EMA
weights). One process, no GPU: the weights are read from the checkpoint's sharded files a few at a time
(at most ``--max-gib`` GiB, or one tensor if larger) and streamed into the ``.safetensors`` file; the
optimizer state is never read. The checkpoint is verified first (every file's size and SHA-256); the
folder is written atomically (a hidden temporary folder renamed into place). docs/design.md §6.5.

A user error (no such checkpoint, a damaged one, an existing ``--out`` without ``--overwrite``) prints one
line ``error: …`` and exits with status 2 (``--debug``: traceback).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from .engine.checkpoint import (
    DCP_DIR,
    EXPORT_SPEC_DIR,
    CheckpointError,
    require_sharded,
    verify_checkpoint,
    write_folder,
)
from .engine.consolidate import ExportSpec, write_export_from_checkpoint
from .errors import ArgumentParser, MissingFileError, OutputError, UserError, run_main


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m tmd_train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint folder (<output_dir>/checkpoint-NNNNNNN)")
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--max-gib", type=float, default=1.0,
                    help="most GiB of weights held in memory at once (default 1; one tensor if larger)")
    ap.add_argument("--no-verify", action="store_true", help="skip the size and SHA-256 check of the checkpoint")
    return ap


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, verify: bool = True,
                      max_bytes: int = 1 << 30, progress: bool = True) -> Path:
    """Write the model folder of ``checkpoint`` to ``out`` (one process, streaming); returns ``out``.

    Raises:
        MissingFileError: ``checkpoint`` is not a checkpoint folder.
        CheckpointError: it is damaged, of the earlier full-state format, or lacks its export description.
        OutputError: ``out`` exists (without ``overwrite``), is the checkpoint, or cannot be written.
    """
    folder, target = Path(checkpoint), Path(out)
    if not folder.is_dir():
        raise MissingFileError(f"checkpoint {folder}: no such folder")
    if verify:
        verify_checkpoint(folder)
    require_sharded(folder)
    try:
        spec = ExportSpec.read(folder / EXPORT_SPEC_DIR)
    except MissingFileError as e:
        raise CheckpointError(f"checkpoint {folder} cannot be exported: {e}") from None
    if target.resolve() == folder.resolve() or folder.resolve() in target.resolve().parents:
        raise OutputError(f"--out {target} is inside the checkpoint {folder}; choose another folder")
    if target.exists() and not overwrite:
        raise OutputError(f"--out {target} exists; pass --overwrite to replace it, or choose another folder")
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {target} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_folder(target, lambda tmp, _: write_export_from_checkpoint(tmp, spec, folder / DCP_DIR,
                                                                      max_bytes=max_bytes, progress=progress),
                 is_main=True, what="export")
    return target


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.max_gib > 0:
        raise UserError(f"--max-gib must be positive, got {args.max_gib}")
    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, verify=not args.no_verify,
                            max_bytes=max(1, int(args.max_gib * (1 << 30))))
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors print ``error: …`` and return 2 (see :func:`tmd_train.errors.run_main`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
