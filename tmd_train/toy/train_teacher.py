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
  ``v = ε - x``, MSE; ``t = sigmoid(N(0, 1))`` (logit-normal, as SD3; ``--t-mean`` moves its centre) —
  the middle of the path, where the content is decided, gets the most samples;
* AdamW (lr 1e-3, β 0.9/0.99, weight decay 0.01), 100 warm-up steps then cosine to 5 % of the lr
  (``--schedule constant``: flat after the warm-up), gradient clipping at 1, batch 24, torch seed 0; an EMA
  of the weights (decay 0.995) is what is saved. ``--init-from DIR`` continues training a model folder.

The output folder is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
float32) plus ``training.json`` (the command's arguments, steps, loss curve summary, wall time).
Checkpoints (``<out>.ckpt/state.pt``, written atomically every ``--checkpoint-every`` steps: model, EMA,
optimizer, RNG states, step = data position, recipe, the commands so far) make ``--resume`` continue a killed
run bit-exactly; ``--stop-after N`` / ``--time-limit S`` leave early with a checkpoint (for time-limited jobs),
``--snapshot-every K`` keeps the EMA of every K steps in ``<out>.ckpt/snapshots/step_N`` (learning curves).
With ``--schedule constant`` a resumed run may raise ``--steps``: nothing depends on it. ``--export DIR`` writes
the EMA of the latest checkpoint (with its record) to a model folder, e.g. the shipped one, without training.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from tqdm.auto import tqdm

from ..errors import ArgumentParser, ConfigError, DataError, MissingFileError, OutputError, check_output_dir, run_main
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
                       gen: torch.Generator, t_mean: float = 0.0) -> torch.Tensor:
    """Rectified-flow loss ``mean((v(x_t, t) - (ε - x))²)``, ``t = sigmoid(N(t_mean, 1))``."""
    t = torch.sigmoid(torch.randn(x.shape[0], generator=gen) + t_mean)
    eps = torch.randn(x.shape, generator=gen)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * eps
    v = teacher_velocity(model, x_t, t, text)
    return torch.nn.functional.mse_loss(v, eps - x)


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


#: Settings that define a run: a checkpoint only resumes with the same values (``steps`` may change with the
#: constant schedule, which does not depend on it; with the cosine one a change is recorded).
RECIPE_KEYS = ("batch_size", "lr", "warmup", "ema_decay", "cond_dropout", "seed", "schedule", "init_from", "t_mean")
#: What a checkpoint written before a recipe key existed ran with.
_RECIPE_DEFAULTS = {"schedule": "cosine", "init_from": None, "t_mean": 0.0}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _init_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a toy-teacher folder to start from and the SHA-256 of its safetensors file."""
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise MissingFileError(f"--init-from {folder}: not a model folder (config.json + *.safetensors)")
    model = load_teacher(folder, torch_dtype=torch.float32)
    mismatch = {k: (model.config.get(k), v) for k, v in TOY_TEACHER_CONFIG.items()
                if k in model.config and _norm(model.config.get(k)) != _norm(v)}
    if mismatch:
        raise ConfigError(f"--init-from {folder}: its config differs from the toy teacher's in "
                          f"{sorted(mismatch)}")
    return model.state_dict(), _file_sha256(files[0])


def _norm(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def ema_decay_at(step: int, ema_decay: float) -> float:
    """EMA decay at ``step``: ``min(ema_decay, (1 + step) / (10 + step))`` (a short memory at the start)."""
    return min(ema_decay, (1 + step) / (10 + step))


def train(out: Path, steps: int = 1200, batch_size: int = 24, lr: float = 1e-3, warmup: int = 100,
          ema_decay: float = 0.995, cond_dropout: float = 0.1, seed: int = 0, checkpoint_every: int = 250,
          resume: bool = False, log_every: int = 50, stop_after: int | None = None, schedule: str = "cosine",
          init_from: Path | None = None, snapshot_every: int | None = None,
          command: str | None = None, time_limit: float | None = None, t_mean: float = 0.0) -> dict | None:
    """Train and write the teacher folder ``out``; returns the training record.

    ``schedule``: ``"cosine"`` (warm-up, then cosine to 5 % at ``steps``) or ``"constant"`` (warm-up, then
    flat: the run does not depend on ``steps``, so a resumed run may be extended with a larger ``steps``
    and equals one planned that long). ``init_from``: a toy-teacher folder whose weights start the model and
    its EMA (continued training; its SHA-256 is recorded). ``t_mean``: location of the logit-normal ``t``
    (> 0 puts more samples at high noise, where the prompt decides the content). ``snapshot_every``: also
    keep the EMA weights of every that many steps as model folders ``<out>.ckpt/snapshots/step_NNNNNN``
    (for learning curves).

    The checkpoint ``<out>.ckpt/state.pt`` (written atomically every ``checkpoint_every`` steps) holds the
    model, EMA, optimizer, the data/noise generator and torch's global RNG state, the step (the data
    position: step ``k`` trains on clips ``k·B … k·B+B-1``), the loss history, the recipe and the commands
    so far; ``resume=True`` continues it bit-exactly (a different recipe is refused).

    ``stop_after``: leave after that many steps of this invocation with a checkpoint written (for
    time-limited jobs; continue with ``resume=True``) and return None; the run is the same as an
    uninterrupted one. ``time_limit``: the same after that many seconds of this invocation (at a step
    boundary)."""
    began = time.time()
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"--schedule must be 'cosine' or 'constant', got {schedule!r}")
    recipe = {"batch_size": batch_size, "lr": lr, "warmup": warmup, "ema_decay": ema_decay,
              "cond_dropout": cond_dropout, "seed": seed, "schedule": schedule,
              "init_from": str(init_from) if init_from is not None else None, "t_mean": t_mean}
    ckpt_dir = out.with_name(out.name + ".ckpt")
    ckpt = ckpt_dir / "state.pt"
    state = None
    if resume and ckpt.is_file():
        try:
            state = torch.load(ckpt, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user-facing error
            raise DataError(f"{ckpt}: cannot read the checkpoint ({e}); remove it to start over") from e
        old = state.get("recipe")
        if old is not None:
            old = {**_RECIPE_DEFAULTS, **old}
            diff = [k for k in RECIPE_KEYS if _norm(old.get(k)) != _norm(recipe[k])]
            if diff:
                raise ConfigError(f"--resume: {ckpt} was trained with "
                                  + ", ".join(f"{k}={old.get(k)!r}" for k in diff) + "; this command has "
                                  + ", ".join(f"{k}={recipe[k]!r}" for k in diff) + " (pass the same values)")
        if state["step"] > steps:
            raise ConfigError(f"--resume: {ckpt} is at step {state['step']}, beyond --steps {steps}")
    torch.manual_seed(seed)
    model = load_teacher(dict(TOY_TEACHER_CONFIG), torch_dtype=torch.float32).train()
    ema = load_teacher(dict(TOY_TEACHER_CONFIG), torch_dtype=torch.float32).eval().requires_grad_(False)
    init_sha = None
    if init_from is not None and state is None:  # a resumed run has its weights in the checkpoint
        weights, init_sha = _init_weights(init_from)
        model.load_state_dict(weights)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start, history, elapsed, commands, planned = 0, [], 0.0, [], [steps]
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        start, history, elapsed = state["step"], state["history"], state["elapsed"]
        commands = list(state.get("commands", []))
        planned = list(state.get("planned_steps", []))
        if planned[-1:] != [steps]:
            planned.append(steps)
        init_sha = state.get("init_sha256", init_sha)
    if command:
        commands.append(command)
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    t0 = time.time() - elapsed
    running = []
    bar = tqdm(total=steps, initial=start, desc="teacher")

    def save_checkpoint(step: int) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                      "history": history, "elapsed": time.time() - t0, "recipe": recipe, "commands": commands,
                      "planned_steps": planned, "init_sha256": init_sha}, ckpt)

    for step in range(start + 1, steps + 1):
        factor = lr_factor(step, steps, warmup) if schedule == "cosine" else min(1.0, step / max(warmup, 1))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        x, text = training_batch(step - 1, batch_size, cond_dropout, gen)
        loss = flow_matching_loss(model, x, text, gen, t_mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_decay_at(step, ema_decay))
        running.append(loss.item())
        bar.update(1)
        if step % log_every == 0 or step == steps:
            mean = sum(running) / len(running)
            history.append([step, round(mean, 5)])
            bar.set_postfix(loss=f"{mean:.4f}")
            running = []
        stopping = step < steps and ((stop_after is not None and step - start >= stop_after)
                                     or (time_limit is not None and time.time() - began >= time_limit))
        if snapshot_every and (step % snapshot_every == 0 or stopping):
            snap = ckpt_dir / "snapshots" / f"step_{step:06d}"
            tmp = snap.with_name(snap.name + ".tmp")
            ema.save_pretrained(tmp, safe_serialization=True)
            if snap.exists():
                shutil.rmtree(snap)
            os.replace(tmp, snap)
        if (step % checkpoint_every == 0 and step < steps) or stopping:
            save_checkpoint(step)
        if stopping:
            bar.close()
            return None
    bar.close()
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "schedule": schedule,
              "t_mean": t_mean, "ema_decay": ema_decay, "cond_dropout": cond_dropout, "seed": seed,
              "train_seed": TRAIN_SEED,
              "init_from": recipe["init_from"], "init_sha256": init_sha,
              "clip_shape": list(TOY_CLIP_SHAPE), "wall_s": round(time.time() - t0, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "loss_history": history,
              "planned_steps": planned, "commands": commands}
    _write_model(out, ema, record)
    return record


def _write_model(folder: Path, ema: WanTransformer3DModel, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(folder, safe_serialization=True)
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    normalize_permissions(folder)


def export(out: Path, dest: Path) -> dict:
    """Write the EMA weights of the run ``out``'s checkpoint (``<out>.ckpt/state.pt``) to the model folder
    ``dest`` with the training record so far (``steps`` = the checkpoint's step); returns the record."""
    ckpt = out.with_name(out.name + ".ckpt") / "state.pt"
    if not ckpt.is_file():
        raise MissingFileError(f"--export: no checkpoint {ckpt} (a run with --out {out} writes it)")
    try:
        state = torch.load(ckpt, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user-facing error
        raise DataError(f"{ckpt}: cannot read the checkpoint ({e})") from e
    ema = load_teacher(dict(TOY_TEACHER_CONFIG), torch_dtype=torch.float32).eval()
    ema.load_state_dict(state["ema"])
    record = {"steps": state["step"], **{**_RECIPE_DEFAULTS, **state.get("recipe", {})}, "train_seed": TRAIN_SEED,
              "init_sha256": state.get("init_sha256"), "clip_shape": list(TOY_CLIP_SHAPE),
              "wall_s": round(state["elapsed"], 1), "torch": torch.__version__, "loss_history": state["history"],
              "planned_steps": state.get("planned_steps"), "commands": state.get("commands"),
              "exported_from": f"{ckpt} at step {state['step']}"}
    _write_model(dest, ema, record)
    return record


def check_out(out: Path, *, replace_shipped: bool, overwrite: bool, resume: bool, flag: str = "--out") -> None:
    """OutputError unless the teacher may be written to ``out`` (module docstring); ``flag`` names it."""
    check_output_dir(out, flag)
    if out.resolve() == TOY_TEACHER_DIR.resolve() and not replace_shipped:
        raise OutputError(f"{flag} {out} is the shipped toy teacher that every toy run uses; pass --replace-shipped "
                          f"to write it there, or another {flag}")
    if (out / "config.json").is_file() and not (resume or overwrite):
        raise OutputError(f"{flag} {out} already holds a model; pass "
                          + ("--resume to continue its checkpoint, " if flag == "--out" else "")
                          + f"--overwrite to replace it, or another {flag}")


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
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                    help="lr after warm-up: cosine to 5%% at --steps, or constant (extendable on --resume)")
    ap.add_argument("--t-mean", type=float, default=0.0, help="location of the logit-normal t (default 0)")
    ap.add_argument("--init-from", default=None, help="start model and EMA from this toy-teacher folder")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--snapshot-every", type=int, default=None,
                    help="also keep the EMA weights every this many steps in <out>.ckpt/snapshots/step_N")
    ap.add_argument("--log-every", type=int, default=50, help="steps per entry of the loss history")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.ckpt/state.pt if present")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="leave after this many steps with a checkpoint (continue later with --resume)")
    ap.add_argument("--export", metavar="DIR", default=None,
                    help="train nothing: write the EMA of --out's checkpoint to the model folder DIR (the shipped "
                         "one needs --replace-shipped)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="leave after this many seconds with a checkpoint (continue later with --resume)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = ap.parse_args(argv)
    if args.export:
        check_out(Path(args.export), replace_shipped=args.replace_shipped, overwrite=args.overwrite, resume=False,
                  flag="--export")
        record = export(Path(args.out), Path(args.export))
        print(f"teacher: the EMA of step {record['steps']} written to {args.export}")
        return 0
    check_out(Path(args.out), replace_shipped=args.replace_shipped, overwrite=args.overwrite, resume=args.resume)
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "snapshot_every"):
        if name == "snapshot_every" and args.snapshot_every is None:
            continue
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and 0 <= args.ema_decay < 1 and 0 <= args.cond_dropout < 1):
        ap.error("need --lr > 0, 0 <= --ema-decay < 1, 0 <= --cond-dropout < 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = train(Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                   ema_decay=args.ema_decay, cond_dropout=args.cond_dropout, seed=args.seed,
                   checkpoint_every=args.checkpoint_every, resume=args.resume, stop_after=args.stop_after,
                   log_every=args.log_every, schedule=args.schedule, snapshot_every=args.snapshot_every,
                   init_from=Path(args.init_from) if args.init_from else None, time_limit=args.time_limit,
                   t_mean=args.t_mean,
                   command=shlex.join(["python", "-m", "tmd_train.toy.train_teacher",
                                       *(sys.argv[1:] if argv is None else argv)]))
    if record is None:
        print("teacher: stopped with a checkpoint; continue with --resume")
        return 0
    print(f"teacher: {args.steps} steps in {record['wall_s']} s, final loss {record['loss_history'][-1][1]}; "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
