"""One TM-MeanFlow training step (forward + backward, fixed batch and draws) with three ways of
getting the target's total derivative du/ds, plus the plain-TM step as the floor:

* ``fused``  — tmd: ONE no-grad head pass over the 2B' rows with r != s (``tm_meanflow``'s path)
* ``jvp``    — exact ``torch.func.jvp`` through the head over all B rows, the primal ``u`` kept
               for backward (py-meanflow style; math SDPA, pure-PyTorch fusion ops: the custom ops
               have no forward-mode AD)
* ``naive``  — two separate no-grad head passes (s+δ, s-δ) over all B rows, no row selection
* ``tm``     — no derivative at all (r = s on every row): the cost floor

All four share the backbone pass with gradients, the no-grad unconditional pass of the default
guidance (``cfg_source="student"``: the student's own r = s prediction with the negative prompt,
a second backbone pass) and the loss op; the derivative is taken along the guided velocity v_g.
Time: median wall ms; memory: peak bytes allocated during the step (CUDA:
``max_memory_allocated``; CPU: torch profiler allocation events); ratios are provider / fused.
The FD pass's share of a step is ``(fused - tm) / fused``.

Then the accuracy of the FD derivative at δ = 5e-3 (along v_g) against the exact float64 JVP, per-sample
relative error ‖FD - exact‖/‖exact‖ (median and max over rows), on the same student in float32,
under bf16 autocast (``fd_autocast=True``), and the default mixed-precision path (bf16 backbone
features, FD pass at float32 weights), for the default head time embedding (ω_max = 10 rad/unit)
and for ω_max = 4.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
from common import RESULTS, device_name, parser, sync, time_ms

import tmd_ext
from tmd_train.models import TMDStudent, load_teacher
from tmd_train.objectives.tm_meanflow import (
    TMMeanFlowConfig,
    cfg_target,
    exact_total_derivative,
    fd_head_pass,
    fd_times,
    sample_inner_times,
    sample_outer_time,
    select_features,
    unconditional_velocity,
)

PROVIDERS = ("fused", "jvp", "naive", "tm")


def wan_config(dim_heads: int, head_dim: int, layers: int, text_dim: int) -> dict:
    return {"patch_size": (1, 2, 2), "num_attention_heads": dim_heads, "attention_head_dim": head_dim,
            "in_channels": 16, "out_channels": 16, "text_dim": text_dim, "freq_dim": 256,
            "ffn_dim": 4 * dim_heads * head_dim, "num_layers": layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}


def build(config: dict, head_blocks: int, device: str, seed: int = 0, **student_options):
    """A random teacher and a student whose zero-initialised layers are made non-zero."""
    torch.manual_seed(seed)
    teacher = load_teacher(config).to(device)
    student = TMDStudent.from_teacher(teacher, head_blocks=head_blocks, **student_options).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.startswith(("fusion.", "time_embed_s.", "time_embed_delta.")):
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    teacher.requires_grad_(False)
    return teacher, student


def draws(batch: int, latent: tuple[int, ...], text_len: int, text_dim: int, cfg: TMMeanFlowConfig,
          device: str, seed: int = 0) -> dict:
    """The step's fixed inputs and random draws (shared by every provider)."""
    g = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    x = torch.randn(batch, *latent, generator=g)
    text = torch.randn(batch, text_len, text_dim, generator=g)
    neg = torch.randn(batch, text_len, text_dim, generator=g)
    t = sample_outer_time(batch, cfg.outer_steps, cfg.outer_shift, cfg.t_max, g, cpu)
    x1, y1 = torch.randn_like(x), torch.randn_like(x)
    s, r = sample_inner_times(batch, cfg, g, cpu)
    def per(a: torch.Tensor) -> torch.Tensor:
        return a.float().view(-1, 1, 1, 1, 1)
    y = x1 - x
    d = {"x_t": (1 - per(t)) * x + per(t) * x1, "t": t, "text": text, "neg": neg, "y1": y1,
         "y_s": (1 - per(s)) * y + per(s) * y1, "v_in": y1 - y, "s": s, "r": r}
    return {k: v.to(device) for k, v in d.items()}


def loss_from_derivative(u, du, v_g, s, r, c):
    """The TM-MF loss from an exact derivative, through the same op: ``u ± δ·du`` at ``s ± δ``
    make its difference quotient equal ``du`` (rows with r = s ignore it)."""
    delta = 5e-3
    u_d = u.detach()
    return tmd_ext.meanflow_fd_loss(u, u_d + delta * du, u_d - delta * du, v_g, s, r, s + delta, s - delta, c)


def step(provider: str, student: TMDStudent, teacher, d: dict, cfg: TMMeanFlowConfig) -> None:
    """Forward + backward of one TM-MF step with the given derivative provider."""
    s, r = d["s"], d["r"]
    feats = student.backbone(d["x_t"], d["t"], d["text"])
    u_unc = unconditional_velocity(student, teacher, cfg.cfg_source, d["x_t"], d["t"], d["neg"], d["y_s"], s, d["y1"])
    v_g = cfg_target(d["v_in"], u_unc.to(d["v_in"].dtype), cfg.cfg_scale)
    c = float(d["y1"][0].numel())
    sp, sm = fd_times(s, cfg.delta)
    if provider == "jvp":
        u, du = exact_total_derivative(student, feats, d["y_s"], v_g, d["y1"], s, r)
        loss, _ = loss_from_derivative(u, du.detach(), v_g, s, r, c)
    else:
        r_used = s if provider == "tm" else r
        u = student.velocity(d["y_s"], s, r_used, feats, d["y1"])
        u_plus, u_minus = torch.zeros_like(u), torch.zeros_like(u)
        fp32 = torch.autocast(u.device.type, enabled=False)   # the FD passes run at the weights' precision
        if provider == "fused":
            rows = (r != s).nonzero().squeeze(1)
            pick = [z.index_select(0, rows) for z in (d["y_s"], v_g, d["y1"], s, r, sp, sm)]
            with fp32:
                up, um = fd_head_pass(student, select_features(feats, rows, dtype=student.dtype), *pick)
            u_plus.index_copy_(0, rows, up)
            u_minus.index_copy_(0, rows, um)
        elif provider == "naive":
            with torch.no_grad(), fp32:
                fixed = select_features(feats, torch.arange(u.shape[0], device=u.device), dtype=student.dtype)
                u_plus = student.velocity(d["y_s"] + (sp - s).float().view(-1, 1, 1, 1, 1) * v_g, sp, r,
                                          fixed, d["y1"])
                u_minus = student.velocity(d["y_s"] + (sm - s).float().view(-1, 1, 1, 1, 1) * v_g, sm, r,
                                           fixed, d["y1"])
        loss, _ = tmd_ext.meanflow_fd_loss(u, u_plus, u_minus, v_g, s, r_used, sp, sm, c)
    loss.mean().backward()
    student.zero_grad(set_to_none=True)


def interleaved_ms(runs: dict, device: str, reps: int) -> dict[str, list[float]]:
    """Wall ms of every provider, round-robin (so load changes on a shared machine hit all of
    them alike); one warm-up round first."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(time_ms(fn, device, reps=1, warmup=0))
    return times


def cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of allocations minus frees recorded by the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        if e.name == "[memory]":
            events.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage:
            events.append((e.time_range.start, e.self_cpu_memory_usage))
    cur = peak = 0
    for _, delta in sorted(events):
        cur += delta
        peak = max(peak, cur)
    return peak


def peak_bytes(fn, device: str) -> int:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(fn)


# ---------------------------------------------------------------------------- accuracy
def fd_errors(config: dict, head_blocks: int, batch: int, latent, text_len: int, cfg: TMMeanFlowConfig,
              **student_options) -> dict[str, tuple[float, float]]:
    """Relative error of the FD derivative (along the guided v_g) vs the exact float64 JVP at the same
    features."""
    cpu = "cpu"
    _, student = build(config, head_blocks, cpu, **student_options)
    d = draws(batch, latent, text_len, config["text_dim"], dataclasses.replace(cfg, equal_fraction=0.0), cpu, seed=3)
    s, r = d["s"], d["r"]
    u_unc = unconditional_velocity(student, None, "student", d["x_t"], d["t"], d["neg"], d["y_s"], s, d["y1"])
    v_g = cfg_target(d["v_in"], u_unc, cfg.cfg_scale)
    sp, sm = fd_times(s, cfg.delta)
    out = {}
    s64 = copy.deepcopy(student).double()

    def exact(feats32):
        feats = dataclasses.replace(feats32, m=feats32.m.double(), temb=feats32.temb.double(),
                                    timestep_proj=feats32.timestep_proj.double(), text=feats32.text.double())
        with torch.no_grad():
            _, du = exact_total_derivative(s64, feats, d["y_s"].double(), v_g.double(), d["y1"].double(), s, r)
        return du

    def rel(fd, du):
        e = (fd.double() - du).flatten(1).norm(dim=1) / du.flatten(1).norm(dim=1)
        return statistics.median(e.tolist()), max(e.tolist())

    den = (sp - sm).float().view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        feats = student.backbone(d["x_t"], d["t"], d["text"])
        up, um = fd_head_pass(student, feats, d["y_s"], v_g, d["y1"], s, r, sp, sm)
        out["float32"] = rel((up - um) / den, exact(feats))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats_bf = student.backbone(d["x_t"], d["t"], d["text"])
            up, um = fd_head_pass(student, feats_bf, d["y_s"], v_g, d["y1"], s, r, sp, sm)
        du_bf = exact(select_features(feats_bf, torch.arange(batch), dtype=torch.float32))
        out["bf16 autocast (fd_autocast=True)"] = rel((up.float() - um.float()) / den, du_bf)
        with torch.autocast("cpu", enabled=False):
            f32 = select_features(feats_bf, torch.arange(batch), dtype=torch.float32)
            up, um = fd_head_pass(student, f32, d["y_s"], v_g, d["y1"], s, r, sp, sm)
        out["bf16 features, FD at fp32 (default)"] = rel((up - um) / den, du_bf)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args()
    dev = args.device
    small = args.small or dev == "cpu"
    if small:   # CPU: a small Wan (D = 128, 6 blocks, H = 2), latents [16, 3, 16, 16] -> 192 tokens
        config, H, latent, text_len, batch = wan_config(4, 32, 6, 64), 2, (16, 3, 16, 16), 16, args.batch or 8
    else:       # GPU: Wan2.1-1.3B widths (D = 1536, 30 blocks, H = 5), latents [16, 5, 30, 52]
        config, H, latent, text_len, batch = wan_config(12, 128, 30, 4096), 5, (16, 5, 30, 52), 512, args.batch or 8
    cfg = TMMeanFlowConfig()
    teacher, student = build(config, H, dev)
    d = draws(batch, latent, text_len, config["text_dim"], cfg, dev)
    n_fd = int((d["r"] != d["s"]).sum())
    reps = args.reps or (7 if dev == "cpu" else 20)
    runs = {}
    for provider in PROVIDERS:
        ctx = contextlib.nullcontext() if dev == "cpu" else torch.autocast("cuda", dtype=torch.bfloat16)

        def run(provider=provider, ctx=ctx):
            with ctx:
                step(provider, student, teacher, d, cfg)
            sync(dev)
        runs[provider] = run
    times = interleaved_ms(runs, dev, reps)
    rows = []
    for provider, run in runs.items():
        t = times[provider]
        rows.append({"provider": provider, "ms_min": min(t), "ms_median": statistics.median(t),
                     "peak_mb": peak_bytes(run, dev) / 2**20})
    fused = rows[0]
    for row in rows:
        row["time_vs_fused"] = row["ms_min"] / fused["ms_min"]
        row["mem_vs_fused"] = row["peak_mb"] / fused["peak_mb"]

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    print(f"\nTM-MF training step (fwd+bwd) on {device_name(dev)}; D={dim}, L={config['num_layers']}, H={H}, "
          f"latents {batch}x{'x'.join(map(str, latent))}, B'={n_fd} rows with r!=s; {reps} interleaved reps")
    hdr = f"{'provider':<8} {'min ms':>10} {'median ms':>10} {'peak MB':>10} {'time/fused':>11} {'mem/fused':>10}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        print(f"{row['provider']:<8} {row['ms_min']:>10.1f} {row['ms_median']:>10.1f} {row['peak_mb']:>10.1f} "
              f"{row['time_vs_fused']:>11.2f} {row['mem_vs_fused']:>10.2f}")
    tm_row = next(row for row in rows if row["provider"] == "tm")
    fd_share = 1 - tm_row["ms_min"] / fused["ms_min"]
    print(f"FD pass ({2 * n_fd} head rows on top of {batch}): {100 * fd_share:.1f}% of the fused step (min ms)")

    tiny = wan_config(2, 16, 4, 32)
    errors = {}
    for label, opts in (("time_max_freq=4 (default)", {}), ("time_max_freq=10", {"time_max_freq": 10.0})):
        errors[label] = fd_errors(tiny, 2, 4, (16, 1, 8, 8), 8, cfg, **opts)
    print("\nFD (δ = 5e-3) vs exact float64 JVP, relative error per sample (median / max), tiny Wan D=32 L=4 H=2")
    for label, errs in errors.items():
        for precision, (med, mx) in errs.items():
            print(f"  {label:<27} {precision:<38} {med:.2e} / {mx:.2e}")
    sys.stdout.flush()
    if args.save:
        import datetime as dt
        now = dt.datetime.now(dt.timezone.utc)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"tm_mf-{'cuda' if dev.startswith('cuda') else 'cpu'}-{now:%Y%m%d}.json"
        Path(path).write_text(json.dumps({
            "bench": "tm_mf", "device": device_name(dev), "torch": torch.__version__,
            "date": now.isoformat(timespec="seconds"), "build_info": tmd_ext.build_info(),
            "config": {"wan": config, "head_blocks": H, "batch": batch, "latent": list(latent), "rows_fd": n_fd},
            "rows": rows, "fd_share_of_step": fd_share,
            "fd_errors": {k: {p: {"median": m, "max": x} for p, (m, x) in v.items()} for k, v in errors.items()},
        }, indent=1))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
