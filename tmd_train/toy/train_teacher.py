"""Train the toy world's teacher: a tiny pixel-space ``WanTransformer3DModel`` (see
:mod:`tmd_train.toy`) on the moving-shapes clips, with rectified flow matching.

    python -m tmd_train.toy.train_teacher --out runs/toy_teacher [--steps 1200] [--threads 2]

``--out`` is required. Writing the shipped teacher (``tmd_train/toy/assets/toy_teacher``, what every
toy run uses) also needs ``--replace-shipped``; an ``--out`` that already holds a model needs
``--resume`` (continue its checkpoint) or ``--overwrite``. These are checked before training starts.

Training (the defaults; every choice is a flag):

* data: fresh clips of world seed ``TRAIN_SEED = 3`` (clip indices ``step·B … step·B+B-1``, never
  repeated; TinyBench's references use other seeds), prompts through the toy text encoder, the empty
  prompt with probability ``cond_dropout = 0.1`` (so classifier-free guidance works);
* flow matching with the convention of the whole project: ``x_t = (1-t)·x + t·ε``, target
  ``v = ε - x``, MSE; ``t = sigmoid(N(0, 1))`` (logit-normal, as SD3) — the middle of the path,
  where the content is decided, gets the most samples;
* AdamW (lr 1e-3, β 0.9/0.99, weight decay 0.01), 100 warm-up steps then cosine to 5 % of the lr,
  gradient clipping at 1, batch 24, torch seed 0; an EMA of the weights (decay 0.995) is what is saved.

The output folder is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
float32) plus ``training.json`` (the command's arguments, steps, loss curve summary, wall time).
Checkpoints (``<out>.ckpt/state.pt``, written atomically every ``--checkpoint-every`` steps) make
``--resume`` continue a killed run exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from tqdm.auto import tqdm

from ..errors import ArgumentParser, OutputError, check_output_dir, run_main
from ..files import normalize_permissions
from ..models.teacher import load_teacher, teacher_velocity
from . import TOY_CLIP_SHAPE, TOY_TEACHER_CONFIG, TOY_TEACHER_DIR, text_encoder
from .clips import WorldConfig, make_batch

TRAIN_SEED = 3


def lr_factor(step: int, steps: int, warmup: int, final: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``final``."""
    if step <= warmup:
        return step / max(warmup, 1)
    p = (step - warmup) / max(steps - warmup, 1)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def training_batch(step: int, batch_size: int, cond_dropout: float, gen: torch.Generator,
                   world: WorldConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clips [B, 3, 8, 32, 32], text [B, 12, 32])`` of step ``step`` (clips ``step·B…``), each
    prompt replaced by the empty one with probability ``cond_dropout`` (drawn from ``gen``)."""
    clips, prompts, _ = make_batch(batch_size, TRAIN_SEED, world, start=step * batch_size)
    drop = torch.rand(batch_size, generator=gen) < cond_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
    text, _ = text_encoder.encode(prompts)
    return clips, text


def flow_matching_loss(model: WanTransformer3DModel, x: torch.Tensor, text: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss ``mean((v(x_t, t) - (ε - x))²)``, ``t = sigmoid(N(0,1))``."""
    t = torch.sigmoid(torch.randn(x.shape[0], generator=gen))
    eps = torch.randn(x.shape, generator=gen)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * eps
    v = teacher_velocity(model, x_t, t, text)
    return torch.nn.functional.mse_loss(v, eps - x)


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out: Path, steps: int = 1200, batch_size: int = 24, lr: float = 1e-3, warmup: int = 100,
          ema_decay: float = 0.995, cond_dropout: float = 0.1, seed: int = 0, checkpoint_every: int = 250,
          resume: bool = False, log_every: int = 50, stop_after: int | None = None) -> dict | None:
    """Train and write the teacher folder ``out``; returns the training record.

    ``stop_after``: leave after that many steps of this invocation with a checkpoint written (for
    time-limited jobs; continue with ``resume=True``) and return None; the run is the same as an
    uninterrupted one."""
    torch.manual_seed(seed)
    model = load_teacher(dict(TOY_TEACHER_CONFIG), torch_dtype=torch.float32).train()
    ema = load_teacher(dict(TOY_TEACHER_CONFIG), torch_dtype=torch.float32).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    ckpt_dir = out.with_name(out.name + ".ckpt")
    ckpt = ckpt_dir / "state.pt"
    start, history, elapsed = 0, [], 0.0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, history, elapsed = state["step"], state["history"], state["elapsed"]
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    t0 = time.time() - elapsed
    running = []
    bar = tqdm(total=steps, initial=start, desc="teacher")
    for step in range(start + 1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        x, text = training_batch(step - 1, batch_size, cond_dropout, gen)
        loss = flow_matching_loss(model, x, text, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - d)
        running.append(loss.item())
        bar.update(1)
        if step % log_every == 0 or step == steps:
            mean = sum(running) / len(running)
            history.append([step, round(mean, 5)])
            bar.set_postfix(loss=f"{mean:.4f}")
            running = []
        stopping = stop_after is not None and step - start >= stop_after and step < steps
        if (step % checkpoint_every == 0 and step < steps) or stopping:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                          "gen": gen.get_state(), "step": step, "history": history,
                          "elapsed": time.time() - t0}, ckpt)
        if stopping:
            bar.close()
            return None
    bar.close()
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "ema_decay": ema_decay,
              "cond_dropout": cond_dropout, "seed": seed, "train_seed": TRAIN_SEED,
              "clip_shape": list(TOY_CLIP_SHAPE), "wall_s": round(time.time() - t0, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "loss_history": history}
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    normalize_permissions(out)
    return record


def check_out(out: Path, *, replace_shipped: bool, overwrite: bool, resume: bool) -> None:
    """OutputError unless the teacher may be written to ``out`` (module docstring)."""
    check_output_dir(out, "--out")
    if out.resolve() == TOY_TEACHER_DIR.resolve() and not replace_shipped:
        raise OutputError(f"--out {out} is the shipped toy teacher that every toy run uses; pass --replace-shipped "
                          "to retrain it there, or another --out")
    if (out / "config.json").is_file() and not (resume or overwrite):
        raise OutputError(f"--out {out} already holds a model; pass --resume to continue its checkpoint, "
                          "--overwrite to replace it, or another --out")


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m tmd_train.toy.train_teacher", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output model folder (the shipped one needs --replace-shipped)")
    ap.add_argument("--replace-shipped", action="store_true",
                    help=f"allow --out to be the shipped toy teacher ({TOY_TEACHER_DIR})")
    ap.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50, help="steps per entry of the loss history")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.ckpt/state.pt if present")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="leave after this many steps with a checkpoint (continue later with --resume)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = ap.parse_args(argv)
    check_out(Path(args.out), replace_shipped=args.replace_shipped, overwrite=args.overwrite, resume=args.resume)
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and 0 <= args.ema_decay < 1 and 0 <= args.cond_dropout < 1):
        ap.error("need --lr > 0, 0 <= --ema-decay < 1, 0 <= --cond-dropout < 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = train(Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                   ema_decay=args.ema_decay, cond_dropout=args.cond_dropout, seed=args.seed,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, stop_after=args.stop_after,
                   log_every=args.log_every)
    if record is None:
        print(f"teacher: stopped after {args.stop_after} steps; continue with --resume")
        return 0
    print(f"teacher: {args.steps} steps in {record['wall_s']} s, final loss {record['loss_history'][-1][1]}; "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
