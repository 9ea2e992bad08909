"""Model scoring CLI: ``python -m tmd_train.evaluate <benchmark> --model DIR [options]``.

Benchmarks (subcommands):

* ``tinybench`` — a toy-world model folder (the shipped toy teacher, or a stage-1/stage-2 student trained
  from it: a TMD student folder or a DMD2-v transformer folder with ``tmd_sampling.json``) on TinyBench
  (:mod:`tmd_train.toy.tinybench`, docs/design.md §4.5). ``--n`` prompts of the world (``--seed``) are
  sampled the way ``python -m tmd_train.sample`` samples the folder (the teacher: 50 Euler steps with CFG 5;
  a student: its ``tmd_sampling.json``, else M = N = 2), from noise drawn from ``--seed``, ``--batch-size``
  clips at a time, and scored against ``--n-ref`` real clips of the same prompts. Prints the toy demo's
  table row (steps, NFE, semantic, FD, temporal FD, quality, total, sampling time) and writes the scores
  as JSON to ``--out``. The same seed, batch size and options give the same numbers.

::

    python -m tmd_train.evaluate tinybench --model tmd_train/toy/assets/toy_teacher --n 48 --out report.json
    python -m tmd_train.evaluate tinybench --model runs/stage2/student

A user error prints one line ``error: …`` and exits with status 2 (``--debug``: traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ArgumentParser, OutputError, UserError, run_main
from .sample import DTYPES, check_steps, encode_toy, inspect_model, load_model, sample_model
from .toy import TOY_CLIP_SHAPE, toy_config_mismatch
from .toy.clips import WorldConfig, sample_prompts
from .toy.demo import Row, table
from .toy.evaluator import load_evaluator
from .toy.tinybench import tinybench

TINYBENCH_N = 48  # the toy demo's number of evaluation prompts
TINYBENCH_N_REF = 256  # and of reference clips, so scores compare with its table


def add_tinybench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tinybench", help="score a toy-world model folder on TinyBench",
                       description="Sample a toy-world model folder for --n world prompts and score the clips "
                                   "on TinyBench.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="toy teacher, TMD student or DMD2-v student folder (trained on the toy world)")
    p.add_argument("--n", type=int, default=TINYBENCH_N, help="clips to sample and score (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the noise")
    p.add_argument("--p-two", type=float, default=0.0, help="probability of a two-object prompt")
    p.add_argument("--n-ref", type=int, default=TINYBENCH_N_REF, help="real reference clips (>= 2)")
    p.add_argument("--batch-size", type=int, default=64, help="clips sampled at a time")
    p.add_argument("--steps", type=int, default=None,
                   help="outer steps M of a student / Euler steps of the teacher (default: as the sampling CLI)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner flow-head steps N of a TMD student")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of the teacher (default 5)")
    p.add_argument("--evaluator", default=None, help="evaluator weights (default: the shipped ones)")
    p.add_argument("--out", default=None, help="write the scores here as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's dtype")
    p.set_defaults(command=run_tinybench)


def run_tinybench(args: argparse.Namespace) -> dict:
    """Sample, score, print the table row; returns the report (also written to ``--out``)."""
    for name, value, low in (("--n", args.n, 2), ("--n-ref", args.n_ref, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if not 0.0 <= args.p_two <= 1.0:
        raise UserError(f"--p-two must be in [0, 1], got {args.p_two}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    folder = inspect_model(args.model)
    mismatch = toy_config_mismatch(folder.transformer_config)
    if mismatch is not None:
        raise UserError(f"--model {folder.path}: TinyBench scores models of the toy world, and this one is not "
                        f"({mismatch})")
    check_steps(folder.kind, args.steps, args.inner_steps, args.cfg)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise OutputError(f"--out {out} is a folder; name a .json file")
    evaluator = None
    if args.evaluator:
        try:
            evaluator = load_evaluator(args.evaluator)
        except (OSError, ValueError) as e:
            raise UserError(f"--evaluator {args.evaluator}: {e}") from e

    prompts = sample_prompts(args.n, args.seed, WorldConfig(p_two=args.p_two))
    text, negative = encode_toy(prompts)
    dtype = DTYPES[args.dtype]
    model = load_model(folder, dtype, args.device)
    generator = torch.Generator().manual_seed(args.seed)
    chunks, nfe, seconds, label, steps = [], [], 0.0, "", ""
    for start in range(0, args.n, args.batch_size):
        batch = text[start:start + args.batch_size]
        t0 = time.perf_counter()
        result, label, steps = sample_model(model, folder.kind, folder.settings, batch.to(dtype),
                                            shape=(batch.shape[0], *TOY_CLIP_SHAPE), generator=generator,
                                            negative=negative.to(dtype), steps=args.steps,
                                            inner_steps=args.inner_steps, cfg=args.cfg)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        chunks.append(result.x0.float().cpu())
        nfe.append(result.nfe)
    clips = torch.cat(chunks)
    if not torch.isfinite(clips).all():
        raise UserError(f"--model {folder.path}: the {label} sampled non-finite values ({steps} steps)")
    scores = tinybench(clips.clamp(-1, 1), prompts, n_ref=args.n_ref, evaluator=evaluator)
    row = Row(label, folder.kind, steps, sum(nfe) / len(nfe), scores, seconds)
    print(table([row], args.n))
    report = {"benchmark": "tinybench", "model": str(folder.path), "kind": folder.kind, "name": label,
              "steps": steps, "nfe": row.nfe, "seconds": round(seconds, 3), "seed": args.seed, "n_ref": args.n_ref,
              "batch_size": args.batch_size, **scores}
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write the report ({e.strerror or e})") from e
        print(f"scores -> {out}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tmd_train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    add_tinybench(sub)
    return p


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    args.command(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors print ``error: …`` and return 2 (see :func:`tmd_train.errors.run_main`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
