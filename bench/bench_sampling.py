"""Sampling benchmark: the teacher (50 Euler steps with CFG, 100 NFE) vs the TMD student N2H5
at M=2 (effective NFE 2.33 with L=30), its inner flow run by the eager Python loop
(``sample_tmd``) and by ``tmd_ext.FlowHeadLoop`` (``sample_tmd_looped``; a captured CUDA graph
of the head step on CUDA, an eager C++ loop on CPU), on a random Wan2.1-architecture model
with L=30 blocks (small width so it runs on a CPU).

Table: wall time per sample (median; on CPU also the process CPU time, steadier on a shared
machine), measured NFE, realised speedup over the teacher (wall-time ratio; "cpu spd" the CPU-time
ratio), NFE-ideal speedup (NFE ratio) and realised/ideal.
"""
from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
import warnings

import torch
from common import RESULTS, device_name, parser, time_ms

import tmd_ext
from tmd_train import TMDStudent, load_teacher, sample_teacher, sample_tmd, shifted_grid
from tmd_train.sampling import LoopedInnerFlow, sample_tmd_looped

# Wan2.1 block structure with L=30 (as 1.3B) at a CPU-friendly width; --small shrinks the latents.
CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 16,
    "out_channels": 16, "text_dim": 128, "freq_dim": 64, "ffn_dim": 256, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 256,
}
TEXT_LEN = 32


def cpu_times(fn, reps: int) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of ``fn`` (the CPU time is the steadier number on
    a shared machine: it does not count time spent waiting for a core)."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--M", type=int, default=2)
    p.add_argument("--N", type=int, default=2)
    p.add_argument("--H", type=int, default=5)
    args = p.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    latent = (1, 16, 3, 8, 8) if args.small else (1, 16, 3, 16, 16)
    if dev.startswith("cuda") and not args.small:
        latent = (1, 16, 21, 60, 104)  # Wan 480p / 81 frames
    torch.manual_seed(0)
    teacher = load_teacher(CONFIG, torch_dtype=dtype, device=dev)
    student = TMDStudent.from_teacher(teacher, head_blocks=args.H).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, TEXT_LEN, CONFIG["text_dim"], generator=g).to(dev)
    negative = torch.randn(1, TEXT_LEN, CONFIG["text_dim"], generator=g).to(dev)
    inner = LoopedInnerFlow(student, shifted_grid(args.N, 10.0, 0.999, device=dev))
    tmd_kw = {"shape": latent, "M": args.M, "N": args.N}

    def teacher_run():
        return sample_teacher(teacher, text, negative_text=negative, shape=latent,
                              generator=torch.Generator().manual_seed(0), steps=args.teacher_steps, cfg=5.0)

    def tmd_eager():
        return sample_tmd(student, text, generator=torch.Generator().manual_seed(0), **tmd_kw)

    def tmd_loop():
        return sample_tmd_looped(student, text, generator=torch.Generator().manual_seed(0), inner=inner, **tmd_kw)

    providers = {
        f"teacher {args.teacher_steps} steps x CFG": teacher_run,
        f"TMD N{args.N}H{args.H} M={args.M} eager inner loop": tmd_eager,
        f"TMD N{args.N}H{args.H} M={args.M} FlowHeadLoop": tmd_loop,
    }
    reps = args.reps or (3 if dev == "cpu" else 10)
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, fn in providers.items():
            nfe = fn().nfe  # also the warm-up (and the graph capture of FlowHeadLoop)
            n = 1 if "teacher" in name and dev == "cpu" else reps
            if dev == "cpu":
                ms, cpu_ms = cpu_times(fn, n)
            else:
                ms, cpu_ms = time_ms(fn, dev, reps=n, warmup=0), None
            rows.append({"provider": name, "ms": ms, "cpu_ms": cpu_ms, "nfe": nfe})
    graph = bool(inner.loop and inner.loop.uses_graph and inner.loop.captured)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["ms"] / r["ms"]
        r["cpu_speedup"] = base["cpu_ms"] / r["cpu_ms"] if r["cpu_ms"] else None
        r["ideal_speedup"] = base["nfe"] / r["nfe"]
        r["realised_of_ideal"] = r["speedup"] / r["ideal_speedup"]

    print(f"\nsampling on {device_name(dev)}, {dtype}, latent {list(latent)}, L={CONFIG['num_layers']}, "
          f"D={CONFIG['num_attention_heads'] * CONFIG['attention_head_dim']}; FlowHeadLoop CUDA graph: {graph}")
    hdr = (f"{'provider':<36} {'wall ms':>10} {'cpu ms':>10} {'NFE':>8} {'speedup':>8} {'cpu spd':>8} "
           f"{'NFE-ideal':>9} {'realised':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cpu = f"{r['cpu_ms']:>10.1f}" if r["cpu_ms"] else f"{'-':>10}"
        cspd = f"{r['cpu_speedup']:>8.1f}" if r["cpu_speedup"] else f"{'-':>8}"
        print(f"{r['provider']:<36} {r['ms']:>10.1f} {cpu} {r['nfe']:>8.3f} {r['speedup']:>8.1f} {cspd} "
              f"{r['ideal_speedup']:>9.1f} {r['realised_of_ideal']:>8.2f}")
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        path = RESULTS / f"sampling-{'cuda' if dev.startswith('cuda') else 'cpu'}-{now:%Y%m%d}.json"
        path.write_text(json.dumps({
            "bench": "sampling", "device": device_name(dev), "torch": torch.__version__,
            "date": now.isoformat(timespec="seconds"), "build_info": tmd_ext.build_info(),
            "dtype": str(dtype), "latent": list(latent), "config": {k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in CONFIG.items()},
            "flow_head_loop_graph": graph, "rows": rows,
        }, indent=1))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
