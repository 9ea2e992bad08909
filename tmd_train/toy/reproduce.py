"""``make reproduce``: the paper's comparison in miniature, with seeds, learning curves and ablations.

    python -m tmd_train.toy.reproduce [--out runs/reproduce] [--results docs/results] [--report docs/results.md]
                                      [--teacher DIR] [--seeds 3] [--plan] [--aggregate-only] [--quick]
                                      [--update-readme]

Cells (each run once per seed; the seed sets the stage-1 and stage-2 training seed and the evaluation noise,
the evaluation prompts are fixed):

* the teacher at ``teacher_steps`` Euler steps × CFG (100 NFE) and at 2 and 4 steps × CFG (4 and 8 NFE);
* DMD2-v (plain few-step student) at M = 1, 2, 4;
* TMD N2H1 and N2H2 (N = 2 inner steps, H = 1 or 2 of the toy teacher's L = 6 blocks in the flow head) at
  M = 1, 2, from a TM-MeanFlow stage 1; effective NFE ``M·(1 + (N−1)·H/L)``;
* ablations of TMD N2H1 M = 2: stage 1 with plain TM instead of TM-MF, gradients through the last inner step
  only (``unroll=false``), stage-1 guidance from the teacher (``objective.cfg_source=teacher``);
* diagnosis cells (:func:`diagnosis_cells`, ``diagnosis_seeds`` seeds): one change each to the stage-2 recipe of
  DMD2-v M = 2 or TMD N2H1 M = 2 (learning rate, GAN term, batch, fake-score updates, CFG of the real score) or
  to TMD's stage 1 (length, learning rate, CFG, none), to find out why stage 2 does not pay off.

Every stage runs through the real CLIs (:func:`tmd_train.toy.demo.run_stage`). A stage-1 run is shared by the
cells that use it (one per seed and stage-1 variant). Stage 2 trains in ``curve_points`` chunks (``steps``
raised each time, ``--resume latest``); after each chunk the exported student is scored with TinyBench on
``n_curve`` clips (the learning curve, step 0 = the initial generator), and at the end on ``n_eval`` clips
with teacher fidelity against the teacher's cached 100-NFE reference clips
(:func:`tmd_train.toy.tinybench.teacher_reference`).

Interruptions: a run is done when its record ``<results>/runs/<cell>/seed<k>.json`` exists (written
atomically, with ``<out>/cells/<cell>/seed<k>/tinybench.json``) and carries the fingerprint of the current
settings and teacher weights; a rerun skips it. Unfinished training resumes from its latest checkpoint;
checkpoints of finished runs are deleted. ``--aggregate-only`` rewrites the tables, plots and the report from
whatever records exist (a cell with fewer seeds shows its count). The records are small JSON files meant to be
committed, so a fresh checkout reruns only the missing runs.

``--update-readme`` also writes the tables and findings into the README's reproduce section.
``--plan`` prints the cells, steps and the estimated time (from the per-step costs in :data:`COSTS`) and exits.
``--quick`` is a smoke test of the whole pipeline (tiny sizes, three cells, one seed; under a minute of CPU),
written to ``runs/reproduce-quick`` (its records and report too).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ArgumentParser, MissingFileError, UserError, check_output_dir, run_main
from ..models.teacher import load_teacher
from ..sampling import effective_nfe, sample_few_step, sample_teacher, sample_tmd
from . import TOY_CLIP_SHAPE, TOY_TEACHER_DIR, text_encoder
from .clips import sample_prompts
from .demo import EVAL_SEED, INNER_STEPS, NOISE_SEED, Row, run_stage, save_grid, save_overview
from .tinybench import aggregate, teacher_reference, tinybench

ROOT = Path(__file__).resolve().parents[2]
#: Seconds per unit of work with 2 torch threads on the 2-core machine of 2026-12-02 (AMD EPYC with AVX-512), used
#: by ``--plan``: a stage-1 step (batch 8) per head size H, a stage-2 iteration per (method, M) (batch 4; the mean
#: over critic iterations and the generator's every 5th, export included), the sampling of one clip per NFE,
#: TinyBench per clip and one stage CLI call's start-up (imports, model build). Fitted to the 39 records of the
#: main cells (``docs/results/runs``: the per-run seconds of stage 1, stage 2 and evaluation, less 5 s per stage
#: call). The machines of earlier sessions were about 2.5 times slower; a machine shared with other jobs is too.
COSTS = {
    "stage1": {1: 0.26, 2: 0.33},
    "stage2": {("dmd2v", 1): 0.21, ("dmd2v", 2): 0.22, ("dmd2v", 4): 0.34, ("tmd", 1): 0.24, ("tmd", 2): 0.25},
    "sample_clip_nfe": 0.0098,
    "tinybench_clip": 0.003,
    "stage_call": 5.0,
}


@dataclass(frozen=True)
class Settings:
    """Sizes of a reproduce run (the full default and the ``--quick`` smoke test)."""

    seeds: int = 3
    n_eval: int = 96
    n_curve: int = 24
    curve_points: int = 4
    n_ref: int = 512
    teacher_steps: int = 50
    teacher_cfg: float = 3.0  # the toy teacher's best scale (tinybench.TEACHER_REF_CFG)
    kd_pairs: int = 32
    kd_steps: int = 30
    stage1_steps: int = 150
    stage1_batch: int = 8
    stage1_lr: float = 2e-4
    stage2_steps: int = 250
    batch_size: int = 4
    lr: float = 1e-4
    generator_every: int = 5
    ema_decay: float = 0.95
    disc_width: int = 64
    diagnosis_seeds: int = 2  # seeds of the diagnosis cells (at most ``seeds``)

    @classmethod
    def quick(cls) -> Settings:
        return cls(seeds=1, n_eval=6, n_curve=4, curve_points=2, n_ref=16, teacher_steps=2, kd_pairs=2, kd_steps=1,
                   stage1_steps=2, stage1_batch=2, stage2_steps=2, batch_size=2, generator_every=1,
                   diagnosis_seeds=1)

    def seeds_of(self, cell: Cell) -> int:
        """How many seeds ``cell`` runs with."""
        return min(self.seeds, self.diagnosis_seeds) if cell.diagnosis else self.seeds


@dataclass(frozen=True)
class Cell:
    """One row of the tables: a model and how it is made. ``M``: outer steps (teacher: Euler steps)."""

    key: str
    name: str
    kind: str                      # "teacher", "dmd2v" or "tmd"
    M: int
    H: int = 1
    stage1_method: str = "tm_meanflow"
    cfg_source: str = "student"
    unroll: bool = True
    ablation: str = ""             # what this ablation changes (empty for the main cells)
    stage1_steps: int = 0          # stage-1 steps (0: Settings.stage1_steps)
    stage1_lr: float = 0.0         # stage-1 learning rate (0: Settings.stage1_lr)
    no_stage1: bool = False        # tmd: stage 2 starts from the student copied from the teacher (no stage 1)
    stage1_args: tuple[str, ...] = ()  # extra stage-1 ``key=value`` overrides (after the recipe's: they win)
    stage2_args: tuple[str, ...] = ()  # extra stage-2 ``key=value`` overrides (after the recipe's: they win)
    diagnosis: str = ""            # a diagnosis cell: what it changes against ``base`` (a main cell's key)
    base: str = ""

    @property
    def stage1_key(self) -> str:
        key = f"{self.stage1_method}_H{self.H}_M{self.M}_{self.cfg_source}"
        key += f"_steps{self.stage1_steps}" if self.stage1_steps else ""
        key += f"_lr{self.stage1_lr:g}" if self.stage1_lr else ""
        return key + "".join(f"_{a.replace('=', '')}" for a in self.stage1_args)

    def steps_label(self) -> str:
        return f"{self.M}×2" if self.kind == "teacher" else (f"{self.M}×(N={INNER_STEPS})" if self.kind == "tmd"
                                                             else str(self.M))

    def nfe(self, layers: int) -> float:
        if self.kind == "teacher":
            return 2.0 * self.M
        if self.kind == "dmd2v":
            return float(self.M)
        return effective_nfe(self.M, INNER_STEPS, self.H, layers)


ABLATION_BASE = "tmd_N2H1_M2"
#: The fields of :class:`Cell` added after the first records: left out of the fingerprint at their defaults, so
#: the records of the cells that do not use them stay valid.
_LATER_FIELDS = ("stage1_steps", "stage1_lr", "no_stage1", "stage1_args", "stage2_args", "diagnosis", "base")


def diagnosis_cells() -> list[Cell]:
    """Why does stage 2 not pay off? Each cell changes one thing of DMD2-v M=2 or TMD N2H1 M=2.

    DMD2-v's stage 2 starts from the teacher used as an M-step sampler (already close to the teacher at 4 NFE)
    and the first records show it ending lower than it started; TMD starts from its stage-1 student, well
    below that. So: is the generator's learning rate too high (the toy recipe's 1e-4 is ten times the
    paper's default), does the GAN term or the small batch hurt, does the fake score lag behind the generator,
    does the guided target (CFG in the real score) pull it away, and is TMD's stage-1 start the bottleneck?
    """
    dmd = dict(kind="dmd2v", M=2, base="dmd2v_M2")
    tmd = dict(kind="tmd", M=2, H=1, base="tmd_N2H1_M2")
    return [
        Cell("why_dmd2v_M2_lr1e-5", "DMD2-v M=2, lr 1e-5", **dmd, stage2_args=("lr=1e-5",),
             diagnosis="learning rate 1e-5 (the paper's default) instead of 1e-4, for all three networks"),
        Cell("why_dmd2v_M2_lr3e-5", "DMD2-v M=2, lr 3e-5", **dmd, stage2_args=("lr=3e-5",),
             diagnosis="learning rate 3e-5 instead of 1e-4, for all three networks"),
        Cell("why_dmd2v_M2_nogan", "DMD2-v M=2, no GAN", **dmd, stage2_args=("gan_weight=0",),
             diagnosis="no GAN term (gan_weight 0)"),
        Cell("why_dmd2v_M2_b16", "DMD2-v M=2, batch 16", **dmd, stage2_args=("batch_size=16",),
             diagnosis="batch 16 instead of 4 (less noisy DMD and fake-score gradients)"),
        Cell("why_dmd2v_M2_critic10", "DMD2-v M=2, generator every 10", **dmd, stage2_args=("generator_every=10",),
             diagnosis="9 fake-score updates per generator update instead of 4 (a critic closer to the generator's "
                       "distribution; 25 generator updates instead of 50)"),
        Cell("why_dmd2v_M2_cfg1", "DMD2-v M=2, real score without CFG", **dmd, stage2_args=("dmd.cfg_scale=1",),
             diagnosis="the real score without guidance (CFG 1 instead of 3: the target is the unguided teacher)"),
        Cell("why_tmd_M2_lr3e-5", "TMD N2H1 M=2, lr 3e-5", **tmd, stage2_args=("lr=3e-5",),
             diagnosis="learning rate 3e-5 instead of 1e-4, for all three networks"),
        Cell("why_tmd_M2_nogan", "TMD N2H1 M=2, no GAN", **tmd, stage2_args=("gan_weight=0",),
             diagnosis="no GAN term (gan_weight 0)"),
        Cell("why_tmd_M2_stage1x4", "TMD N2H1 M=2, stage 1 ×4", **tmd, stage1_steps=600,
             diagnosis="stage 1 four times longer (600 steps instead of 150)"),
        Cell("why_tmd_M2_s1lr2e-5", "TMD N2H1 M=2, stage-1 lr 2e-5", **tmd, stage1_lr=2e-5,
             diagnosis="stage 1 at learning rate 2e-5 instead of 2e-4"),
        Cell("why_tmd_M2_s1cfg1", "TMD N2H1 M=2, stage 1 without CFG", **tmd, stage1_args=("objective.cfg_scale=1",),
             diagnosis="stage 1 without guidance (objective.cfg_scale 1 instead of 3: the head learns the unguided "
                       "transitions)"),
        Cell("why_tmd_M2_nostage1", "TMD N2H1 M=2, no stage 1", **tmd, no_stage1=True,
             diagnosis="no stage 1: stage 2 starts from the student copied from the teacher (its head "
                       "reproduces the teacher at init)"),
    ]


def make_cells(settings: Settings) -> list[Cell]:
    """Every cell of the comparison (the teacher's full cell at ``settings.teacher_steps``)."""
    cells = [Cell("teacher_full", f"teacher {settings.teacher_steps}×CFG", "teacher", settings.teacher_steps),
             Cell("teacher_2", "teacher 2×CFG", "teacher", 2), Cell("teacher_4", "teacher 4×CFG", "teacher", 4)]
    cells += [Cell(f"dmd2v_M{M}", f"DMD2-v M={M}", "dmd2v", M) for M in (1, 2, 4)]
    cells += [Cell(f"tmd_N2H{H}_M{M}", f"TMD N2H{H} M={M}", "tmd", M, H) for H in (1, 2) for M in (1, 2)]
    cells += [Cell("abl_tm_init", "TMD N2H1 M=2, stage 1 plain TM", "tmd", 2, 1, stage1_method="tm",
                   ablation="stage-1 init: plain TM instead of TM-MF"),
              Cell("abl_last_step", "TMD N2H1 M=2, last-step gradient", "tmd", 2, 1, unroll=False,
                   ablation="unroll=false: gradient through the last inner step only"),
              Cell("abl_cfg_teacher", "TMD N2H1 M=2, stage-1 CFG from teacher", "tmd", 2, 1, cfg_source="teacher",
                   ablation="stage-1 guidance: objective.cfg_source=teacher instead of student")]
    return cells + diagnosis_cells()


QUICK_CELLS = ("teacher_2", "dmd2v_M1", "tmd_N2H1_M2")


# ----------------------------------------------------------------- small helpers
def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def teacher_digest(teacher_dir: Path) -> str:
    """SHA-256 over the teacher folder's ``config.json`` and weight files."""
    h = hashlib.sha256()
    files = [teacher_dir / "config.json", *sorted(teacher_dir.glob("*.safetensors"))]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(settings: Settings, cell: Cell, teacher: str) -> str:
    """What a run's result depends on: the settings (but the seed count), the cell and the teacher weights."""
    s = asdict(settings)
    s.pop("seeds")
    s.pop("diagnosis_seeds")
    c = asdict(cell)
    for name in _LATER_FIELDS:
        if c[name] == Cell.__dataclass_fields__[name].default:
            c.pop(name)
    return hashlib.sha256(json.dumps({"settings": s, "cell": c, "teacher": teacher},
                                     sort_keys=True).encode()).hexdigest()[:20]


def stage1_fingerprint(settings: Settings, cell: Cell, teacher: str) -> str:
    s = {"stage1_steps": cell.stage1_steps or settings.stage1_steps, "stage1_batch": settings.stage1_batch,
         "stage1_lr": cell.stage1_lr or settings.stage1_lr}
    if cell.stage1_args:
        s["stage1_args"] = list(cell.stage1_args)
    return hashlib.sha256(json.dumps({"s": s, "v": cell.stage1_key,
                                      "t": teacher}, sort_keys=True).encode()).hexdigest()[:20]


def curve_steps(settings: Settings) -> list[int]:
    """The DMD iterations after which stage 2 is scored (0 = the initial generator)."""
    P, S = settings.curve_points, settings.stage2_steps
    return sorted({0, *(max(1, round(S * i / P)) for i in range(1, P + 1))})


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------- the runner
class Reproduce:
    """Runs the cells × seeds into ``out`` (training folders) and ``results`` (records, pictures)."""

    def __init__(self, out: Path, results: Path, settings: Settings, teacher_dir: Path, cells: Sequence[Cell]):
        self.out, self.results, self.s, self.teacher_dir, self.cells = out, results, settings, teacher_dir, cells
        self.teacher_hash = teacher_digest(teacher_dir)
        self.prompts = sample_prompts(settings.n_eval, EVAL_SEED)
        self._teacher = None
        self._reference = None

    # --- shared pieces
    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = load_teacher(self.teacher_dir, torch_dtype=torch.float32).eval()
        return self._teacher

    @property
    def layers(self) -> int:
        return int(json.loads((self.teacher_dir / "config.json").read_text())["num_layers"])

    def reference(self) -> torch.Tensor:
        """The teacher's 100-NFE clips for the evaluation prompts (cached on disk by TinyBench)."""
        if self._reference is None:
            self._reference = teacher_reference(self.teacher, self.prompts, steps=self.s.teacher_steps,
                                                cfg=self.s.teacher_cfg)
        return self._reference

    def record_path(self, cell: Cell, seed: int) -> Path:
        return self.results / "runs" / cell.key / f"seed{seed}.json"

    def run_dir(self, cell: Cell, seed: int) -> Path:
        return self.out / "cells" / cell.key / f"seed{seed}"

    def is_done(self, cell: Cell, seed: int) -> bool:
        rec = read_json(self.record_path(cell, seed))
        return isinstance(rec, dict) and rec.get("fingerprint") == fingerprint(self.s, cell, self.teacher_hash)

    def common_args(self, run_dir: Path, seed: int) -> list[str]:
        return ["--resume", "latest", f"teacher={self.teacher_dir}", "data=shapes", f"output_dir={run_dir}",
                f"seed={seed}", "log_every=10", "keep_last=1"]

    # --- evaluation
    def evaluate(self, cell: Cell, model, seed: int, n: int) -> tuple[dict, torch.Tensor, float]:
        """TinyBench scores (with teacher fidelity) of ``model`` on the first ``n`` evaluation prompts, the
        clips and the measured NFE. The seed picks the start noise (and TMD's inner noise)."""
        prompts = self.prompts[:n]
        text, _ = text_encoder.encode(prompts)
        noise = torch.randn((self.s.n_eval, *TOY_CLIP_SHAPE),
                            generator=torch.Generator().manual_seed(NOISE_SEED + 1000 * seed))[:n]
        with torch.no_grad():
            if cell.kind == "teacher":
                negative = text_encoder.encode_negative()[0].unsqueeze(0)
                out = sample_teacher(model, text, negative_text=negative, noise=noise, steps=cell.M,
                                     cfg=self.s.teacher_cfg)
            elif cell.kind == "dmd2v":
                out = sample_few_step(model, text, noise=noise, steps=cell.M)
            else:
                out = sample_tmd(model, text, noise=noise, M=cell.M, N=INNER_STEPS,
                                 generator=torch.Generator().manual_seed(NOISE_SEED + 1000 * seed + 1))
        clips = out.x0.float().clamp(-1, 1)
        scores = tinybench(clips, prompts, n_ref=self.s.n_ref, teacher_clips=self.reference()[:n])
        return scores, clips, float(out.nfe)

    def load_generator(self, cell: Cell, folder: Path):
        if cell.kind == "tmd":
            from ..models.student import TMDStudent
            return TMDStudent.from_pretrained(folder, torch_dtype=torch.float32).eval()
        return load_teacher(folder, torch_dtype=torch.float32).eval()

    # --- stages
    def kd_pairs(self) -> Path:
        folder, done = self.out / "kd_pairs", self.out / "kd_pairs.done.json"
        key = {"n": self.s.kd_pairs, "steps": self.s.teacher_steps, "cfg": self.s.teacher_cfg,
               "teacher": self.teacher_hash}
        if (read_json(done) or {}).get("key") == key:
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        run_stage("kd_pairs", ["--teacher", str(self.teacher_dir), "--data", "shapes", "--n", str(self.s.kd_pairs),
                            "--out", str(folder), "--steps", str(self.s.teacher_steps), "--cfg",
                            str(self.s.teacher_cfg), "--no-progress"])
        write_json(done, {"key": key})
        return folder

    def stage1(self, cell: Cell, seed: int) -> tuple[Path, float]:
        """The stage-1 student of ``cell``'s variant and ``seed`` (trained unless done) and its training seconds."""
        run_dir = self.out / "stage1" / cell.stage1_key / f"seed{seed}"
        done = run_dir / "done.json"
        fp = stage1_fingerprint(self.s, cell, self.teacher_hash)
        rec = read_json(done) or {}
        if rec.get("fingerprint") == fp and (run_dir / "student" / "config.json").is_file():
            return run_dir / "student", float(rec.get("seconds", 0.0))
        if run_dir.exists() and (read_json(run_dir / "fingerprint.json") or {}).get("fingerprint") != fp:
            shutil.rmtree(run_dir)
        write_json(run_dir / "fingerprint.json", {"fingerprint": fp})
        s = self.s
        steps = cell.stage1_steps or s.stage1_steps
        t0 = time.perf_counter()
        run_stage("stage1", self.common_args(run_dir, seed) + [
            f"method={cell.stage1_method}", f"steps={steps}", f"objective.outer_steps={cell.M}",
            f"objective.inner_steps={INNER_STEPS}", f"objective.cfg_source={cell.cfg_source}",
            f"head_blocks={cell.H}", f"lr={cell.stage1_lr or s.stage1_lr}", f"batch_size={s.stage1_batch}",
            f"checkpoint_every={max(1, steps // 4)}",
            f"synthetic_samples={max(1000, steps * s.stage1_batch)}", *cell.stage1_args])
        seconds = time.perf_counter() - t0
        _drop_checkpoints(run_dir)
        write_json(done, {"fingerprint": fp, "seconds": round(seconds, 1)})
        return run_dir / "student", seconds

    def stage2_args(self, cell: Cell, run_dir: Path, seed: int, steps: int, init: Path | None,
                    kd: Path | None) -> list[str]:
        s = self.s
        args = self.common_args(run_dir, seed) + [
            f"method={cell.kind}", f"steps={steps}", f"batch_size={s.batch_size}", f"outer_steps={cell.M}",
            f"inner_steps={INNER_STEPS}", f"head_blocks={cell.H}", f"lr={s.lr}", f"generator_every={s.generator_every}",
            f"dmd.cfg_scale={s.teacher_cfg}", f"synthetic_samples={max(1000, s.stage2_steps * s.batch_size)}",
            "sample_every=0", f"ema_decay={s.ema_decay}", f"disc_width={s.disc_width}", "disc_groups=16",
            "checkpoint_every=1000000"]
        if cell.kind == "tmd":
            args += [f"unroll={'true' if cell.unroll else 'false'}"] + ([f"init_student={init}"] if init else [])
        if kd is not None:
            args += [f"kd_pairs={kd}", f"kd_steps={s.kd_steps}"]
        return args + list(cell.stage2_args)

    def run_cell(self, cell: Cell, seed: int) -> dict:
        """Train (if needed), score and record one run; returns its record."""
        s = self.s
        run_dir = self.run_dir(cell, seed)
        fp = fingerprint(s, cell, self.teacher_hash)
        if run_dir.exists() and (read_json(run_dir / "fingerprint.json") or {}).get("fingerprint") != fp:
            shutil.rmtree(run_dir)
        write_json(run_dir / "fingerprint.json", {"fingerprint": fp})
        seconds = {"stage1": 0.0, "stage2": 0.0, "curve_eval": 0.0, "eval": 0.0}
        curve: list[dict] = []
        if cell.kind == "teacher":
            model = self.teacher
        else:
            init = kd = None
            if cell.kind == "tmd" and not cell.no_stage1:
                init, seconds["stage1"] = self.stage1(cell, seed)
            if cell.M == 1 and s.kd_steps > 0:
                kd = self.kd_pairs()
            state = read_json(run_dir / "curve.json") or {}
            curve = list(state.get("points", []))
            seconds["stage2"] = float(state.get("train_seconds", 0.0))
            seconds["curve_eval"] = float(state.get("eval_seconds", 0.0))
            done_steps = {p["steps"] for p in curve}
            for steps in curve_steps(s):
                if steps in done_steps:
                    continue
                if steps > 0:
                    t0 = time.perf_counter()
                    run_stage("stage2", self.stage2_args(cell, run_dir, seed, steps, init, kd))
                    seconds["stage2"] += time.perf_counter() - t0
                    folder = run_dir / "student"
                else:
                    folder = init if cell.kind == "tmd" else self.teacher_dir
                t0 = time.perf_counter()
                if folder is not None:
                    model = self.load_generator(cell, folder)
                else:  # no stage 1: the student stage 2 builds from the teacher (its head reproduces the teacher)
                    from ..models.student import TMDStudent
                    model = TMDStudent.from_teacher(self.teacher, head_blocks=cell.H).eval()
                scores, _, _ = self.evaluate(cell, model, seed, min(s.n_curve, s.n_eval))
                seconds["curve_eval"] += time.perf_counter() - t0
                curve.append({"steps": steps, "generator_updates": steps // s.generator_every,
                              **{k: round(v, 4) for k, v in scores.items()}})
                print(f"  {cell.name} seed {seed}: {steps} DMD iterations, TinyBench total {scores['total']:.1f} "
                      f"(n = {scores['n']})", flush=True)
                write_json(run_dir / "curve.json", {"points": curve, "train_seconds": seconds["stage2"],
                                                    "eval_seconds": seconds["curve_eval"]})
            model = self.load_generator(cell, run_dir / "student")
        t0 = time.perf_counter()
        scores, clips, nfe = self.evaluate(cell, model, seed, s.n_eval)
        seconds["eval"] = time.perf_counter() - t0
        expected = cell.nfe(self.layers)
        if not math.isclose(nfe, expected, rel_tol=1e-6):
            raise RuntimeError(f"{cell.key}: measured NFE {nfe} != formula {expected}")
        if seed == 0:
            (self.results / "samples").mkdir(parents=True, exist_ok=True)
            save_grid(clips, self.results / "samples" / f"{cell.key}.png")
            save_file({"clips": clips[:3].contiguous()}, str(run_dir / "clips.safetensors"))
        record = {"cell": cell.key, "seed": seed, "fingerprint": fp, "name": cell.name, "kind": cell.kind,
                  "nfe": nfe, "steps": cell.steps_label(), "ablation": cell.ablation,
                  "scores": {k: round(v, 4) for k, v in scores.items()}, "curve": curve,
                  "seconds": {k: round(v, 1) for k, v in seconds.items()},  # stage1: the shared run's
                  "settings": asdict(s), "cell_def": asdict(cell), "teacher": self.teacher_hash[:16],
                  "commit": git_commit(), "threads": torch.get_num_threads(),
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_json(run_dir / "tinybench.json", record["scores"])
        write_json(self.record_path(cell, seed), record)
        _drop_checkpoints(run_dir)
        print(f"{cell.name} seed {seed}: NFE {nfe:.3g}, TinyBench total {scores['total']:.1f}, teacher FD "
              f"{scores['teacher_fd']:.2f}, agreement {scores['teacher_agreement']:.2f}", flush=True)
        return record

    def run(self) -> int:
        """Every run not done yet, seed by seed (so that partial results cover every cell); returns their count."""
        todo = [(seed, c) for seed in range(self.s.seeds) for c in self.cells
                if seed < self.s.seeds_of(c) and not self.is_done(c, seed)]
        print(f"reproduce: {len(todo)} of {sum(map(self.s.seeds_of, self.cells))} runs to do", flush=True)
        for i, (seed, cell) in enumerate(todo, 1):
            print(f"\n== [{i}/{len(todo)}] {cell.name}, seed {seed}", flush=True)
            self.run_cell(cell, seed)
        return len(todo)


def _drop_checkpoints(run_dir: Path) -> None:
    for ckpt in run_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)


# ----------------------------------------------------------------- the plan
def plan(settings: Settings, cells: Sequence[Cell], layers: int = 6) -> tuple[str, float]:
    """The runs and their estimated seconds (from :data:`COSTS`)."""
    s, c = settings, COSTS
    lines = [f"{'cell':<20} {'NFE':>6} {'stage 1':>8} {'stage 2':>8} {'est. s/seed':>11} {'seeds':>5}"]
    total = 0.0
    stage1_seen: set[str] = set()
    kd_done = False
    n_curves = len(curve_steps(s))

    def eval_cost(cell: Cell, n: int) -> float:
        return n * (cell.nfe(layers) * c["sample_clip_nfe"] + c["tinybench_clip"])

    ref = s.n_eval * (2 * s.teacher_steps * c["sample_clip_nfe"])
    for cell in cells:
        sec = eval_cost(cell, s.n_eval)
        s1 = s2 = "-"
        if cell.kind != "teacher":
            M_cost = c["stage2"].get((cell.kind, cell.M), max(v for v in c["stage2"].values()))
            batch = next((int(a.split("=", 1)[1]) for a in cell.stage2_args if a.startswith("batch_size=")),
                         s.batch_size)
            M_cost *= batch / s.batch_size  # the per-sample work dominates at these sizes
            steps = s.stage2_steps + (s.kd_steps if cell.M == 1 else 0)
            sec += steps * M_cost + n_curves * eval_cost(cell, s.n_curve) + (n_curves - 1) * c["stage_call"]
            s2 = str(steps)
            if cell.M == 1 and s.kd_steps > 0 and not kd_done:
                total += s.kd_pairs * 2 * s.teacher_steps * c["sample_clip_nfe"]  # once, shared by the seeds
                kd_done = True
            if cell.kind == "tmd" and cell.no_stage1:
                s1 = "none"
            elif cell.kind == "tmd" and cell.stage1_key not in stage1_seen:
                stage1_seen.add(cell.stage1_key)
                steps1 = cell.stage1_steps or s.stage1_steps
                sec += steps1 * c["stage1"].get(cell.H, max(c["stage1"].values())) + c["stage_call"]
                s1 = str(steps1)
            elif cell.kind == "tmd":
                s1 = "shared"
        total += sec * s.seeds_of(cell)
        lines.append(f"{cell.key:<20} {cell.nfe(layers):>6.3g} {s1:>8} {s2:>8} {sec:>11.0f} {s.seeds_of(cell):>5}")
    total += ref
    lines.append(f"seeds {s.seeds} (diagnosis cells {min(s.seeds, s.diagnosis_seeds)}); stage 2: {s.stage2_steps} "
                 f"DMD iterations (+{s.kd_steps} KD at M = 1), batch "
                 f"{s.batch_size}, generator every {s.generator_every}; stage 1: {s.stage1_steps} steps, batch "
                 f"{s.stage1_batch}; TinyBench n = {s.n_eval} (curves: n = {s.n_curve} at {n_curves} points), "
                 f"n_ref = {s.n_ref}; teacher reference {ref:.0f} s")
    lines.append(f"estimated total: {total / 3600:.2f} h ({total / 60:.0f} min) at the measured per-step costs "
                 "(COSTS: 2 threads; a busier machine is slower)")
    return "\n".join(lines), total


# ----------------------------------------------------------------- aggregation and the report
def load_records(results: Path, cells: Sequence[Cell], settings: Settings, teacher: str,
                 seeds: int) -> tuple[dict[str, list[dict]], list[str]]:
    """``{cell: [records of seeds < seeds with the current fingerprint]}`` and the stale/unreadable files."""
    out: dict[str, list[dict]] = {}
    stale = []
    for cell in cells:
        fp = fingerprint(settings, cell, teacher)
        for path in sorted((results / "runs" / cell.key).glob("seed*.json")):
            rec = read_json(path)
            if not isinstance(rec, dict) or rec.get("fingerprint") != fp or not isinstance(rec.get("scores"), dict):
                stale.append(str(path))
            elif rec.get("seed", seeds) < min(seeds, settings.seeds_of(cell)):
                out.setdefault(cell.key, []).append(rec)
    return out, stale


def _fmt(stat: tuple[float, float, int] | None, digits: int = 1) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1-10, then 15, 20, 30; above: 1.96).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: float) -> float:
    """The two-sided 95 % Student-t threshold for ``df`` degrees of freedom (rounded down to a tabulated
    value: conservative)."""
    if df >= 30:
        return 2.042 if df < 60 else 1.96
    return _T95[max(k for k in _T95 if k <= max(1.0, df))]


def _compare(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, float | None, str]:
    """Difference of means, its standard error (None with one seed on a side) and a verdict word: a
    difference only beyond the 95 % Welch t threshold (t(df)·s.e., Welch-Satterthwaite df)."""
    diff = a[0] - b[0]
    if a[2] < 2 or b[2] < 2:
        return diff, None, "higher than" if diff > 0 else "lower than"
    va, vb = a[1] ** 2 / a[2], b[1] ** 2 / b[2]
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a[2] - 1) + vb ** 2 / (b[2] - 1)) if va + vb > 0 else math.inf
    if abs(diff) > t95(df) * se:
        return diff, se, "higher than" if diff > 0 else "lower than"
    return diff, se, "not distinguishable from"


def _diff_text(diff: float, se: float | None) -> str:
    return f"{diff:+.1f}" + (f" ± {se:.1f} s.e." if se is not None else ", one seed: no uncertainty")


def paired(records: dict[str, list[dict]], a: str, b: str, metric: str = "total") -> tuple[float, float, int] | None:
    """Mean, std and count of the per-seed differences ``a − b`` over the seeds both cells have. A seed fixes
    the evaluation noise and the training's random stream in every cell, so a variant and its base run with
    the same seed differ only by what the variant changes: the paired difference cancels the noise the two
    share (the unpaired comparison keeps it). None without a common seed."""
    by_a = {r["seed"]: r["scores"][metric] for r in records.get(a, [])}
    by_b = {r["seed"]: r["scores"][metric] for r in records.get(b, [])}
    diffs = [by_a[k] - by_b[k] for k in sorted(by_a.keys() & by_b.keys())]
    if not diffs:
        return None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), len(diffs)


def _paired_text(d: tuple[float, float, int] | None) -> str:
    if d is None:
        return "–"
    mean, sd, n = d
    return f"{mean:+.1f} ± {sd:.1f} (n = {n})" if n > 1 else f"{mean:+.1f} (n = 1)"


def _paired_verdict(d: tuple[float, float, int] | None) -> str | None:
    """"higher than" / "lower than" beyond the 95 % t threshold of the paired mean (t(n−1)·sd/√n), else "not
    distinguishable from"; None with fewer than 3 pairs (with 2, t(1) = 12.7 makes the paired test weaker than
    the unpaired one, which then decides)."""
    if d is None or d[2] < 3:
        return None
    mean, sd, n = d
    if abs(mean) > t95(n - 1) * sd / math.sqrt(n):
        return "higher than" if mean > 0 else "lower than"
    return "not distinguishable from"


def mean_curve(records: Sequence[dict], metric: str = "total") -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std over seeds of a metric along the learning curves (steps every seed has)."""
    by: dict[int, list[float]] = {}
    for rec in records:
        for p in rec.get("curve", []):
            by.setdefault(p["steps"], []).append(p[metric])
    steps = sorted(k for k, v in by.items() if len(v) == len(records))
    return (steps, [statistics.fmean(by[k]) for k in steps],
            [statistics.stdev(by[k]) if len(by[k]) > 1 else 0.0 for k in steps])


def findings(cells: Sequence[Cell], stats: dict, records: dict[str, list[dict]], settings: Settings) -> str:
    """The plain-language reading of the tables, each sentence computed from the numbers."""
    lines = []
    by = {c.key: c for c in cells}
    tot = {k: v["total"] for k, v in stats.items() if "total" in v}
    for H in (1, 2):
        for M in (1, 2):
            t, d = f"tmd_N2H{H}_M{M}", f"dmd2v_M{M}"
            if t in tot and d in tot:
                diff, se, verdict = _compare(tot[t], tot[d])
                lines.append(f"- TMD N2H{H} M={M} (NFE {by[t].nfe(6):.3g}) is {verdict} DMD2-v M={M} (NFE {M}) on "
                             f"TinyBench total: {_fmt(tot[t])} vs {_fmt(tot[d])} (difference "
                             f"{_diff_text(diff, se)}).")
    for M in (1, 2):
        h1, h2 = f"tmd_N2H1_M{M}", f"tmd_N2H2_M{M}"
        if h1 in tot and h2 in tot:
            diff, se, verdict = _compare(tot[h2], tot[h1])
            lines.append(f"- Head size at M={M}: N2H2 (H = 2 blocks) is {verdict} N2H1 ({_fmt(tot[h2])} vs "
                         f"{_fmt(tot[h1])}; {_diff_text(diff, se)}).")
    if "teacher_full" in tot:
        teacher = tot["teacher_full"]
        for key in ("tmd_N2H1_M2", "tmd_N2H2_M2", "dmd2v_M4"):
            if key in tot:
                diff, se, verdict = _compare(tot[key], teacher)
                lines.append(f"- {by[key].name} (NFE {by[key].nfe(6):.3g}) is {verdict} the teacher at "
                             f"{by['teacher_full'].nfe(6):.3g} NFE ({_fmt(tot[key])} vs {_fmt(teacher)}; "
                             f"{_diff_text(diff, se)}).")
        fid = [(k, v["fidelity"]) for k, v in stats.items() if "fidelity" in v and by[k].kind != "teacher"]
        if fid:
            best = max(fid, key=lambda kv: kv[1][0])
            lines.append(f"- Closest to the teacher (fidelity, the mean of the teacher-FD score and the attribute "
                         f"agreement): {by[best[0]].name}, {_fmt(best[1])}; the teacher's own fidelity from other "
                         f"noise is {_fmt(stats['teacher_full'].get('fidelity'))} (the ceiling).")
    def versus(a: str, b: str) -> tuple[str, str]:
        """The verdict of ``a`` against ``b`` (paired when possible) and the numbers behind it."""
        diff, se, verdict = _compare(tot[a], tot[b])
        pair = paired(records, a, b)
        return (_paired_verdict(pair) or verdict, f"{_fmt(tot[a])} vs {_fmt(tot[b])}; unpaired "
                f"{_diff_text(diff, se)}; paired by seed {_paired_text(pair)}")

    for c in cells:
        if c.ablation and c.key in tot and ABLATION_BASE in tot:
            verdict, numbers = versus(ABLATION_BASE, c.key)
            lines.append(f"- Ablation, {c.ablation}: the default recipe is {verdict} it ({numbers}).")
    for c in cells:
        if c.diagnosis and c.key in tot and c.base in tot:
            verdict, numbers = versus(c.key, c.base)
            lines.append(f"- Diagnosis, {c.name} ({c.diagnosis}): {verdict} {by[c.base].name} ({numbers}).")
    moving, gains, peaked = [], [], []
    for key, recs in records.items():
        if by[key].kind == "teacher" or by[key].diagnosis:
            continue
        steps, mean, _ = mean_curve(recs)
        if len(steps) >= 3:
            span = max(mean) - min(mean)
            last = mean[-1] - mean[-2]
            if abs(last) > max(1.0, 0.25 * span):
                moving.append(f"{by[key].name} ({last:+.1f} in the last {steps[-1] - steps[-2]} iterations)")
            top = _peak(mean)
            if top < len(mean) - 1 and mean[top] - mean[-1] > 2.0:
                peaked.append(f"{by[key].name} ({mean[top]:.1f} at {steps[top]}, {mean[-1]:.1f} at {steps[-1]})")
        if len(steps) >= 2:
            gains.append((by[key].name, mean[-1] - mean[0]))
    if moving:
        lines.append(f"- Curves still moving at the end (a longer stage 2 could change the order): "
                     f"{'; '.join(moving)}.")
    elif records:
        lines.append("- Every learning curve changed by less than a quarter of its range (and ≤ 1 point) over its "
                     "last chunk: more iterations at these settings would not change the order.")
    if peaked:
        lines.append("- Curves that peak before the end and then fall by more than 2 points (mean curve total at "
                     f"the peak and at the end, n = {settings.n_curve}; iteration 0 is the initial generator): "
                     f"{'; '.join(peaked)}. There stage 2 makes the generator worse, so the budget is not what "
                     "limits it.")
    if gains:
        lines.append("- What stage 2 adds to the initial generator (curve total, last point − step 0, n = "
                     f"{settings.n_curve}): " + ", ".join(f"{n} {g:+.1f}" for n, g in gains) + ".")
    short = sorted((len(v), settings.seeds_of(by[k])) for k, v in records.items() if len(v) < settings.seeds_of(by[k]))
    if short:
        lines.append(f"- Partial results: some cells have only {short[0][0]} of {short[0][1]} seeds.")
    return "\n".join(lines)


def _peak(values: Sequence[float]) -> int:
    """Index of the first maximum."""
    return max(range(len(values)), key=values.__getitem__)


def curve_summary(records: Sequence[dict]) -> str:
    """``start → peak (at iteration) → end`` of the mean learning curve."""
    steps, mean, _ = mean_curve(records)
    if len(steps) < 2:
        return "–"
    top = _peak(mean)
    return f"{mean[0]:.1f} → {mean[top]:.1f} ({steps[top]}) → {mean[-1]:.1f}"


def diagnosis_table(cells: Sequence[Cell], stats: dict, records: dict[str, list[dict]]) -> str:
    """One row per diagnosis cell and the main cells they change, with the curve's start, peak and end."""
    lines = ["| cell | what changes | seeds | total | Δ total vs its base | paired Δ (same seeds) "
             "| curve: start → peak (iteration) → end | FD | teacher FD | fidelity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {c.key: c for c in cells}
    order: list[Cell] = []
    for c in cells:
        if c.diagnosis:
            if c.base in by and by[c.base] not in order:
                order.append(by[c.base])
            order.append(c)
    for c in order:
        st = stats.get(c.key)
        if st is None:
            continue
        delta = pair = "–"
        if c.diagnosis and c.base in stats:
            diff, se, _ = _compare(st["total"], stats[c.base]["total"])
            delta, pair = _diff_text(diff, se), _paired_text(paired(records, c.key, c.base))
        lines.append(f"| {c.name} | {c.diagnosis or 'the recipe (base)'} | {st['total'][2]} | {_fmt(st['total'])} | "
                     f"{delta} | {pair} | {curve_summary(records.get(c.key, []))} | {_fmt(st.get('fd'), 2)} | "
                     f"{_fmt(st.get('teacher_fd'), 2)} | {_fmt(st.get('fidelity'))} |")
    return "\n".join(lines)


HEAD_COLUMNS = (("total", "**total**", 1), ("semantic", "semantic", 1), ("fd", "FD", 2),
                ("temporal_fd", "temporal FD", 2), ("quality", "quality", 1), ("teacher_fd", "teacher FD", 2),
                ("teacher_agreement", "teacher agreement", 3), ("fidelity", "fidelity", 1))


def results_table(cells: Sequence[Cell], stats: dict, layers: int) -> str:
    head = "| cell | steps | NFE | seeds | " + " | ".join(c[1] for c in HEAD_COLUMNS) + " |"
    lines = [head, "|---|---|---|---|" + "---|" * len(HEAD_COLUMNS)]
    for c in cells:
        st = stats.get(c.key)
        if st is None:
            continue
        n = max(v[2] for v in st.values())
        lines.append(f"| {c.name} | {c.steps_label()} | {c.nfe(layers):.3g} | {n} | "
                     + " | ".join(_fmt(st.get(k), d) for k, _, d in HEAD_COLUMNS) + " |")
    return "\n".join(lines)


def ablation_table(cells: Sequence[Cell], stats: dict, records: dict[str, list[dict]] | None = None) -> str:
    lines = ["| variant of TMD N2H1 M=2 | seeds | total | Δ total vs default | paired Δ (same seeds) | teacher FD "
             "| fidelity |", "|---|---|---|---|---|---|---|"]
    base = stats.get(ABLATION_BASE)
    for c in cells:
        if c.key != ABLATION_BASE and not c.ablation:
            continue
        st = stats.get(c.key)
        if st is None:
            continue
        delta = pair = "–"
        if c.ablation and base is not None:
            diff, se, _ = _compare(st["total"], base["total"])
            delta, pair = _diff_text(diff, se), _paired_text(paired(records or {}, c.key, ABLATION_BASE))
        lines.append(f"| {c.ablation or 'default (TM-MF init, full unrolling, student CFG)'} | {st['total'][2]} | "
                     f"{_fmt(st['total'])} | {delta} | {pair} | {_fmt(st.get('teacher_fd'), 2)} | "
                     f"{_fmt(st.get('fidelity'))} |")
    return "\n".join(lines)


def plot_nfe(cells: Sequence[Cell], stats: dict, layers: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"teacher": ("s", "tab:gray"), "dmd2v": ("^", "tab:blue"), "tmd": ("o", "tab:red")}
    for c in cells:
        st = stats.get(c.key)
        if st is None:
            continue
        marker, colour = style[c.kind]
        if c.ablation:
            colour = "tab:orange"
        if c.diagnosis:
            colour = "tab:green"
        m, sd, _ = st["total"]
        ax.errorbar(c.nfe(layers), m, yerr=sd, fmt=marker, color=colour, capsize=3, ms=5)
        ax.annotate(c.name, (c.nfe(layers), m), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (teacher forward passes per sample)")
    ax.set_ylabel("TinyBench total (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(cells: Sequence[Cell], records: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4), sharey=True)
    bases = {c.base for c in cells if c.diagnosis}
    for c in cells:
        recs = records.get(c.key)
        if c.kind == "teacher" or not recs:
            continue
        steps, mean, std = mean_curve(recs)
        if not steps:
            continue
        panels = [axes[2]] if c.diagnosis else [axes[1] if (c.ablation or c.key == ABLATION_BASE) else axes[0]]
        if c.key in bases:
            panels.append(axes[2])
        for ax in panels:
            line, = ax.plot(steps, mean, marker=".", label=f"{c.name} ({len(recs)} seeds)",
                            linestyle="--" if ax is axes[2] and not c.diagnosis else "-")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.15)
    titles = ("DMD2-v and TMD", "ablations of TMD N2H1 M=2", "diagnosis: one change to the recipe (dashed: base)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("stage-2 DMD iterations (0: the initial generator)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    axes[0].set_ylabel("TinyBench total (curve n, mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


README_BEGIN = "<!-- reproduce:begin (written by python -m tmd_train.toy.reproduce --update-readme) -->"
README_END = "<!-- reproduce:end -->"


def update_readme(readme: Path, body: str) -> None:
    """Replace the README's reproduce section (between :data:`README_BEGIN` and :data:`README_END`)."""
    text = readme.read_text()
    begin = next((line for line in text.splitlines() if line.startswith("<!-- reproduce:begin")), None)
    if begin is None or README_END not in text:
        raise UserError(f"{readme} has no reproduce markers ({README_BEGIN!r} ... {README_END!r})")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(README_END, 1)
    tmp = readme.with_name(f".{readme.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{pre}{README_BEGIN}\n{body}\n{README_END}{post}")
    os.replace(tmp, readme)


def write_report(out: Path, results: Path, report: Path, settings: Settings, cells: Sequence[Cell],
                 teacher_dir: Path, command: str, readme: Path | None = None) -> str:
    """Regenerate the tables, plots, overview picture and ``report`` from the records (and the README's
    reproduce section when ``readme`` is given); returns the report."""
    teacher = teacher_digest(teacher_dir)
    layers = int(json.loads((teacher_dir / "config.json").read_text())["num_layers"])
    records, stale = load_records(results, cells, settings, teacher, settings.seeds)
    stats = aggregate({k: [r["scores"] for r in v] for k, v in records.items()})
    results.mkdir(parents=True, exist_ok=True)
    if stats:
        plot_nfe(cells, stats, layers, results / "tinybench_vs_nfe.png")
        plot_curves(cells, records, results / "curves.png")
    rows = []
    for c in cells:
        f = out / "cells" / c.key / "seed0" / "clips.safetensors"
        if c.key in stats and f.is_file():
            rows.append(Row(c.name, c.key, c.steps_label(), c.nfe(layers), {}, 0.0, load_file(str(f))["clips"]))
    if rows:
        save_overview(rows, sample_prompts(3, EVAL_SEED), results / "samples.png")
    rel = os.path.relpath(results, report.parent)
    all_recs = [r for v in records.values() for r in v]
    # a stage-1 run is shared by the cells of its variant: count its seconds once
    stage1 = {(r["cell_def"]["stage1_method"], r["cell_def"]["H"], r["cell_def"]["M"], r["cell_def"]["cfg_source"],
               r["cell_def"].get("stage1_steps", 0), r["cell_def"].get("stage1_lr", 0.0),
               tuple(r["cell_def"].get("stage1_args", ())), r["seed"]):
              r["seconds"].get("stage1", 0.0) for r in all_recs if r.get("kind") == "tmd"}
    run_seconds = (sum(v for r in all_recs for k, v in r["seconds"].items() if k != "stage1")
                   + sum(stage1.values()))
    dates = sorted(r.get("finished", "") for r in all_recs)
    commits = sorted({r.get("commit", "?") for r in all_recs})
    n_runs, n_all = len(all_recs), sum(map(settings.seeds_of, cells))
    s = settings
    grids = [c for c in cells if (results / "samples" / f"{c.key}.png").is_file() and c.key in stats]
    ignored = f"; stale or unreadable records ignored: {len(stale)}" if stale else ""
    headline = results_table([c for c in cells if not c.ablation and not c.diagnosis], stats, layers)
    ablations, diagnoses = ablation_table(cells, stats, records), diagnosis_table(cells, stats, records)
    reading = findings(cells, stats, records, settings) or "- No finished runs yet."
    last = read_json(results / "last_run.json")
    wall = (f"{last['wall_seconds'] / 3600:.2f} h for the last invocation that ran cells (`{last['command']}`, "
            f"{last['runs']} run(s), finished {last['finished']})" if isinstance(last, dict) else "–")
    text = f"""# Results: TMD vs DMD2-v vs the teacher in the toy world

Written by `{command}` (regenerate the text, tables and plots from the records with
`python -m tmd_train.toy.reproduce --aggregate-only`). Records: `{rel}/runs/<cell>/seed<k>.json`.

- runs finished: {n_runs} of {n_all} ({len(cells)} cells: {s.seeds} seeds each, diagnosis cells \
{min(s.seeds, s.diagnosis_seeds)}){ignored}
- finished between {dates[0] if dates else '–'} and {dates[-1] if dates else '–'} (UTC),
  commit(s) {', '.join(commits) or '–'}
- machine: {platform.machine()}, {os.cpu_count()} CPU core(s), torch {torch.__version__}; teacher
  `{teacher_dir.name}` (weights sha256 {teacher[:12]}, L = {layers})
- measured time: {run_seconds / 3600:.2f} h summed over the runs' training and evaluation; wall {wall}

Each cell is run with {s.seeds} seed(s) (stage-1 and stage-2 training seed, evaluation noise); the prompts are
fixed ({s.n_eval} prompts of world seed {EVAL_SEED}). Scores are mean ± sample standard deviation over seeds.
TinyBench against {s.n_ref} real clips; teacher FD / agreement / fidelity against the teacher's own
{2 * s.teacher_steps}-NFE clips of the same prompts from independent noise (its own row is the ceiling).

## Headline

{headline}

## Ablations (on TMD N2H1 M=2)

{ablations}

## Diagnosis: why stage 2 does not pay off

Each diagnosis cell changes one thing of a main cell's recipe ({min(s.seeds, s.diagnosis_seeds)} seeds). The curve
column is the mean learning curve (n = {s.n_curve}): the initial generator, the best point and the last.

{diagnoses}

## What the numbers support

{reading}

Differences are called "higher"/"lower" only beyond the two-sided 95 % Student-t threshold: t·s.e. of the
difference of means over seeds with Welch's degrees of freedom (with 3 seeds a side, about 2.8 s.e.). The
seed-to-seed spread includes training and evaluation noise. An ablation or diagnosis cell and its base share each
seed's evaluation noise and training random stream, so their verdicts use the per-seed (paired) differences when
they have at least 3 seeds in common, beyond t(n−1)·sd/√n; with 2 (the diagnosis cells) the unpaired test decides
(a paired one on 2 pairs has t(1) = 12.7) and the paired difference is shown for reading.

## Learning curves and TinyBench vs NFE

{f'![learning curves]({rel}/curves.png)' if stats else '(no finished runs yet)'}

Curve points are scored on the first {s.n_curve} prompts (FD at small n is biased upward: compare curves with
each other, not with the table).

{f'![TinyBench total vs NFE]({rel}/tinybench_vs_nfe.png)' if stats else ''}

## Samples (seed 0)

{f'![samples]({rel}/samples.png)' if (results / 'samples.png').is_file() else '(no samples yet)'}

Per cell (4 clips, frames left to right): {', '.join(f'[{c.key}]({rel}/samples/{c.key}.png)' for c in grids) or '–'}

## Plan (`--plan`)

```
{plan(settings, cells, layers)[0]}
```

## Recipe

- Stage 1 ({', '.join(sorted({c.stage1_method for c in cells if c.kind == 'tmd'})) or '–'}): {s.stage1_steps} steps,
  batch {s.stage1_batch}, lr {s.stage1_lr:g}, N = {INNER_STEPS}, one run per seed and variant (shared by the cells).
- Stage 2: {s.stage2_steps} DMD iterations, batch {s.batch_size}, generator every {s.generator_every}th
  ({s.stage2_steps // s.generator_every} generator updates), lr {s.lr:g}, EMA {s.ema_decay:g}, CFG
  {s.teacher_cfg:g} in the real score; M = 1 cells start with {s.kd_steps} KD steps on {s.kd_pairs} teacher
  ODE pairs. The learning curve is scored at {', '.join(map(str, curve_steps(s)))} iterations.
"""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    if readme is not None:
        day = dates[-1][:10] if dates else "–"
        rel_readme = os.path.relpath(report, readme.parent)
        state = "all" if n_runs == n_all else "partial:"
        body = f"""**`make reproduce`, {day} ({state} {n_runs} of {n_all} runs; commit(s) {', '.join(commits) or '–'};
{run_seconds / 3600:.2f} h of runs on a {os.cpu_count()}-core CPU).** Mean ± std over seeds, TinyBench on {s.n_eval}
prompts; the full report with curves, plots and samples: [{rel_readme}]({rel_readme}).

{headline}

Ablations of TMD N2H1 M = 2:

{ablations}

Diagnosis (one change to a main cell's recipe; curve: initial generator → best → last, n = {s.n_curve}):

{diagnoses}

{reading}"""
        update_readme(readme, body)
    for path in stale:
        print(f"ignored (stale settings or unreadable): {path}", file=sys.stderr)
    return text


# ----------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m tmd_train.toy.reproduce", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="training folders: checkpoints, students, curves (default runs/reproduce; --quick: "
                         "runs/reproduce-quick)")
    ap.add_argument("--results", default=None, help="records (runs/<cell>/seed<k>.json), plots and grids "
                                                    "(default docs/results, committed; --quick: <out>/results)")
    ap.add_argument("--report", default=None,
                    help="the report written from the records (default docs/results.md; --quick: <out>/results.md)")
    ap.add_argument("--teacher", default=str(TOY_TEACHER_DIR), help="the toy-teacher folder (default: the shipped one)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; --quick 1)")
    ap.add_argument("--cells", default=None, help="comma-separated cell keys (default: all; --quick: a few)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (1 is faster on a machine busy with other jobs)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and a few cells (a smoke test)")
    ap.add_argument("--plan", action="store_true", help="print the cells, steps and estimated time, run nothing")
    ap.add_argument("--aggregate-only", action="store_true",
                    help="only rewrite the tables, plots and the report from the finished runs' records")
    ap.add_argument("--update-readme", action="store_true",
                    help="also write the tables and findings into README.md (between its reproduce markers)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = ap.parse_args(argv)
    if args.update_readme and args.quick:
        raise UserError("--update-readme is for the full run, not --quick")
    settings = Settings.quick() if args.quick else Settings()
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {args.seeds}")
        settings = replace(settings, seeds=args.seeds)
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    cells = make_cells(settings)
    wanted = args.cells.split(",") if args.cells else (list(QUICK_CELLS) if args.quick else None)
    if wanted:
        known = {c.key for c in cells}
        bad = [k for k in wanted if k not in known]
        if bad:
            raise UserError(f"--cells: unknown cell(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        cells = [c for c in cells if c.key in wanted]
    teacher_dir = Path(args.teacher)
    if not (teacher_dir / "config.json").is_file():
        raise MissingFileError(f"--teacher {teacher_dir}: no config.json (a toy-teacher folder)")
    if args.plan:
        text, _ = plan(settings, cells, int(json.loads((teacher_dir / "config.json").read_text())["num_layers"]))
        print(text)
        return 0
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    results = Path(args.results) if args.results else (out / "results" if args.quick else ROOT / "docs" / "results")
    report = Path(args.report) if args.report else (out / "results.md" if args.quick else ROOT / "docs" / "results.md")
    check_output_dir(out, "--out")
    check_output_dir(results, "--results")
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m tmd_train.toy.reproduce", *given])
    if not args.aggregate_only:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        done = Reproduce(out, results, settings, teacher_dir, cells).run()
        if done:
            write_json(results / "last_run.json", {
                "command": command, "wall_seconds": round(time.perf_counter() - t0, 1), "runs": done,
                "threads": args.threads,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    write_report(out, results, report, settings, cells, teacher_dir, command,
                 ROOT / "README.md" if args.update_readme else None)
    print(f"reproduce: report in {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
