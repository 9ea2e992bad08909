"""Stage-2 costs: seconds per iteration of the trainer, and the price of unrolling the flow head.

1. Iterations (``Distillation.dmd_step`` of the stage-2 methods on a fixed batch, both methods): a generator iteration
   (generator update + fake score + discriminator) and a critic-only iteration (generator sample
   without grad + fake score + discriminator). Median wall seconds.
2. Generator forward + backward (``x̂`` and the gradient of ``<x̂, g>`` w.r.t. every generator
   parameter, g fixed): ``plain`` = the teacher-architecture student (one L-block pass, the DMD2-v
   generator: the unit "1 student fwd+bwd"), ``tmd unroll`` = TMD N steps with gradients through
   all of them, ``tmd unroll+ckpt`` = the same with per-step activation checkpointing,
   ``tmd last-step`` = ``unroll=False`` (only the last inner step differentiated).
   The TMD costs are reported as extra over ``plain``; the goal (paper: 17% for N2H5, L=30) is
   ``extra < (N-1)·H/L`` of a plain fwd+bwd — the extra blocks' share of the FLOPs.

    python bench/bench_stage2.py [--small] [--save] [--reps R]

``--small``: the tests' tiny model (L=4, D=16, 4 tokens); default: L=10, D=64, H=2 (so
(N-1)·H/L = 20% for N=2, close to the paper's 17%), latents [16, 3, 16, 16] = 192 tokens, batch 2.
"""
from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

import torch
from common import RESULTS, device_name, parser, time_ms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tmd_train.engine.config import config_from_dict  # noqa: E402
from tmd_train.methods import Stage2Config, build_method  # noqa: E402
from tmd_train.methods.distill import Distillation  # noqa: E402


def model_config(small: bool) -> tuple[dict, int, list[int], int, int]:
    """``(teacher config, H, latent (F, H, W), text_len, batch)``."""
    if small:
        from support.tiny import TINY_CONFIG
        return {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}, 2, [1, 4, 4], 3, 2
    cfg = {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 16,
           "out_channels": 16, "text_dim": 64, "freq_dim": 64, "ffn_dim": 256, "num_layers": 10,
           "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 256}
    return cfg, 2, [3, 16, 16], 16, 2


def trainer_for(method: str, small: bool, out: Path, **over) -> Distillation:
    teacher, H, latent, text_len, batch = model_config(small)
    values = dict(teacher=teacher, method=method, head_blocks=H, synthetic_samples=16, synthetic_latent_size=latent,
                  synthetic_text_len=text_len, batch_size=batch, steps=10, disc_width=16 if small else 64,
                  disc_groups=8 if small else 32, output_dir=str(out), seed=0, mixed_precision="no")
    values.update(over)
    return build_method(config_from_dict(Stage2Config, values))


def iteration_times(small: bool, device: str, reps: int, out: Path) -> list[dict]:
    rows = []
    for method in ("tmd", "dmd2v"):
        trainer = trainer_for(method, small, out / method)
        batch = next(trainer.batches(1))
        for kind, step in (("generator iteration", 5), ("critic-only iteration", 1)):
            assert trainer.is_generator_step(step) == (kind == "generator iteration")
            ms = time_ms(lambda step=step: trainer.dmd_step(step, batch), device, reps=reps, warmup=2)
            rows.append({"case": f"{method} {kind}", "s_per_iter": ms / 1e3})
    return rows


def generator_fwd_bwd(small: bool, device: str, reps: int, out: Path) -> tuple[list[dict], float]:
    """The four generator fwd+bwd cases, timed interleaved (one call of each per round, median
    over rounds) so that drifting machine load hits them alike."""
    import statistics
    import time

    _, H, _, _, _ = model_config(small)
    cases = [("plain (1 student fwd+bwd)", "dmd2v", {}), ("tmd N=2 unroll", "tmd", {"unroll": True}),
             ("tmd N=2 unroll+ckpt", "tmd", {"unroll": True, "unroll_checkpoint": True}),
             ("tmd N=2 last-step", "tmd", {"unroll": False})]
    runs, L = [], None
    for name, method, over in cases:
        trainer = trainer_for(method, small, out / name.replace(" ", "_"), inner_steps=2, **over)
        L = trainer.teacher_config["num_layers"]
        batch = next(trainer.batches(1))
        g = torch.Generator().manual_seed(0)
        t, x1, y1 = trainer.generator_draws(batch["latents"], g)
        grad_out = torch.randn(batch["latents"].shape, generator=g)
        params = [p for p in trainer.gen_model.parameters() if p.requires_grad]

        def run(trainer=trainer, batch=batch, t=t, x1=x1, y1=y1, grad_out=grad_out, params=params) -> None:
            x_hat = trainer.gen_model(batch["latents"], x1, t, batch["text"], y1)
            torch.autograd.grad(x_hat, params, grad_out, allow_unused=True)

        runs.append(run)
    times: list[list[float]] = [[] for _ in cases]
    for rnd in range(reps + 2):
        for k, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            if rnd >= 2:  # two warm-up rounds
                times[k].append((time.perf_counter() - t0) * 1e3)
    rows = [{"case": name, "ms": statistics.median(ts)} for (name, _, _), ts in zip(cases, times, strict=True)]
    base = rows[0]["ms"]
    for r in rows:
        r["extra_vs_plain"] = r["ms"] / base - 1
    return rows, (2 - 1) * H / L


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()
    device = args.device
    torch.set_num_threads(args.threads)
    if device != "cpu":
        print("note: the trainer picks its own device (CUDA when available)")
    reps = args.reps or 5
    out = Path("/tmp") / "bench_stage2"
    it_rows = iteration_times(args.small, device, reps, out)
    gen_rows, bound = generator_fwd_bwd(args.small, device, reps, out)
    size = "tiny (tests: L=4, D=16, 4 tokens, B=2)" if args.small else "small (L=10, D=64, 192 tokens, B=2)"
    print(f"\nstage 2 on {device_name(device)}, {size}, fp32")
    print(f"{'iteration':<34} {'s/iter':>8}")
    for r in it_rows:
        print(f"{r['case']:<34} {r['s_per_iter']:>8.4f}")
    print(f"\n{'generator fwd+bwd':<34} {'ms':>9} {'extra vs plain':>15}")
    for r in gen_rows:
        print(f"{r['case']:<34} {r['ms']:>9.2f} {100 * r['extra_vs_plain']:>14.1f}%")
    unroll, last = gen_rows[1]["ms"], gen_rows[3]["ms"]
    print(f"unrolling itself (unroll - last-step): {100 * (unroll - last) / gen_rows[0]['ms']:.1f}% of a plain "
          f"fwd+bwd; goal: TMD extra < (N-1)·H/L = {100 * bound:.1f}%")
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc)
        tag = "cuda" if device.startswith("cuda") else "cpu"
        path = RESULTS / f"stage2{'-small' if args.small else ''}-{tag}-{now:%Y%m%d}.json"
        path.write_text(json.dumps({"bench": "stage2", "device": device_name(device), "torch": torch.__version__,
                                    "date": now.isoformat(timespec="seconds"), "size": size,
                                    "iterations": it_rows, "generator_fwd_bwd": gen_rows, "goal": bound}, indent=1))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
