"""The TinyBench evaluator: a small 3D CNN trained on the moving-shapes world's ground truth.

It reads clips ``[B, 3, 8, 32, 32]`` in [-1, 1] and predicts the shape (3 classes), colour (4) and
direction (4) of the (first) object; its penultimate activation ``[B, feature_dim]`` is the feature
space of TinyBench's Fréchet distance (:mod:`tmd_train.toy.tinybench`).

Architecture (default sizes)::

    Conv3d(3→16,  k=(1,3,3), s=1)       → GN → SiLU                  [16, 8, 32, 32]
    Conv3d(16→32, k=(1,3,3), s=(1,2,2)) → GN → SiLU                  [32, 8, 16, 16]
    Conv3d(32→48, k=3, s=2)             → GN → SiLU                  [48, 4,  8,  8]
    Conv3d(48→64, k=3, s=2)             → GN → SiLU                  [64, 2,  4,  4]
    [mean, max] over (F, H, W) → Linear(128→64) → SiLU = features    [64]
    heads: Linear(64→3), Linear(64→4), Linear(64→4)

Training (``python -m tmd_train.toy.evaluator --train --out tmd_train/toy/assets/evaluator.safetensors
--replace-shipped --overwrite``)
draws fresh single-object clips every step from world seed :data:`TRAIN_SEED` (no clip is seen
twice), with light augmentation so the evaluator also reads imperfect generations: with probability
0.5 Gaussian noise of std ``U[0, 0.2]``, with probability 0.3 a 3×3 spatial box blur. Accuracy is
measured on held-out clips of seed :data:`VAL_SEED`. The weights ship in ``tmd_train/toy/assets/`` with
their config, seed, step count and accuracy in the safetensors metadata.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ArgumentParser, MissingFileError, OutputError, check_output_dir, run_main
from . import ASSETS
from .clips import ATTRIBUTE_NAMES, ATTRIBUTES, WorldConfig, make_batch

ASSET_PATH = ASSETS / "evaluator.safetensors"
TRAIN_SEED = 1
VAL_SEED = 2
NUM_CLASSES: tuple[int, ...] = tuple(len(a) for a in ATTRIBUTES)


@dataclass(frozen=True)
class EvaluatorConfig:
    """Sizes of :class:`ClipEvaluator`."""

    channels: tuple[int, int, int, int] = (16, 32, 48, 64)
    feature_dim: int = 64
    groups: int = 4


class ClipEvaluator(nn.Module):
    """3D CNN over ``[B, 3, F, H, W]`` clips → attribute logits and a feature vector."""

    def __init__(self, config: EvaluatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or EvaluatorConfig()
        self.record: dict = {}
        c0, c1, c2, c3 = self.config.channels
        g = self.config.groups

        def conv(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Module:
            pad = tuple(k // 2 for k in kernel)
            return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad), nn.GroupNorm(g, cout),
                                 nn.SiLU())

        self.convs = nn.Sequential(
            conv(3, c0, (1, 3, 3), (1, 1, 1)),
            conv(c0, c1, (1, 3, 3), (1, 2, 2)),
            conv(c1, c2, (3, 3, 3), (2, 2, 2)),
            conv(c2, c3, (3, 3, 3), (2, 2, 2)),
        )
        self.proj = nn.Linear(2 * c3, self.config.feature_dim)
        self.heads = nn.ModuleList(nn.Linear(self.config.feature_dim, k) for k in NUM_CLASSES)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of clips ``[B, 3, F, H, W]``."""
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"ClipEvaluator: clips must be [B, 3, F, H, W], got {tuple(clips.shape)}")
        h = self.convs(clips).flatten(2)
        return F.silu(self.proj(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)))

    def forward(self, clips: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([shape [B, 3], colour [B, 4], direction [B, 4]] logits, features [B, feature_dim])``."""
        feats = self.features(clips)
        return [head(feats) for head in self.heads], feats

    @torch.no_grad()
    def predict(self, clips: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels [B, 3] long, features [B, feature_dim] float32)`` in eval mode, batched."""
        labels, feats = [], []
        for s in range(0, clips.shape[0], batch_size):
            logits, f = self(clips[s:s + batch_size].to(torch.float32))
            labels.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1))
            feats.append(f)
        return torch.cat(labels), torch.cat(feats)


def augment(clips: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Training augmentation of ``[B, 3, F, H, W]``: noise (p=0.5, std U[0, 0.2]), box blur (p=0.3)."""
    b = clips.shape[0]
    shape = (b, 1, 1, 1, 1)
    use_noise = (torch.rand(shape, generator=g) < 0.5).float()
    std = torch.rand(shape, generator=g) * 0.2
    noise = torch.randn(clips.shape, generator=g)
    use_blur = (torch.rand(shape, generator=g) < 0.3).float()
    blurred = F.avg_pool3d(clips, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    out = clips + use_blur * (blurred - clips)
    return out + use_noise * std * noise


@torch.no_grad()
def accuracy(model: ClipEvaluator, clips: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute and mean accuracy of ``model`` on ``clips [N, 3, F, H, W]`` with ``labels [N, 3]``."""
    was_training = model.training
    model.eval()
    pred, _ = model.predict(clips)
    model.train(was_training)
    acc = {name: float((pred[:, i] == labels[:, i]).float().mean()) for i, name in enumerate(ATTRIBUTE_NAMES)}
    acc["mean"] = sum(acc.values()) / len(ATTRIBUTE_NAMES)
    return acc


def train(steps: int = 500, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, n_val: int = 1024,
          config: EvaluatorConfig | None = None, log_every: int = 50) -> tuple[ClipEvaluator, dict]:
    """Train an evaluator from scratch on fresh world clips (AdamW, cosine LR, cross-entropy summed
    over the three attributes). Returns the model (eval mode) and a record of the run."""
    torch.manual_seed(seed)
    model = ClipEvaluator(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    world = WorldConfig(p_two=0.0)
    start = time.time()
    model.train()
    for step in range(steps):
        clips, _, labels = make_batch(batch_size, TRAIN_SEED, world, start=step * batch_size)
        logits, _ = model(augment(clips, g))
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    model.eval()
    val_clips, _, val_labels = make_batch(n_val, VAL_SEED, world)
    acc = accuracy(model, val_clips, val_labels)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_seed": TRAIN_SEED,
              "val_seed": VAL_SEED, "n_val": n_val, "val_accuracy": acc, "train_seconds": round(time.time() - start, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    return model, record


def save_evaluator(model: ClipEvaluator, path: str | Path, record: dict | None = None) -> None:
    """Save weights (float32) with ``config`` and the training ``record`` as JSON metadata."""
    meta = {"config": json.dumps(asdict(model.config)), "record": json.dumps(record or {})}
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_evaluator(path: str | Path | None = None) -> ClipEvaluator:
    """Load an evaluator (default: the shipped ``tmd_train/toy/assets/evaluator.safetensors``), eval mode, CPU."""
    path = Path(path) if path is not None else ASSET_PATH
    if not path.is_file():
        raise FileNotFoundError(f"evaluator weights {path} not found (train them with "
                                f"`python -m tmd_train.toy.evaluator --train --out {path}`)")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in meta:
        raise ValueError(f"{path} is not an evaluator checkpoint (no 'config' metadata)")
    cfg = json.loads(meta["config"])
    cfg["channels"] = tuple(cfg["channels"])
    model = ClipEvaluator(EvaluatorConfig(**cfg))
    model.load_state_dict(state)
    model.record = json.loads(meta.get("record", "{}"))
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def default_evaluator() -> ClipEvaluator:
    """The shipped evaluator, loaded once per process."""
    return load_evaluator()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--train --out PATH`` trains and saves; ``--check [--weights PATH]`` reports held-out accuracy.
    Writing the shipped weights needs ``--replace-shipped``, replacing any other file ``--overwrite``."""
    ap = ArgumentParser(prog="python -m tmd_train.toy.evaluator", description="TinyBench evaluator of the "
                        "moving-shapes world")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train from scratch and save to --out")
    mode.add_argument("--check", action="store_true", help="held-out accuracy of --weights")
    ap.add_argument("--out", default=None, help="weights file to write (--train; the shipped one needs "
                                                "--replace-shipped)")
    ap.add_argument("--replace-shipped", action="store_true", help=f"allow --out to be {ASSET_PATH}")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ap.add_argument("--weights", default=None, help="weights for --check (default: the shipped ones)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-val", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "n_val"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train:
        if args.out is None:
            ap.error("--train needs --out PATH (the weights file to write)")
        out = Path(args.out)
        if out.exists() and out.is_dir():
            raise OutputError(f"--out {out} is a folder; pass a file path (e.g. {out / 'evaluator.safetensors'})")
        check_output_dir(out.parent, "--out")
        if out.resolve() == ASSET_PATH.resolve() and not args.replace_shipped:
            raise OutputError(f"--out {out} is the shipped evaluator TinyBench scores with; pass --replace-shipped "
                              "(and --overwrite) to retrain it there, or another --out")
        if out.exists() and not args.overwrite:
            raise OutputError(f"--out {out} already exists; pass --overwrite to replace it, or another --out")
    if args.check and args.weights is not None and not Path(args.weights).is_file():
        raise MissingFileError(f"--weights {args.weights}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        model, record = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              n_val=args.n_val)
        save_evaluator(model, args.out, record)
        print(json.dumps(record, indent=1))
        print(f"saved {args.out}")
    else:
        model = load_evaluator(args.weights)
        clips, _, labels = make_batch(args.n_val, VAL_SEED, WorldConfig(p_two=0.0))
        print(json.dumps(accuracy(model, clips, labels), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
