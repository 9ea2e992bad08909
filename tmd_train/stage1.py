"""Stage 1: pretrain the flow head (``method=tm_meanflow``, default, or ``method=tm``; docs/design.md §1).

    python -m tmd_train.stage1 [--config cfg.yaml] [key=value ...] [--resume latest|DIR] [--overwrite]
    python -m tmd_train.stage1                      # the toy world (shipped toy teacher, data=shapes)
    python -m tmd_train.stage1 steps=10             # the toy world with overrides (no teacher= given)
    torchrun --nproc_per_node 8 -m tmd_train.stage1 ...        # FSDP2 over 8 processes

``--help`` lists the keys with their defaults and meanings.
Keys: :class:`~tmd_train.methods.Stage1Config` (the objective's as ``objective.<key>``). Output
folder: ``config.yaml``, ``metrics.jsonl`` + ``logs/`` (scalars), ``checkpoint-{step:07d}/``
(``dcp/``: the sharded student and optimizer state, ``export/``, ``rng_state_{rank}.pt``, ``config.yaml``,
``state.json``; ``python -m tmd_train.export`` makes a student folder of one) and
``student/``, the final student (``TMDStudent.from_pretrained``).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .engine.cli import StageArgs, announce, check_run_paths, parse_stage_args
from .engine.distributed import finish_process_group
from .engine.trainer import fit
from .errors import run_main
from .methods import Stage1Config, build_method

#: The no-argument run (on top of :func:`tmd_train.toy.toy_defaults`): the toy teacher's N2H1 student
#: (H = 1 of L = 6 blocks), a few CPU minutes.
TOY_STAGE1: dict[str, Any] = {
    "objective.outer_steps": 2, "objective.inner_steps": 2, "head_blocks": 1, "synthetic_samples": 4096,
    "batch_size": 8, "steps": 200, "lr": 1e-4, "checkpoint_every": 100, "log_every": 10,
    "output_dir": "runs/stage1-toy"}


def toy_values() -> dict[str, Any]:
    """The toy world's values of this stage (:func:`tmd_train.toy.toy_defaults` with :data:`TOY_STAGE1`), the
    base of a run without ``--config`` and without a ``teacher`` override. Raises FileNotFoundError
    (saying what to pass) without the toy teacher."""
    from .toy import toy_defaults
    return toy_defaults(**TOY_STAGE1)


def parse_args(argv: Sequence[str] | None = None) -> StageArgs:
    """The command line (:func:`tmd_train.engine.cli.parse_stage_args`); raises UserError."""
    return parse_stage_args("stage1", Stage1Config, toy_values, __doc__.split("\n\n")[0], argv,
                            usage="[method=tm_meanflow|tm] ")


def main(argv: Sequence[str] | None = None) -> int:
    """Train; user errors raise :class:`~tmd_train.errors.UserError` (``python -m`` prints one line)."""
    args = parse_args(argv)
    cfg = args.config
    announce("stage1", args)
    check_run_paths(cfg, args.resume)
    method = build_method(cfg)
    final = fit(method, args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    if method.is_main:
        print(f"stage1: {method.summary()}; student written to {final}")
    finish_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
