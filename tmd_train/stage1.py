"""Stage 1: pretrain the flow head (``method=tm_meanflow``, default, or ``method=tm``; docs/design.md §1).

    python -m tmd_train.stage1 [--config cfg.yaml] [key=value ...] [--resume latest|DIR]
    python -m tmd_train.stage1                      # the toy world (shipped toy teacher, data=shapes)
    torchrun --nproc_per_node 8 -m tmd_train.stage1 ...        # FSDP2 over 8 processes

Keys: :class:`~tmd_train.methods.Stage1Config` (the objective's as ``objective.<key>``). Output
folder: ``config.yaml``, ``metrics.jsonl`` + ``logs/`` (scalars), ``checkpoint-{step:07d}/``
(``student/``, ``optimizer.pt``, ``rng_state_{rank}.pt``, ``config.yaml``, ``state.json``) and
``student/``, the final student (``TMDStudent.from_pretrained``).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .engine.cli import parse_stage_args
from .engine.config import config_from_dict
from .engine.distributed import finish_process_group
from .engine.trainer import fit
from .methods import Stage1Config, build_method

#: The no-argument run (on top of :func:`tmd_train.toy.toy_defaults`): the toy teacher's N2H1 student
#: (H = 1 of L = 6 blocks), a few CPU minutes.
TOY_STAGE1: dict[str, Any] = {
    "objective.outer_steps": 2, "objective.inner_steps": 2, "head_blocks": 1, "synthetic_samples": 4096,
    "batch_size": 8, "steps": 200, "lr": 1e-4, "checkpoint_every": 100, "log_every": 10,
    "output_dir": "runs/stage1-toy"}


def default_config() -> Stage1Config:
    """The no-argument run: the toy world (:func:`tmd_train.toy.toy_defaults` with :data:`TOY_STAGE1`).
    Raises FileNotFoundError (saying what to pass) without the toy teacher."""
    from .toy import toy_defaults
    return config_from_dict(Stage1Config, toy_defaults(**TOY_STAGE1))


def parse_args(argv: Sequence[str] | None = None) -> tuple[Stage1Config, str | None]:
    return parse_stage_args("stage1", Stage1Config, default_config, __doc__.split("\n\n")[0], argv,
                            usage="[method=tm_meanflow|tm] ")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    method = build_method(cfg)
    final = fit(method, resume)
    if method.is_main:
        print(f"stage1: {method.summary()}; student written to {final}")
    finish_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
