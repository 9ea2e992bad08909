"""Teacher ODE pairs for the stage-2 KD warm-up (M = 1): ``noise → teacher sample``.

    python -m tmd_train.kd_pairs --teacher DIR|toy --data shapes|synthetic|FOLDER --n N --out DIR
                                 [--steps 50 --cfg 5 --shift 5 --seed 0 --batch-size 8 --shard-size 256]

For sample ``i`` (the prompts of the data source, cycled): ``noise ~ N(0, I)`` (generator seeded
by ``(seed, i)``) and ``target = sample_teacher(teacher, text, noise=noise, steps, cfg, shift)`` —
flow-matching Euler from ``t = 1`` with CFG against the data's negative-prompt embedding. Written
as a ``"kd"`` dataset (docs/design.md §5: ``noise``, ``target`` ``[n, C, F, H, W]``, ``text_emb``,
``text_mask``, the negative embedding), which ``python -m tmd_train.stage2 kd_pairs=DIR kd_steps=K
outer_steps=1`` reads. The latent shape is the data's (``--latent-size`` for ``synthetic``).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.format import DatasetWriter
from .data.sources import masked_text, open_source
from .engine.cli import BUILTIN_DATA, ArgumentParser, check_dataset, check_output_dir, check_teacher_folder
from .engine.seeding import derive_seed
from .errors import MissingFileError, OutputError, UserError, check_device, run_main
from .models.teacher import load_teacher
from .sampling import sample_teacher


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tmd_train.kd_pairs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="Wan2.1 diffusers / transformer folder, or 'toy' (shipped)")
    p.add_argument("--data", required=True, help="prompt source: 'shapes', 'synthetic' or a latents dataset folder")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="output dataset folder (must not exist)")
    p.add_argument("--steps", type=int, default=50, help="teacher Euler steps")
    p.add_argument("--cfg", type=float, default=5.0, help="teacher guidance scale")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift of the teacher grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the synthetic/shapes data)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per teacher batch")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--data-samples", type=int, default=None,
                   help="size of a shapes/synthetic source (default: --n)")
    p.add_argument("--latent-size", type=int, nargs=3, default=(3, 8, 8), metavar=("F", "H", "W"),
                   help="latent (F, H, W) of data=synthetic")
    p.add_argument("--text-len", type=int, default=8, help="text length of data=synthetic")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return p


def make_pairs(teacher: torch.nn.Module, source, negative: tuple[torch.Tensor, torch.Tensor], out: Path, n: int, *,
               steps: int, cfg: float, shift: float, seed: int, batch_size: int, shard_size: int,
               dtype: torch.dtype = torch.float32, teacher_config: dict | None = None,
               progress: bool = True) -> Path:
    """Write ``n`` pairs (module docstring) from ``source`` items into the ``kd`` dataset ``out``."""
    device = teacher.patch_embedding.weight.device
    neg_emb, neg_mask = negative
    neg_text = masked_text(neg_emb.float(), neg_mask)[None].to(device)
    meta = {"kind": "teacher ODE pairs", "steps": steps, "cfg": cfg, "shift": shift, "seed": seed}
    with DatasetWriter(out, kind="kd", shard_size=shard_size, dtype=dtype, teacher_config=teacher_config,
                       metadata=meta) as writer, tqdm(total=n, desc="kd pairs", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            items = [source[i % len(source)] for i in idx]
            emb = torch.stack([it["text_emb"] for it in items]).float()
            mask = torch.stack([it["text_mask"] for it in items])
            shape = tuple(items[0]["latents"].shape)
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, "kd", i)))
                                 for i in idx])
            target = sample_teacher(teacher, masked_text(emb, mask).to(device), negative_text=neg_text,
                                    noise=noise.to(device), steps=steps, cfg=cfg, shift=shift).x0
            prompts = [str(it.get("prompt", f"sample {i % len(source)}")) for i, it in zip(idx, items, strict=True)]
            writer.add_batch(prompts, noise=noise, target=target.cpu(), text_emb=emb, text_mask=mask)
            bar.update(len(idx))
        writer.set_negative(neg_emb.float(), neg_mask)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Write the pairs; user errors raise :class:`~tmd_train.errors.UserError` before the teacher loads."""
    args = build_parser().parse_args(argv)
    for name in ("n", "steps", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data_samples is not None and args.data_samples < 1:
        raise UserError(f"--data-samples must be >= 1, got {args.data_samples}")
    if Path(args.out).exists():
        raise OutputError(f"--out {args.out} already exists; pass a new folder (nothing is overwritten)")
    check_output_dir(args.out, "--out")
    device = check_device(args.device)
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
    teacher = load_teacher(teacher_path, torch_dtype=torch.float32, device=device).requires_grad_(False)
    tcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in teacher.config.items() if not k.startswith("_")}
    source, negative = open_source(args.data, teacher_config=tcfg, synthetic_samples=args.data_samples or args.n,
                                   synthetic_latent_size=args.latent_size, synthetic_text_len=args.text_len,
                                   seed=args.seed)
    out = make_pairs(teacher, source, negative, Path(args.out), args.n, steps=args.steps, cfg=args.cfg,
                     shift=args.shift, seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
                     dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16, teacher_config=tcfg)
    print(f"kd_pairs: {args.n} pairs ({args.steps} steps, cfg {args.cfg}) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
