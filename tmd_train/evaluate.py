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

* ``vbench`` — VBench generation (docs/design.md §8.2) with a TMD student, DMD2-v student, ``TMDPipeline`` or
  Wan folder: the standard prompt suite (or ``--prompts``), ``--seeds`` videos per prompt named
  ``{prompt}-{index}.mp4``, sharded over ``torchrun`` ranks, resumable, every setting in ``settings.json``;
  then the collapse checks and, when ``vbench`` and its weights are installed, VBench's scores
  (``scores.json``, ``scores.md``), else the command to run later.
* ``checks`` — collapse checks of a folder of videos (docs/design.md §8.3): constant, static, duplicated.

::

    python -m tmd_train.evaluate tinybench --model tmd_train/toy/assets/toy_teacher --n 48 --out report.json
    python -m tmd_train.evaluate tinybench --model runs/stage2/student
    torchrun --nproc_per_node 8 -m tmd_train.evaluate vbench --model runs/stage2/student --wan WAN_DIR --out eval/
    python -m tmd_train.evaluate checks --videos eval/

A user error prints one line ``error: …`` and exits with status 2 (``--debug``: traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import ArgumentParser, OutputError, UserError, run_main
from .evaluation import vbench as vb
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


# ------------------------------------------------------------------------------ vbench
def add_vbench(sub: argparse._SubParsersAction) -> None:
    from .models.attention import ATTENTION_BACKENDS

    p = sub.add_parser("vbench", help="generate VBench's prompt suite with a model folder (several processes with "
                                      "torchrun) and score it when vbench is installed",
                       description="Generate --seeds videos per prompt of VBench's standard suite (or --prompts) "
                                   "named {prompt}-{index}.mp4, sharded over torchrun ranks and resumable; record "
                                   "every setting in settings.json; run the collapse checks; score with VBench "
                                   "when it and its weights are installed, else print the command to run later.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="TMD student, DMD2-v student, TMDPipeline or Wan2.1 folder")
    p.add_argument("--out", required=True, help="folder of the videos, settings.json, checks.json and scores")
    p.add_argument("--wan", default=None,
                   help="Wan2.1 diffusers folder supplying the VAE and UMT5 encoder of a student folder")
    p.add_argument("--prompts", default=None,
                   help="prompt file (one per line, or VBench's full-info JSON); default: VBench's standard suite "
                        "(needs the vbench package)")
    p.add_argument("--seeds", type=int, default=vb.NUM_SEEDS, help="videos per prompt (VBench reads 5)")
    p.add_argument("--seed", type=int, default=0, help="video k of every prompt uses seed --seed + k")
    p.add_argument("--steps", type=int, default=None,
                   help="outer steps M of a student / Euler steps of the teacher (default: tmd_sampling.json, 50)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps N of a TMD student")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of the teacher (default 5)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift of the (outer) grid")
    p.add_argument("--inner-shift", type=float, default=None, help="timestep shift of the inner grid (TMD)")
    p.add_argument("--negative-prompt", default="", help="the teacher's negative prompt")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81, help="frames per video (4k+1)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the mp4 files")
    p.add_argument("--max-text-len", type=int, default=512, help="tokens the prompt is padded/truncated to")
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> when CUDA is available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="transformer and text-encoder dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--attention-backend", choices=tuple(ATTENTION_BACKENDS), default="native")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="TMD inner flow through tmd_ext.FlowHeadLoop (default: on with CUDA)")
    p.add_argument("--dimensions", nargs="+", default=list(vb.DIMENSIONS), choices=vb.DIMENSIONS, metavar="DIM",
                   help="VBench dimensions to score")
    p.add_argument("--name", default=None, help="the model's name in the score table (default: the folder name)")
    p.add_argument("--no-score", action="store_true", help="generate and check only")
    p.set_defaults(command=run_vbench)


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _all_ok(ok: bool, world: int) -> bool:
    """Whether every process is ok (an all-reduce over the gloo group; the value itself in one process)."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def vbench_settings(args: argparse.Namespace, pipe, prompts: vb.PromptSet, seeds: list[int], dtype: torch.dtype,
                    loop: bool, model_hash: str | None) -> dict:
    """Every setting that decides the videos (what settings.json records)."""
    import diffusers

    s = pipe.settings(steps=args.steps, inner_steps=args.inner_steps, cfg=args.cfg, shift=args.shift,
                      inner_shift=args.inner_shift)
    out = {"model": str(Path(args.model).resolve()), "model_kind": s.pop("kind"), "model_hash": model_hash}
    out.update({f"sampler_{k}": v for k, v in s.items()})
    out.update({"negative_prompt": args.negative_prompt if out["model_kind"] == "teacher" else None,
                "height": args.height, "width": args.width, "num_frames": args.frames, "fps": args.fps,
                "max_sequence_length": args.max_text_len, "prompt_set": prompts.source,
                "prompt_set_sha256": prompts.sha256, "num_prompts": len(prompts.prompts), "seeds": seeds,
                "seed_rule": "video k of every prompt: noise from torch.Generator().manual_seed(seeds[k]) (CPU)",
                "naming": "{prompt}-{k}.mp4", "dtype": str(dtype).removeprefix("torch."),
                "attention_backend": args.attention_backend, "flow_head_loop": loop,
                "torch_version": torch.__version__, "diffusers_version": diffusers.__version__})
    return out


def run_vbench(args: argparse.Namespace) -> dict:
    """Generate (sharded, resumable), check, score; returns the summary."""
    from .errors import MissingFileError, check_output_dir
    from .evaluation import checks as ck
    from .pipeline import TMDPipeline, model_hash

    rank, world, local_rank = _dist()
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.fps < 1:
        raise UserError(f"--fps must be >= 1, got {args.fps}")
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such folder")
    out = Path(args.out)
    check_output_dir(out, "--out")
    try:
        prompts = vb.load_prompts(args.prompts)
    except FileNotFoundError as e:
        raise MissingFileError(f"--prompts: {e}" if args.prompts else str(e)) from None
    except ValueError as e:
        raise UserError(f"--prompts {args.prompts}: {e}") from None
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        return _vbench(args, rank, world, device, dtype, prompts, out, TMDPipeline, model_hash, ck)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _vbench(args, rank, world, device, dtype, prompts, out, TMDPipeline, model_hash, ck) -> dict:
    try:
        pipe = TMDPipeline.from_pretrained(args.model, wan=args.wan, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {args.model}: {e}") from e
    check_steps(pipe.kind, args.steps, args.inner_steps, args.cfg)
    if pipe.kind != "student" and (args.inner_steps is not None or args.inner_shift is not None):
        raise UserError("--inner-steps and --inner-shift apply to a TMD student only")
    pipe.to(device)
    if args.attention_backend != "native":
        from .models.attention import set_attention_backend

        set_attention_backend(pipe.wan_transformer, args.attention_backend, key="--attention-backend")
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.latent_shape(1, args.frames, args.height, args.width)
    except ValueError as e:
        raise UserError(f"--frames/--height/--width: {e}") from None
    loop = (args.loop if args.loop is not None else device.startswith("cuda")) and pipe.kind == "student"
    seeds = [args.seed + k for k in range(args.seeds)]
    settings = vbench_settings(args, pipe, prompts, seeds, dtype, loop, pipe.model_hash() if rank == 0 else None)
    path = out / vb.SETTINGS_FILE
    conflicts = []
    if path.is_file():
        old = json.loads(path.read_text())
        ignore = ("torch_version", "diffusers_version") + (("model_hash",) if rank else ())
        conflicts = vb.settings_conflicts(old, settings, ignore)
    if not _all_ok(not conflicts, world):
        if conflicts:
            raise OutputError(f"--out {out} holds videos made with other settings ({'; '.join(conflicts)}); pass "
                              "another --out, or the settings recorded in its settings.json")
        raise UserError(f"--out {out}: rank 0 refused the settings (see its error)")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        tmp = out / f".tmp-{vb.SETTINGS_FILE}"
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(tmp, path)
    for stale in out.glob(f".tmp-{rank}-*"):
        stale.unlink()

    jobs = vb.plan(prompts.prompts, seeds)
    mine = vb.shard(jobs, rank, world)
    todo = vb.pending(mine, out)
    if rank == 0:
        print(f"{len(prompts.prompts)} prompts x {len(seeds)} seeds = {len(jobs)} videos over {world} process"
              f"{'es' if world > 1 else ''}; {len(jobs) - len(vb.pending(jobs, out))} already in {out}")
    t0 = time.perf_counter()
    call = {"num_frames": args.frames, "height": args.height, "width": args.width, "outer_steps": args.steps,
            "inner_steps": args.inner_steps, "guidance_scale": args.cfg, "shift": args.shift,
            "inner_shift": args.inner_shift, "max_sequence_length": args.max_text_len, "use_flow_head_loop": loop}
    if pipe.kind == "teacher":
        call["negative_prompt"] = args.negative_prompt
    for job in tqdm(todo, desc=f"rank {rank}" if world > 1 else "videos", unit="video", disable=rank != 0,
                    file=sys.stderr):
        result = pipe(prompt=job.prompt, generator=torch.Generator().manual_seed(job.seed), output_type="np", **call)
        frames = torch.from_numpy((result.frames[0] * 255).round().clip(0, 255).astype("uint8"))
        tmp = out / f".tmp-{rank}-{job.name}"
        try:
            ck.write_video(tmp, frames, args.fps)
            os.replace(tmp, out / job.name)
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write {job.name} ({e.strerror or e})") from e
    seconds = time.perf_counter() - t0
    if not _all_ok(True, world) or rank != 0:  # everyone waits for the last video
        return {"rank": rank, "generated": len(todo), "seconds": seconds}
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()  # VBench scores in this one process, not across the ranks
    missing = vb.pending(jobs, out)
    if missing:
        raise OutputError(f"--out {out}: {len(missing)} videos missing after generation (e.g. {missing[0].name})")
    report = ck.check_folder(out, progress=True)
    (out / vb.CHECKS_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(ck.summary(report))
    summary = {"videos": len(jobs), "generated": len(todo), "seconds": round(seconds, 3), "out": str(out),
               "flagged": report["num_flagged"], "scores": None}
    if not args.no_score:
        summary["scores"] = _score(args, out, prompts, settings, device)
    return summary


def _score(args, out: Path, prompts, settings: dict, device: str) -> dict | None:
    """VBench's scores of ``out`` (scores.json, scores.md), or None with what to run later."""
    name = args.name or Path(args.model).resolve().name
    results = out / "vbench_results"
    later = (f"python -m tmd_train.evaluate vbench --model {args.model} --out {out}"
             + (f" --wan {args.wan}" if args.wan else "") + " (existing videos are kept; it goes straight to "
             f"scoring), or VBench's own: {vb.vbench_command(out, results, args.dimensions)}")
    if prompts.source != "vbench_standard":
        print(f"not scored: VBench scores its standard prompt suite, these are {prompts.source}")
        return None
    cache = vb.weights_cache()
    if not vb.vbench_available() or not cache.is_dir() or not any(cache.iterdir()):
        why = (f"vbench is not installed ({vb.INSTALL})" if not vb.vbench_available()
               else f"VBench's evaluator weights are not in {cache} (VBENCH_CACHE_DIR)")
        print(f"not scored: {why}. To score later: {later}")
        return None
    raw = vb.run_vbench(out, results, args.dimensions, name, device)
    scores = vb.aggregate(raw)
    (out / vb.SCORES_FILE).write_text(json.dumps({"name": name, "settings": settings, **scores}, indent=1) + "\n")
    table = vb.markdown_table(scores, name)
    (out / vb.SCORES_TABLE).write_text(table)
    print(table)
    return scores


# ------------------------------------------------------------------------------ checks
def add_checks(sub: argparse._SubParsersAction) -> None:
    from .evaluation.checks import Thresholds

    th = Thresholds()
    p = sub.add_parser("checks", help="flag constant, static and duplicated videos in a folder",
                       description="Collapse checks of every video in --videos: spatial and temporal pixel std, "
                                   "mean inter-frame change, near-duplicates among the videos of one prompt "
                                   "({prompt}-{index}.mp4). Pixel values in [0, 1].",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of video files")
    p.add_argument("--out", default=None, help="write the report here as JSON (default: print only)")
    p.add_argument("--spatial-std", type=float, default=th.spatial_std, help="below: 'constant'")
    p.add_argument("--temporal-std", type=float, default=th.temporal_std, help="below: 'static'")
    p.add_argument("--frame-change", type=float, default=th.frame_change, help="below: 'static'")
    p.add_argument("--duplicate", type=float, default=th.duplicate,
                   help="mean |difference| of two videos of one prompt below which they are 'duplicate'")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a video is flagged")
    p.set_defaults(command=run_checks)


def run_checks(args: argparse.Namespace) -> int:
    from .evaluation import checks as ck

    folder = Path(args.videos)
    if not folder.is_dir():
        raise UserError(f"--videos {folder}: no such folder")
    if not ck.video_files(folder):
        raise UserError(f"--videos {folder}: no video files ({', '.join(ck.VIDEO_SUFFIXES)})")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise OutputError(f"--out {out} is a folder; name a .json file")
    th = ck.Thresholds(args.spatial_std, args.temporal_std, args.frame_change, args.duplicate)
    try:
        report = ck.check_folder(folder, th, progress=True)
    except (OSError, RuntimeError) as e:
        raise UserError(f"--videos {folder}: cannot read a video ({e})") from e
    print(ck.summary(report))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write the report ({e.strerror or e})") from e
    return 1 if args.strict and report["num_flagged"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tmd_train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    add_tinybench(sub)
    add_vbench(sub)
    add_checks(sub)
    return p


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    rc = args.command(args)
    return rc if isinstance(rc, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: user errors print ``error: …`` and return 2 (see :func:`tmd_train.errors.run_main`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
