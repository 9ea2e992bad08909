"""Stage-2 trainer on tiny random teachers (CPU): the roll-out really differentiates through the
first inner step (and unroll=False really does not), the 5:1 update schedule, finite losses for
both methods, exact kill-and-resume (incl. EMA, all optimizers, the KD warm-up), the non-finite
guards, kd_pairs, the output folder with the sampling CLI, config errors, the no-argument default,
and a 2-process FSDP2 run over gloo."""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.run import TESTS, output, run_module, torchrun
from support.tiny import TINY_CONFIG, randomize_zero_init
from torch import nn

import tmd_train.methods.distill as distill
import tmd_train.stage2 as stage2
from tmd_train.data.format import LatentDataset
from tmd_train.data.sources import SyntheticSource, masked_text
from tmd_train.engine.checkpoint import list_checkpoints
from tmd_train.engine.config import config_from_dict, load_config
from tmd_train.engine.consolidate import read_dcp_tensors
from tmd_train.engine.logging import read_metrics
from tmd_train.engine.trainer import fit
from tmd_train.errors import run_main
from tmd_train.methods import Stage2Config, build_method
from tmd_train.methods.distill import Distillation
from tmd_train.methods.networks import build_models
from tmd_train.models import TMDStudent, load_teacher
from tmd_train.objectives.dmd import dmd_loss
from tmd_train.sample import main as sample_main
from tmd_train.sampling import sample_few_step, sample_teacher, sample_tmd

ROOT = Path(__file__).resolve().parents[2]
TEACHER = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}
TEXT_LEN = 3
LATENT = (TINY_CONFIG["in_channels"], 1, 4, 4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for the whole module (before the module fixtures: results depend on the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_values(output_dir, **over) -> dict:
    """A tiny run: the 4-block D=16 teacher, H=2, 8 synthetic samples of [4, 1, 4, 4] (4 tokens),
    batch 2, a width-8 discriminator on blocks 1, 2, 3."""
    values = dict(teacher=TEACHER, head_blocks=2, synthetic_samples=8, synthetic_latent_size=list(LATENT[1:]),
                  synthetic_text_len=TEXT_LEN, batch_size=2, lr=1e-3, steps=24, disc_width=8, disc_groups=4,
                  log_every=1, checkpoint_every=12, keep_last=5, output_dir=str(output_dir), seed=0)
    values.update(over)
    return values


def tiny_cfg(output_dir, **over) -> Stage2Config:
    return config_from_dict(Stage2Config, tiny_values(output_dir, **over))


def trained_like_student(folder: Path) -> Path:
    """A stage-1-like student folder of the tiny teacher whose zero-initialised layers are non-zero."""
    _, student = build_models(TEACHER, 0, need_teacher=False, head_blocks=2)
    randomize_zero_init(student, torch.Generator().manual_seed(3), scale=0.1)
    student.save_pretrained(folder)
    return folder


def tiny_teacher_folder(folder: Path) -> Path:
    """The tiny teacher exactly as the stage-2 methods build it from ``TEACHER`` with seed 0, saved."""
    teacher, _ = build_models(TEACHER, 0, need_teacher=True, head_blocks=2)
    teacher.save_pretrained(folder)
    return folder


#: where each network's weights are in a checkpoint's sharded state (dcp/)
SAVED = {"generator": "generator.model.", "generator_ema": "generator_ema.", "fake_score": "fake_score.model.",
         "discriminator": "discriminator.model."}


def saved(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors of a checkpoint whose key starts with ``prefix`` (prefix removed)."""
    return {k[len(prefix):]: v for k, v in read_dcp_tensors(checkpoint / "dcp") if k.startswith(prefix)}


def same_files(a: Path, b: Path, names=("generator", "generator_ema", "fake_score", "discriminator")) -> None:
    for name in names:
        x, y = saved(a, SAVED[name]), saved(b, SAVED[name])
        assert x and x.keys() == y.keys(), name
        bad = [k for k in x if not torch.equal(x[k], y[k])]
        assert not bad, (name, bad[:5])


# ------------------------------------------------------------------ (a) the roll-out
class FirstCall(nn.Module):
    """Runs ``inner`` with its own leaf copies of the parameters on its FIRST call (recorded in
    ``params``), normally afterwards: the copies' gradients are that call's share of the
    parameter gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.params: dict[str, torch.Tensor] = {}

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.params = {n: p.detach().clone().requires_grad_(True) for n, p in self.inner.named_parameters()}
            return torch.func.functional_call(self.inner, self.params, args, kwargs)
        return self.inner(*args, **kwargs)


def first_step_grads(tmp_path, unroll: bool, checkpoint: bool = False):
    """DMD-loss gradients of one generator sample with probes on the fusion and the first head
    block: ``(first-call grads {fusion, block}, calls, all generator grads)``."""
    cfg = tiny_cfg(tmp_path / f"run-{unroll}-{checkpoint}", init_student=str(trained_like_student(tmp_path / "init")),
                   unroll=unroll, unroll_checkpoint=checkpoint, inner_steps=2)
    trainer = build_method(cfg)
    student = trainer.generator
    k = student.backbone_blocks
    student.fusion = FirstCall(student.fusion)
    student.transformer.blocks[k] = FirstCall(student.transformer.blocks[k])
    batch = next(trainer.batches(1))
    gen = torch.Generator().manual_seed(0)
    t, x1, y1 = trainer.generator_draws(batch["latents"], gen)
    x_hat = trainer.gen_model(batch["latents"], x1, t, batch["text"], y1)
    loss, _ = dmd_loss(x_hat, trainer.teacher, trainer.fake_score, batch["text"], trainer.negative_text,
                       trainer.dmd, gen)
    loss["loss"].backward()
    probes = {"fusion": student.fusion, "block": student.transformer.blocks[k]}
    first = {name: {n: p.grad for n, p in probe.params.items()} for name, probe in probes.items()}
    calls = {name: probe.calls for name, probe in probes.items()}
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return first, calls, grads


def test_unroll_reaches_the_first_inner_step(tmp_path):
    """unroll=True: the first inner step's fusion and head-block parameters get non-zero gradient
    from the DMD loss; unroll=False: none (only the last step is differentiated), while the head
    and backbone still learn through the last step. Per-step checkpointing gives the same
    gradients as the plain roll-out."""
    first, calls, grads = first_step_grads(tmp_path, unroll=True)
    assert calls == {"fusion": 2, "block": 2}                        # N = 2 inner steps
    for name, g in first.items():
        assert all(v is not None for v in g.values()), name
        assert sum(float(v.abs().sum()) for v in g.values()) > 0, name
    first_off, calls_off, grads_off = first_step_grads(tmp_path, unroll=False)
    assert calls_off == {"fusion": 2, "block": 2}
    for name, g in first_off.items():
        assert all(v is None for v in g.values()), name
    assert grads_off.keys() == grads.keys()                             # the last step still trains everything
    assert any(not torch.allclose(grads_off[n], grads[n]) for n in grads)
    _, _, grads_ckpt = first_step_grads(tmp_path, unroll=True, checkpoint=True)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


# ------------------------------------------------------------------ (b) schedule
def record_updates(trainer: Distillation) -> list[tuple[int, str]]:
    """Wrap every optimizer's step so that ``(step, name)`` is recorded."""
    log: list[tuple[int, str]] = []
    current = {"step": 0}
    for name, opt in trainer.optimizers.items():
        def stepper(*args, _orig=opt.step, _name=name, **kwargs):
            log.append((current["step"], _name))
            return _orig(*args, **kwargs)
        opt.step = stepper
    def recording(orig):
        def wrapped(step, batch):
            current["step"] = step
            return orig(step, batch)
        return wrapped

    trainer.dmd_step = recording(trainer.dmd_step)
    trainer.kd_step = recording(trainer.kd_step)
    return log


@pytest.mark.parametrize("every", [5, 3])
def test_update_schedule(tmp_path, every):
    trainer = build_method(tiny_cfg(tmp_path, steps=12, generator_every=every, checkpoint_every=100))
    log = record_updates(trainer)
    fit(trainer)
    want = []
    for i in range(1, 13):
        if i % every == 0:
            want.append((i, "generator"))
        want += [(i, "fake_score"), (i, "discriminator")]
    assert log == want
    assert trainer.gen_updates == 12 // every


# ------------------------------------------------------------------ (c) both methods, finite
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """24 uninterrupted iterations of each method (checkpoints at 12 and 24)."""
    out = {}
    for method in ("tmd", "dmd2v"):
        folder = tmp_path_factory.mktemp(method)
        trainer = build_method(tiny_cfg(folder / "run", method=method))
        final = fit(trainer)
        out[method] = (folder / "run", final, trainer)
    return out


@pytest.mark.parametrize("method", ["tmd", "dmd2v"])
def test_both_methods_finite(runs, method):
    out, final, trainer = runs[method]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert {"loss_fake", "loss_d"} <= set(r)
    gen_rows = [r for r in rows if "loss_dmd" in r]
    assert [r["step"] for r in gen_rows] == [5, 10, 15, 20]
    assert all({"loss_g", "loss_gan_g", "dmd_grad", "normaliser"} <= set(r) for r in gen_rows)
    assert rows[-1]["skipped_generator"] == rows[-1]["skipped_fake_score"] == rows[-1]["skipped_discriminator"] == 0
    assert trainer.gen_updates == 4
    assert [s for s, _ in list_checkpoints(out)] == [12, 24]
    ckpt = out / "checkpoint-0000024"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "dcp", "export", "rng_state_0.pt", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 24 and state["generator_updates"] == 4
    assert load_config(Stage2Config, ckpt / "config.yaml") == trainer.cfg
    # the EMA differs from the raw weights (0.99 over 4 updates) and is what student/ holds
    raw, ema = saved(ckpt, SAVED["generator"]), saved(ckpt, SAVED["generator_ema"])
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)
    settings = json.loads((final / "tmd_sampling.json").read_text())
    assert settings["method"] == method and settings["outer_steps"] == 2
    assert (settings.get("inner_steps") == 2) == (method == "tmd")


# ------------------------------------------------------------------ (d) kill and resume
@pytest.mark.parametrize("method", ["tmd", "dmd2v"])
def test_kill_and_resume_is_exact(runs, method, tmp_path):
    """Stop after 7 iterations (steps=7: mid generator cycle), resume to 24: identical final
    generator, EMA, fake score, discriminator and optimizer states as the uninterrupted run."""
    out, final, _ = runs[method]
    fit(build_method(tiny_cfg(tmp_path / "run", method=method, steps=7)))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [7]
    fit(build_method(tiny_cfg(tmp_path / "run", method=method)), resume="latest")
    same_files(out / "checkpoint-0000024", tmp_path / "run" / "checkpoint-0000024")
    a, b = saved(out / "checkpoint-0000024", ""), saved(tmp_path / "run" / "checkpoint-0000024", "")
    optim = [k for k in a if ".optim.state." in k]                       # {network}.optim.state.{param}.{key}
    assert {k.split(".")[0] for k in optim} == {"generator", "fake_score", "discriminator"} and a.keys() == b.keys()
    for key in optim:
        assert torch.equal(a[key], b[key]), key
    ref = {r["step"]: r for r in read_metrics(out)}
    got = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert sorted(got) == list(range(1, 25)) and all(got[s] == ref[s] for s in got)
    weights = "model.safetensors" if method == "tmd" else "diffusion_pytorch_model.safetensors"
    x, y = load_file(str(final / weights)), load_file(str(tmp_path / "run" / "student" / weights))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_nonfinite_guard_per_optimizer(tmp_path, monkeypatch):
    """A NaN fake-score loss at iteration 3 skips (and counts) only the fake score's update."""
    real = distill.fake_score_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss_dict, log = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            loss_dict = {"loss": loss_dict["loss"] * float("nan")}
        return loss_dict, log

    monkeypatch.setattr(distill, "fake_score_loss", poisoned)
    trainer = build_method(tiny_cfg(tmp_path, steps=5, checkpoint_every=100))
    fit(trainer)
    assert {k: g.skipped for k, g in trainer.guards.items()} == {"generator": 0, "fake_score": 1, "discriminator": 0}
    assert all(torch.isfinite(p).all() for p in trainer.fake_score.parameters())
    assert json.loads((tmp_path / "checkpoint-0000005" / "state.json").read_text())["skipped_steps"]["fake_score"] == 1


# ------------------------------------------------------------------ (f) KD pairs and warm-up
@pytest.fixture(scope="module")
def kd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    teacher_dir = tiny_teacher_folder(root / "teacher")
    args = ["--teacher", str(teacher_dir), "--data", "synthetic", "--n", "6", "--out", str(root / "pairs"),
            "--steps", "3", "--cfg", "2", "--batch-size", "4", "--shard-size", "4",
            "--latent-size", *map(str, LATENT[1:]), "--text-len", str(TEXT_LEN), "--seed", "0"]
    from tmd_train.kd_pairs import main
    assert main(args) == 0
    return teacher_dir, root / "pairs"


def test_kd_pairs_dataset(kd_folder):
    teacher_dir, pairs = kd_folder
    ds = LatentDataset(pairs)
    assert ds.kind == "kd" and len(ds) == 6 and len(ds.index["shards"]) == 2
    assert ds.shapes["noise"] == LATENT and ds.shapes["target"] == LATENT
    assert ds.metadata["steps"] == 3 and ds.metadata["cfg"] == 2
    # item 5 is the teacher's 3-step CFG-2 sample from its noise, with the data's text and negative
    src = SyntheticSource.for_teacher(TEACHER, 6, LATENT[1:], TEXT_LEN, seed=0)
    item, want = ds[5], src[5]
    assert torch.equal(item["text_emb"], want["text_emb"]) and torch.equal(item["text_mask"], want["text_mask"])
    neg_emb, neg_mask = src.negative()
    teacher = load_teacher(teacher_dir)
    x0 = sample_teacher(teacher, masked_text(item["text_emb"], item["text_mask"])[None],
                        negative_text=masked_text(neg_emb, neg_mask)[None], noise=item["noise"][None].float(),
                        steps=3, cfg=2.0, t_max=0.999).x0  # the ODE starts at the student's t_max
    torch.testing.assert_close(item["target"][None].float(), x0, atol=1e-6, rtol=1e-6)
    assert ds.metadata["t_max"] == 0.999
    assert not torch.equal(item["noise"], ds[4]["noise"])


def test_kd_warmup_lowers_the_loss_and_resumes(kd_folder, tmp_path):
    """KD warm-up (M=1): 16 regression steps lower the loss; they are steps 1..16 of the counter
    (only the generator steps), DMD iterations follow; resuming from inside the warm-up (step 8)
    reproduces the run exactly."""
    _, pairs = kd_folder
    over = dict(outer_steps=1, kd_pairs=str(pairs), kd_steps=16, kd_lr=3e-3, steps=6, checkpoint_every=8)
    trainer = build_method(tiny_cfg(tmp_path / "run", **over))
    log = record_updates(trainer)
    fit(trainer)
    assert [s for s, name in log if name == "generator"] == [*range(1, 17), 21]
    assert {s for s, name in log if name != "generator"} == set(range(17, 23))
    rows = read_metrics(tmp_path / "run")
    kd = [r["loss_kd"] for r in rows if "loss_kd" in r]
    assert len(kd) == 16 and all(math.isfinite(v) for v in kd)
    assert statistics.mean(kd[-4:]) < 0.8 * statistics.mean(kd[:4]), kd
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [8, 16, 22]
    ckpt8 = tmp_path / "run" / "checkpoint-0000008"
    optim = {k.split(".")[0] for k in saved(ckpt8, "") if ".optim.state." in k}
    assert optim == {"generator"}                     # the fake score's and discriminator's: not stepped, not saved
    assert json.loads((ckpt8 / "state.json").read_text())["optimizers"] == ["generator"]
    resumed = build_method(tiny_cfg(tmp_path / "resumed", **over))
    fit(resumed, resume=str(tmp_path / "run" / "checkpoint-0000008"))
    same_files(tmp_path / "run" / "checkpoint-0000022", tmp_path / "resumed" / "checkpoint-0000022")


# ------------------------------------------------------------------ (g) the output folder samples
@pytest.mark.parametrize("method", ["tmd", "dmd2v"])
def test_output_folder_samples_with_the_cli(runs, method, tmp_path, capsys):
    _, final, trainer = runs[method]
    emb = tmp_path / "prompt.safetensors"
    text = torch.randn(TEXT_LEN, TINY_CONFIG["text_dim"], generator=torch.Generator().manual_seed(1))
    save_file({"text_emb": text}, str(emb))
    out = tmp_path / "x.safetensors"
    video = ["--frames", "1", "--height", "32", "--width", "32"]       # latents [1, 4, 1, 4, 4]
    args = ["--model", str(final), "--prompt-embeds", str(emb), *video, "--seed", "4", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    if method == "tmd":                                  # the real command line once; in process otherwise
        proc = run_module("tmd_train.sample", args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stdout = proc.stdout
    else:
        assert sample_main(args) == 0
        stdout = capsys.readouterr().out
    got = load_file(str(out))["latents"]
    g = torch.Generator().manual_seed(4)
    if method == "tmd":
        student = TMDStudent.from_pretrained(final).eval()
        assert student.head_blocks == 2
        ema = saved(final.parent / "checkpoint-0000024", SAVED["generator_ema"])
        sd = student.state_dict()
        assert all(torch.equal(sd[k[len("generator."):]], v) for k, v in ema.items())
        want = sample_tmd(student, text[None], shape=(1, *LATENT), generator=g, M=2, N=2)
        assert "TMD student M=2 N=2 H=2 L=4" in stdout
    else:
        model = load_teacher(final)
        want = sample_few_step(model, text[None], shape=(1, *LATENT), generator=g, steps=2, shift=10.0)
        assert "DMD2-v student M=2: NFE 2.000" in stdout
    torch.testing.assert_close(got, want.x0, atol=0, rtol=0)


# ------------------------------------------------------------------ (h) config, defaults
def test_config_errors_name_the_key(tmp_path):
    cases = [(dict(kd_steps=2, kd_pairs="x"), "kd_steps"), (dict(method="gan"), "method"),
             (dict(kd_steps=2, outer_steps=1), "kd_pairs"), (dict(method="dmd2v", init_student="x"), "init_student"),
             (dict(disc_width=10, disc_groups=4), "disc_width"), (dict(generator_every=0), "generator_every"),
             (dict(ema_decay=1.0), "ema_decay"), (dict(fake_lr=-1.0), "fake_lr"),
             ({"dmd.tau_shift": 0}, "dmd.tau_shift must be > 0"), ({"dmd": {"tau_min": 0.5, "tau_max": 0.4}},
                                                                   "dmd.tau_min"),
             (dict(mixed_precision="fp8"), "mixed_precision"), (dict(outer_shift=0), "outer_shift")]
    for over, key in cases:
        with pytest.raises(ValueError, match=key):
            tiny_cfg(tmp_path, **over)
    with pytest.raises(ValueError, match="unknown config key 'generator_evry'"):
        load_config(Stage2Config, None, ["generator_evry=3"])
    for old in ("t_shift=3", "cfg_scale=3", "dmd_t_min=0.01"):                     # now under dmd.
        with pytest.raises(ValueError, match=f"unknown config key '{old.split('=')[0]}'"):
            load_config(Stage2Config, None, ["teacher=/x", old])
    with pytest.raises(ValueError, match="unknown config key 'dmd.t_max'"):
        load_config(Stage2Config, None, ["teacher=/x", "dmd.t_max=0.9"])
    with pytest.raises(ValueError, match="teacher is required"):
        load_config(Stage2Config, None, ["steps=3"])
    cfg = load_config(Stage2Config, None, ["teacher=/x", "method=dmd2v", "outer_steps=4", "unroll=false",
                                           "disc_blocks=[1, 2]", "kd_lr=1e-4", "dmd.cfg_scale=3", "dmd.tau_max=0.9"])
    assert (cfg.method, cfg.outer_steps, cfg.unroll, cfg.disc_blocks, cfg.kd_lr) == ("dmd2v", 4, False, [1, 2], 1e-4)
    assert (cfg.dmd.cfg_scale, cfg.dmd.tau_max, cfg.t_max) == (3.0, 0.9, 0.999)
    d = Stage2Config(teacher="x")
    assert (d.lr, d.weight_decay, d.adam_betas, d.generator_every, d.gan_weight, d.dmd.cfg_scale, d.dmd.tau_shift,
            d.outer_shift, d.head_blocks) == (1e-5, 0.01, (0.9, 0.99), 5, 0.03, 5.0, 5.0, 10.0, 5)


def test_no_arguments(monkeypatch, tmp_path, capsys):
    """No arguments: the toy world when its teacher is there, else exit 2 saying what to pass."""
    import tmd_train.toy as toy
    missing = tmp_path / "no-toy"
    monkeypatch.setattr(toy, "TOY_TEACHER_DIR", missing)
    assert run_main(stage2.main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "teacher=" in err and "data=" in err and str(missing) in err
    present = tiny_teacher_folder(tmp_path / "toy")
    monkeypatch.setattr(toy, "TOY_TEACHER_DIR", present)
    args = stage2.parse_args([])
    cfg, resume = args.config, args.resume
    assert cfg.teacher == str(present) and cfg.data == "shapes" and resume is None
    assert cfg.steps == stage2.TOY_STAGE2["steps"] and cfg.method == "tmd"
    cfg = stage2.parse_args(["teacher=/t", "data=synthetic"]).config              # a teacher given: no default
    assert cfg.teacher == "/t" and cfg.steps == 1000


# ------------------------------------------------------------------ (e) 2 processes (FSDP2 over gloo)
@pytest.mark.dist
def test_two_process_fsdp2(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): generator, fake score and teacher FSDP2-sharded, the
    discriminator replicated; the run completes (checkpoints with both ranks' RNG states, a
    loadable student), then the CLI resumes it on 2 processes."""
    over = dict(steps=6, checkpoint_every=3, batch_size=1, generator_every=3,
                init_student=str(trained_like_student(tmp_path / "init")))
    values = tiny_values(tmp_path / "dist", **over)
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items() if k != "teacher"]
    overrides += [f"teacher.{k}={json.dumps(v)}" for k, v in values["teacher"].items()]
    cmd = [str(TESTS / "methods" / "stage2_dist_worker.py"), str(tmp_path), *overrides]
    def clean() -> None:
        shutil.rmtree(tmp_path / "dist", ignore_errors=True)
        (tmp_path / "done").unlink(missing_ok=True)

    proc = torchrun(cmd, tmp_path, before_retry=clean)
    assert proc.returncode == 0, output(proc)
    assert (tmp_path / "done").read_text().split() == ["6", "2"]
    ckpt = tmp_path / "dist" / "checkpoint-0000006"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    TMDStudent.from_pretrained(tmp_path / "dist" / "student")
    rows = read_metrics(tmp_path / "dist")
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(math.isfinite(v) for r in rows for v in r.values())

    proc = torchrun(["-m", "tmd_train.stage2", *overrides, "steps=8", "--resume", "latest"], tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "stage2 (tmd): 8 steps (2 generator updates)" in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "dist")] == list(range(1, 9))


@pytest.mark.parametrize("method", ["tmd", "dmd2v"])
def test_bf16_autocast_run(tmp_path, method):
    """mixed_precision=bf16 (on CPU here; "auto" picks it on GPU): the frozen teacher in bf16 (Wan's
    float32 modules kept), float32 trainable weights, finite losses over a generator cycle."""
    trainer = build_method(tiny_cfg(tmp_path, method=method, mixed_precision="bf16", steps=5, checkpoint_every=100))
    assert trainer.autocast_dtype == torch.bfloat16
    teacher = trainer.teacher.teacher
    assert teacher.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert teacher.blocks[0].scale_shift_table.dtype == torch.float32
    for model in (trainer.generator, trainer.fake_score, trainer.disc):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fit(trainer)
    rows = read_metrics(tmp_path)
    assert len(rows) == 5 and all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[-1]["skipped_generator"] == 0 and "loss_dmd" in rows[-1]


def test_sample_grids_to_tensorboard(tmp_path):
    """sample_every=2: EMA sample grids (middle frame of 4 prompts side by side, in [0, 1]) are
    logged to TensorBoard at steps 2 and 3 (the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = build_method(tiny_cfg(tmp_path, steps=3, sample_every=2, checkpoint_every=100))
    fit(trainer)
    grid = trainer.sample_grid()
    assert grid.shape == (3, LATENT[2], 4 * LATENT[3]) and 0 <= float(grid.min()) and float(grid.max()) <= 1
    assert torch.equal(grid, trainer.sample_grid())                       # fixed noise and prompts
    acc = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples_ema")] == [2, 3]
    # the grid's collapse checks: scalars beside the images and one JSON line per check
    assert [e.step for e in acc.Scalars("collapse/constant")] == [2, 3]
    rows = [json.loads(line) for line in (tmp_path / "collapse_checks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and all(r["num_clips"] == 4 for r in rows)
    assert [e.value for e in acc.Scalars("collapse/duplicate")] == [r["counts"]["duplicate"] for r in rows]


def test_sample_grid_collapse_report():
    """The grid's collapse checks flag constant, frozen and prompt-ignoring (duplicate) samples and stay
    quiet on the toy world's clips; latent clips (16 channels, unit variance) are checked too."""
    from tmd_train.methods.distill import Distillation
    from tmd_train.toy.clips import make_batch

    real = make_batch(4, seed=11)[0]                                              # [4, 3, 8, 32, 32] in [-1, 1]
    assert Distillation.collapse_report(real)["num_flagged"] == 0
    bad = real.clone()
    bad[0] = 0.3                                                                  # solid colour
    bad[1] = real[1, :, :1].expand_as(real[1])                                    # one frame held
    bad[3] = real[2]                                                              # same clip for two prompts
    report = Distillation.collapse_report(bad)
    flags = {v["name"]: set(v["flags"]) for v in report["videos"]}
    assert flags == {"clip-0": {"constant", "static"}, "clip-1": {"static"}, "clip-2": {"duplicate"},
                     "clip-3": {"duplicate"}}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 3, 8, 8, generator=g)
    assert Distillation.collapse_report(latents)["num_flagged"] == 0
    latents[2] = latents[2, :, :1]                                                # frozen latent video
    assert Distillation.collapse_report(latents)["counts"] == {"constant": 0, "static": 1, "duplicate": 0}


def test_shipped_wan_config_is_the_papers_recipe():
    from tmd_train.models.discriminator import Conv3DDiscriminator, default_blocks
    cfg = load_config(Stage2Config, ROOT / "configs" / "stage2_wan2.1_1.3b.yaml")
    assert (cfg.method, cfg.head_blocks, cfg.inner_steps, cfg.outer_steps, cfg.unroll) == ("tmd", 5, 2, 2, True)
    assert (cfg.lr, cfg.fake_lr, cfg.disc_lr, cfg.weight_decay, cfg.adam_betas) == (1e-5, None, None, 0.01, (0.9, 0.99))
    assert (cfg.dmd.cfg_scale, cfg.dmd.tau_shift, cfg.outer_shift, cfg.gan_weight, cfg.generator_every) == (
        5.0, 5.0, 10.0, 0.03, 5)
    assert (cfg.dmd.tau_min, cfg.dmd.tau_max) == (0.001, 0.999)
    assert default_blocks(30) == (15, 22, 29)
    params = Conv3DDiscriminator.expected_parameters(1536, cfg.disc_width, cfg.disc_depth, 3)
    assert 66e6 < params < 72e6  # the paper's 68 M
