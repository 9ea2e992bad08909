"""Teacher ODE pairs for the stage-2 KD warm-up (M = 1): ``noise → teacher sample``.

    python -m tmd_train.kd_pairs --teacher DIR|toy --data shapes|synthetic|FOLDER --n N --out DIR
                                 [--steps 50 --cfg 5 --shift 5 --t-max 0.999 --seed 0 --batch-size 8
                                  --shard-size 256 --precision auto]
    torchrun --nproc_per_node G -m tmd_train.kd_pairs ...        # G processes share the pairs

For pair ``i`` (the prompts of the data source, cycled): ``noise ~ N(0, I)`` (generator seeded by
``(seed, i)``, rounded to the storage dtype) and ``target = sample_teacher(teacher, text, noise=noise,
steps, cfg, shift, t_max)`` — flow-matching Euler from ``t = t_max`` with CFG against the data's
negative-prompt embedding. ``t_max`` defaults to the student's (0.999): the KD step feeds the same noise
to the student as ``x`` at its ``t_max``, so the teacher's ODE must start there too. Written as a ``"kd"``
dataset (docs/design.md §5: ``noise``, ``target`` ``[n, C, F, H, W]``, ``text_emb``, ``text_mask``, the
negative embedding), which ``python -m tmd_train.stage2 kd_pairs=DIR kd_steps=K outer_steps=1`` reads.
The latent shape is the data's (``--latent-size`` for ``synthetic``).

At scale: the teacher runs in bfloat16 under autocast on GPUs (``--precision``); under ``torchrun`` the
processes share the shards (each pair depends on its index only, so the pairs are the same for any number
of processes); shards are written atomically and a killed run restarted with the same command redoes only
the unfinished shards (docs/design.md §5.6). A teacher-synthesised dataset (``python -m tmd_train.prepare
synthetic``) stores its start noise and serves as KD pairs directly, without this second teacher pass.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .data.format import FLOAT_DTYPES
from .data.sources import masked_text, open_source
from .engine.cli import BUILTIN_DATA, ArgumentParser, check_dataset, check_output_dir, check_teacher_folder
from .engine.seeding import derive_seed
from .errors import MissingFileError, OutputError, UserError, check_device, run_main
from .models.teacher import load_teacher
from .prepare import runner
from .prepare.common import autocast, pick_precision
from .sampling import sample_teacher

#: The student's first time (the KD step treats the stored noise as x at t_max); docs/design.md §1.7.
STUDENT_T_MAX = 0.999


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tmd_train.kd_pairs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="Wan2.1 diffusers / transformer folder, or 'toy' (shipped)")
    p.add_argument("--data", required=True, help="prompt source: 'shapes', 'synthetic' or a latents dataset folder")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True,
                   help="output dataset folder (must not exist, or hold an unfinished run of the same command)")
    p.add_argument("--steps", type=int, default=50, help="teacher Euler steps")
    p.add_argument("--cfg", type=float, default=5.0, help="teacher guidance scale")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the teacher grid")
    p.add_argument("--t-max", type=float, default=STUDENT_T_MAX,
                   help="first time of the teacher ODE: the student's t_max, which takes the noise as x there")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the synthetic/shapes data)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per teacher batch")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--data-samples", type=int, default=None,
                   help="size of a shapes/synthetic source (default: --n)")
    p.add_argument("--latent-size", type=int, nargs=3, default=(3, 8, 8), metavar=("F", "H", "W"),
                   help="latent (F, H, W) of data=synthetic")
    p.add_argument("--text-len", type=int, default=8, help="text length of data=synthetic")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="teacher compute dtype (auto: bf16 under autocast on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda:LOCAL_RANK with a GPU, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return p


def pair_noise(seed: int, i: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The noise of pair ``i``: N(0, I) float32 seeded by ``(seed, i)``, rounded to the storage ``dtype``
    (the teacher starts from exactly what is stored)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "kd", i))
    return torch.randn(tuple(shape), generator=g).to(dtype).float()


class PairWorker:
    """The teacher ODE of a batch of pair indices (the runner's worker)."""

    def __init__(self, teacher: torch.nn.Module, source, negative: tuple[torch.Tensor, torch.Tensor], *,
                 steps: int, cfg: float, shift: float, t_max: float, seed: int, storage: torch.dtype,
                 compute: torch.dtype = torch.float32) -> None:
        self.teacher, self.source, self._negative = teacher, source, negative
        self.device = teacher.patch_embedding.weight.device
        self.neg_text = masked_text(negative[0].float(), negative[1])[None].to(self.device)
        self.steps, self.cfg, self.shift, self.t_max, self.seed = steps, cfg, shift, t_max, seed
        self.storage, self.compute = storage, compute

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._negative[0].float(), self._negative[1]

    @torch.no_grad()
    def process(self, idx: Sequence[int]) -> list[runner.Item]:
        items = [self.source[i % len(self.source)] for i in idx]
        emb = torch.stack([it["text_emb"] for it in items]).float()
        mask = torch.stack([it["text_mask"] for it in items])
        shape = tuple(items[0]["latents"].shape)
        noise = torch.stack([pair_noise(self.seed, i, shape, self.storage) for i in idx])
        with autocast(self.device, self.compute):
            target = sample_teacher(self.teacher, masked_text(emb, mask).to(self.device), negative_text=self.neg_text,
                                    noise=noise.to(self.device), steps=self.steps, cfg=self.cfg, shift=self.shift,
                                    t_max=self.t_max).x0
        target = target.float().cpu()
        return [runner.Item(i, str(it.get("prompt", f"sample {i % len(self.source)}")),
                            {"noise": noise[j], "target": target[j], "text_emb": emb[j], "text_mask": mask[j]})
                for j, (i, it) in enumerate(zip(idx, items, strict=True))]


def make_pairs(teacher: torch.nn.Module, source, negative: tuple[torch.Tensor, torch.Tensor], out: Path, n: int, *,
               steps: int, cfg: float, shift: float, seed: int, batch_size: int, shard_size: int,
               t_max: float = STUDENT_T_MAX, dtype: torch.dtype = torch.float32, compute: torch.dtype = torch.float32,
               teacher_config: dict | None = None, settings: dict | None = None, progress: bool = True) -> dict:
    """Write ``n`` pairs (module docstring) from ``source`` items into the ``kd`` dataset ``out`` (this
    process's share under torchrun; resumes an unfinished ``out``). Returns the runner's summary."""
    meta = {"kind": "teacher ODE pairs", "steps": steps, "cfg": cfg, "shift": shift, "t_max": t_max, "seed": seed}
    plan = runner.Plan(out=Path(out), kind="kd", num_items=n, shard_size=shard_size, batch_size=batch_size,
                       dtype=dtype, settings=dict(settings or {}, **meta, n=n, batch_size=batch_size,
                                                  shard_size=shard_size, dtype=str(dtype)),
                       teacher_config=teacher_config, metadata=meta)
    worker = PairWorker(teacher, source, negative, steps=steps, cfg=cfg, shift=shift, t_max=t_max, seed=seed,
                        storage=dtype, compute=compute)
    return runner.run(plan, lambda: worker, progress=progress, desc="kd pairs")


def main(argv: Sequence[str] | None = None) -> int:
    """Write the pairs; user errors raise :class:`~tmd_train.errors.UserError` before the teacher loads."""
    args = build_parser().parse_args(argv)
    for name in ("n", "steps", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data_samples is not None and args.data_samples < 1:
        raise UserError(f"--data-samples must be >= 1, got {args.data_samples}")
    if not 0.0 < args.t_max <= 1.0:
        raise UserError(f"--t-max must be in (0, 1], got {args.t_max}")
    out = Path(args.out)
    if out.exists() and not (out / runner.STATE_DIR / runner.SETTINGS_FILE).is_file():
        raise OutputError(f"--out {args.out} already exists; pass a new folder (nothing is overwritten; a folder "
                          "of an unfinished run of this command is resumed)")
    check_output_dir(args.out, "--out")
    rank, world, local_rank = runner.dist_env()
    device = check_device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    compute = pick_precision(args.precision, device)
    if args.teacher == "toy":
        from .toy import require_toy_teacher
        try:
            teacher_path = require_toy_teacher()
        except FileNotFoundError as e:
            raise MissingFileError(f"--teacher toy: {e}") from None
    else:
        check_teacher_folder(args.teacher, "--teacher")
        teacher_path = Path(args.teacher)
    if args.data not in BUILTIN_DATA:
        check_dataset(args.data, "--data", "latents")
    teacher = load_teacher(teacher_path, torch_dtype=compute, device=device).requires_grad_(False)
    tcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in teacher.config.items() if not k.startswith("_")}
    source, negative = open_source(args.data, teacher_config=tcfg, synthetic_samples=args.data_samples or args.n,
                                   synthetic_latent_size=args.latent_size, synthetic_text_len=args.text_len,
                                   seed=args.seed)
    settings = {"teacher": str(teacher_path.resolve()), "data": args.data, "data_samples": args.data_samples,
                "latent_size": list(args.latent_size), "text_len": args.text_len, "precision": str(compute)}
    summary = make_pairs(teacher, source, negative, out, args.n, steps=args.steps, cfg=args.cfg, shift=args.shift,
                         t_max=args.t_max, seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
                         dtype=FLOAT_DTYPES[args.dtype], compute=compute, teacher_config=tcfg, settings=settings,
                         progress=not args.no_progress)
    if rank == 0:
        print(f"kd_pairs: {summary['num_samples']} pairs ({args.steps} steps, cfg {args.cfg}, from t_max "
              f"{args.t_max:g}) written to {out}" + ("" if world == 1 else f" by {world} processes"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
