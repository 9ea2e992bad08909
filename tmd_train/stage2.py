"""Stage 2: distil the few-step generator (``method=tmd``, default, or ``method=dmd2v``; docs/design.md §1).

    python -m tmd_train.stage2 [--config cfg.yaml] [key=value ...] [--resume latest|DIR] [--overwrite]
    python -m tmd_train.stage2                      # the toy world (shipped toy teacher, data=shapes)
    python -m tmd_train.stage2 steps=10             # the toy world with overrides (no teacher= given)
    torchrun --nproc_per_node 8 -m tmd_train.stage2 ...        # FSDP2 over 8 processes

``--help`` lists the keys with their defaults and meanings.
Keys: :class:`~tmd_train.methods.Stage2Config` (the DMD loss's as ``dmd.<key>``). Output folder:
``config.yaml``, ``metrics.jsonl`` + ``logs/`` (scalars; sample grids), ``checkpoint-{step:07d}/``
(``dcp/``: the sharded generator, EMA, fake score, discriminator and optimizer states, ``export/``,
``rng_state_{rank}.pt``, ``config.yaml``, ``state.json``; ``python -m tmd_train.export`` makes a model
folder of one) and ``student/``, the EMA generator (a ``TMDStudent`` folder for tmd, a diffusers
``WanTransformer3DModel`` folder for dmd2v) with ``tmd_sampling.json`` for ``python -m tmd_train.sample``.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .engine.cli import StageArgs, announce, check_run_paths, parse_stage_args
from .engine.distributed import finish_process_group
from .engine.trainer import fit
from .errors import run_main
from .methods import Stage2Config, build_method

#: The no-argument run (the toy world): small enough for a few minutes on CPU.
TOY_STAGE2: dict[str, Any] = dict(
    method="tmd", outer_steps=2, inner_steps=2, head_blocks=1, synthetic_samples=4096, batch_size=4, steps=200,
    lr=1e-4, disc_width=64, disc_groups=16, ema_decay=0.95, checkpoint_every=100, log_every=10, sample_every=50,
    output_dir="runs/stage2-toy")


def toy_values() -> dict[str, Any]:
    """The toy world's values of this stage (:func:`tmd_train.toy.toy_defaults` with :data:`TOY_STAGE2`), the
    base of a run without ``--config`` and without a ``teacher`` override. Raises FileNotFoundError
    (saying what to pass) without the toy teacher."""
    from .toy import toy_defaults
    return toy_defaults(**TOY_STAGE2)


def parse_args(argv: Sequence[str] | None = None) -> StageArgs:
    """The command line (:func:`tmd_train.engine.cli.parse_stage_args`); raises UserError."""
    return parse_stage_args("stage2", Stage2Config, toy_values, __doc__.split("\n\n")[0], argv,
                            usage="[init_student=<stage-1 student>] [method=tmd|dmd2v] ")


def main(argv: Sequence[str] | None = None) -> int:
    """Train; user errors raise :class:`~tmd_train.errors.UserError` (``python -m`` prints one line)."""
    args = parse_args(argv)
    cfg = args.config
    announce("stage2", args)
    check_run_paths(cfg, args.resume)
    method = build_method(cfg)
    final = fit(method, args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    if method.is_main:
        print(f"stage2 ({cfg.method}): {method.summary()}; student written to {final}")
    finish_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
