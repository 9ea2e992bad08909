"""Stage 1 (``method=tm_meanflow`` and ``tm``) on a tiny random teacher (CPU): training lowers the
loss, exact resume, the non-finite guard, checkpoint layout/keep-last/--resume latest, the final
student folder, config loading, and (slow) a 2-process FSDP2 run over gloo whose first-step
gradients match the 1-process run on the same global batch."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.run import TESTS, output, torchrun
from support.tiny import TINY_CONFIG, randomize_zero_init

import tmd_train.methods.tm_meanflow as tm_meanflow_method
import tmd_train.stage1 as stage1
from tmd_train.data.format import DatasetWriter
from tmd_train.engine.checkpoint import list_checkpoints, resolve_resume
from tmd_train.engine.config import config_from_dict, load_config
from tmd_train.engine.logging import read_metrics
from tmd_train.engine.trainer import fit
from tmd_train.errors import run_main
from tmd_train.export import export_checkpoint
from tmd_train.methods import Stage1Config, build_method
from tmd_train.methods.tm import TM
from tmd_train.models import TMDStudent, load_teacher

ROOT = Path(__file__).resolve().parents[2]


def tiny_values(output_dir, **over) -> dict:
    """A tiny run: 4-block D=16 teacher, head H=2, 8 synthetic samples of [4, 1, 4, 4] (4 tokens)."""
    teacher = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}
    values = dict(teacher=teacher, head_blocks=2, synthetic_samples=8, synthetic_latent_size=[1, 4, 4],
                  synthetic_text_len=3, batch_size=8, lr=1e-2, steps=50, log_every=1, checkpoint_every=25,
                  keep_last=3, output_dir=str(output_dir), seed=0)
    values.update(over)
    return values


def tiny_cfg(output_dir, **over) -> Stage1Config:
    return config_from_dict(Stage1Config, tiny_values(output_dir, **over))


def objective(**values) -> dict:
    """Overrides of the objective's sub-config: ``{"objective.<key>": value}``."""
    return {f"objective.{k}": v for k, v in values.items()}


def losses(output_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir)}


@pytest.fixture(scope="module")
def run50(tmp_path_factory):
    """50 steps (cfg_scale 1: the plain conditional target, whose loss is not saturated by the
    random teacher's CFG term), checkpoints at 25 and 50."""
    out = tmp_path_factory.mktemp("run50")
    cfg = tiny_cfg(out, **objective(cfg_scale=1.0))
    final = fit(build_method(cfg))
    return out, cfg, final


# ------------------------------------------------------------------ training
def test_training_lowers_the_loss(run50):
    out, _, _ = run50
    loss = [row["loss"] for row in read_metrics(out)]
    assert len(loss) == 50
    first, last = statistics.mean(loss[:10]), statistics.mean(loss[-10:])
    assert last < 0.92 * first, (first, last)


def test_outputs_and_final_student(run50, tmp_path):
    out, cfg, final = run50
    assert final == out / "student"
    assert [s for s, _ in list_checkpoints(out)] == [25, 50]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    ckpt = out / "checkpoint-0000050"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "dcp", "export", "rng_state_0.pt", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 50 and state["skipped_steps"] == 0
    assert load_config(Stage1Config, ckpt / "config.yaml") == cfg
    assert load_config(Stage1Config, out / "config.yaml") == cfg
    student = TMDStudent.from_pretrained(final)
    assert student.head_blocks == 2
    final_sd = load_file(str(final / "model.safetensors"))
    ckpt_sd = load_file(str(export_checkpoint(ckpt, tmp_path / "exported", progress=False) / "model.safetensors"))
    assert final_sd.keys() == ckpt_sd.keys()
    assert all(torch.equal(final_sd[k], ckpt_sd[k]) for k in final_sd)
    # it trained: the zero-initialised gate of the fusion moved
    assert student.fusion.modulation.weight.abs().sum() > 0
    metrics = read_metrics(out)
    assert {"loss", "mse", "grad_norm", "lr", "samples_per_s", "skipped_steps", "frac_fd"} <= set(metrics[0])
    assert (out / "logs").is_dir() and any((out / "logs").iterdir())


def test_resume_reproduces_the_run(run50, tmp_path):
    """Resuming from checkpoint 25 (in a fresh output folder) repeats steps 26–50 bit for bit:
    the same losses and the same final weights."""
    out, _, final = run50
    out2 = tmp_path / "resumed"
    final2 = fit(build_method(tiny_cfg(out2, **objective(cfg_scale=1.0))), resume=str(out / "checkpoint-0000025"))
    ref, got = losses(out), losses(out2)
    assert sorted(got) == list(range(26, 51))
    assert all(got[s] == ref[s] for s in got), [(s, got[s], ref[s]) for s in got if got[s] != ref[s]]
    a, b = load_file(str(final / "model.safetensors")), load_file(str(final2 / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_via_cli(tmp_path):
    """``--resume latest`` continues from the newest checkpoint of the output folder (and starts
    fresh when there is none); metrics stay one line per step."""
    cfg_file = tmp_path / "cfg.yaml"
    values = tiny_values(tmp_path / "run", steps=3, checkpoint_every=2, keep_last=1)
    cfg_file.write_text(yaml.safe_dump(values))
    assert stage1.main(["--config", str(cfg_file), "--resume", "latest"]) == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]          # keep_last=1
    assert stage1.main(["--config", str(cfg_file), "steps=5", "--resume", "latest"]) == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5]
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert resolve_resume("latest", tmp_path / "run").name == "checkpoint-0000005"
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path / "run")


def test_nonfinite_guard_skips_and_counts(tmp_path, monkeypatch):
    """A NaN loss at step 3 (and so NaN gradients): the update is skipped (weights and AdamW step
    count unchanged), counted, and training goes on."""
    real = tm_meanflow_method.tm_meanflow
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss_dict, log = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            loss_dict = {"loss": loss_dict["loss"] * float("nan")}
        return loss_dict, log

    monkeypatch.setattr(tm_meanflow_method, "tm_meanflow", poisoned)
    trainer = build_method(tiny_cfg(tmp_path, steps=4))
    params = dict(trainer.student.named_parameters())

    def snapshot():
        return {k: v.detach().clone() for k, v in params.items()}

    batches = trainer.batches(1)
    for step in range(1, 5):
        before = snapshot()
        logs = trainer.train_step(step, next(batches))
        stepped = logs["stepped"] == 1.0
        after = snapshot()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert stepped == (step != 3) and unchanged == (step == 3)
        assert all(torch.isfinite(v).all() for v in after.values())
        assert all(p.grad is None for p in params.values())
    assert trainer.guard.skipped == 1
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}


def test_gradient_checkpointing_same_gradients(tmp_path):
    """gradient_checkpointing=True recomputes blocks in backward: same step-1 gradients."""
    grads = []
    for ckpt in (False, True):
        trainer = build_method(tiny_cfg(tmp_path / str(ckpt), steps=1, gradient_checkpointing=ckpt))
        trainer.forward_backward(1, next(trainer.batches(1)))
        grads.append(trainer.full_gradients())
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=k)


def test_bf16_autocast_run(tmp_path):
    """mixed_precision=bf16 (on CPU here; "auto" picks it on GPU): bf16 autocast steps, the frozen
    teacher in bf16 with Wan's float32 modules kept, float32 master weights."""
    trainer = build_method(tiny_cfg(tmp_path, steps=2, mixed_precision="bf16", **objective(cfg_source="teacher")))
    assert trainer.autocast_dtype == torch.bfloat16
    assert trainer.teacher.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert trainer.teacher.blocks[0].scale_shift_table.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    fit(trainer)
    rows = read_metrics(tmp_path)
    assert [r["stepped"] for r in rows] == [1.0, 1.0] and all(0 < r["loss"] < 1 for r in rows)
    assert build_method(tiny_cfg(tmp_path / "cpu")).autocast_dtype is None          # auto: off on CPU


def test_dataset_folder(tmp_path, gen):
    """data=<folder>: a dataset written in the docs/design.md §5 format trains like the synthetic one."""
    n, L, D = 6, 3, TINY_CONFIG["text_dim"]
    with DatasetWriter(tmp_path / "ds", shard_size=4) as w:
        w.add_batch([f"p{i}" for i in range(n)], latents=torch.randn(n, 4, 1, 4, 4, generator=gen),
                    text_emb=torch.randn(n, L, D, generator=gen), text_mask=torch.ones(n, L, dtype=torch.bool))
        w.set_negative(torch.randn(L, D, generator=gen), torch.ones(L, dtype=torch.bool))
    fit(build_method(tiny_cfg(tmp_path / "run", data=str(tmp_path / "ds"), steps=2, batch_size=3)))
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2]
    with pytest.raises(FileNotFoundError):
        build_method(tiny_cfg(tmp_path / "run2", data=str(tmp_path / "missing")))


def test_plain_tm_method(tmp_path):
    """method=tm: the TM-MF method with r = s on every sample (no derivative rows), same keys."""
    cfg = tiny_cfg(tmp_path, method="tm", steps=3, **objective(equal_fraction=0.0))
    method = build_method(cfg)
    assert isinstance(method, TM) and method.model.objective.variant == "tm"
    fit(method)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["frac_fd"] == 0.0 for r in rows)
    assert load_config(Stage1Config, tmp_path / "config.yaml") == cfg
    assert build_method(tiny_cfg(tmp_path / "mf", **objective(equal_fraction=0.0))).model.objective.variant == \
        "tm_meanflow"


# ------------------------------------------------------------------ config
def test_config_yaml_overrides_and_validation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"teacher": {"num_layers": 4, "patch_size": [1, 2, 2]}, "lr": 1e-4, "steps": 7}))
    cfg = load_config(Stage1Config, f, ["lr=3e-5", "teacher.num_layers=2", "adam_betas=[0.8, 0.9]",
                                        "objective.cfg_source=teacher", "gradient_checkpointing=true"])
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float) and cfg.steps == 7
    assert cfg.teacher == {"num_layers": 2, "patch_size": [1, 2, 2]}
    assert cfg.adam_betas == (0.8, 0.9) and cfg.objective.cfg_source == "teacher"
    assert cfg.gradient_checkpointing is True
    cases = [(["lrr=1"], "unknown config key 'lrr'"), (["steps=1.5"], "steps: expected an int"),
             (["gradient_checkpointing=2"], "expected a bool"), (["adam_betas=[0.9]"], "expected 2 values"),
             (["steps=0"], "steps must be >= 1"), (["objective.cfg_source=ema"], "objective.cfg_source"),
             (["objective.equal_fraction=2"], "objective.equal_fraction"),
             (["cfg_source=student"], "unknown config key 'cfg_source'"),
             (["objective.cfg_scle=2"], "unknown config key 'objective.cfg_scle'"),
             (["objective.variant=tm"], "unknown config key 'objective.variant'"),
             (["method=dmd2v"], "method must be one of"), (["mixed_precision=fp8"], "mixed_precision"),
             (["fusion=sum"], "fusion"), (["lr"], "key=value"), (["steps.x=1"], "not a mapping")]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            load_config(Stage1Config, f, overrides)
    with pytest.raises(ValueError, match="teacher is required"):
        load_config(Stage1Config, None, [])
    with pytest.raises(FileNotFoundError):
        load_config(Stage1Config, tmp_path / "missing.yaml")


# ------------------------------------------------------------------ 2 processes (FSDP2 over gloo)
def trained_like_student(tmp_path, **over) -> Path:
    """A student folder for the tiny config whose zero-initialised layers (fusion gate and
    modulation, α, the s and s-r embeddings) are non-zero, as after some training: at init their
    gradients vanish (e.g. ∂/∂α ∝ gate = 0), which would hide errors in their handling."""
    trainer = build_method(tiny_cfg(tmp_path / "init-run", **over))
    randomize_zero_init(trainer.student, torch.Generator().manual_seed(0), scale=0.1)
    trainer.export(tmp_path / "init")
    return tmp_path / "init"


def test_init_student(tmp_path):
    folder = trained_like_student(tmp_path)
    trainer = build_method(tiny_cfg(tmp_path / "run", init_student=str(folder)))
    ref = load_file(str(folder / "model.safetensors"))
    got = trainer.student.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="head_blocks"):
        build_method(tiny_cfg(tmp_path / "run2", init_student=str(folder), head_blocks=1))
    other = dict(tiny_values(tmp_path)["teacher"], ffn_dim=48)
    with pytest.raises(ValueError, match="teacher architecture"):
        build_method(tiny_cfg(tmp_path / "run3", init_student=str(folder), teacher=other,   # the teacher is loaded
                              **objective(cfg_source="teacher")))                           # only for this source
    with pytest.raises(ValueError, match="teacher architecture"):                            # not loaded: its config
        build_method(tiny_cfg(tmp_path / "run4", init_student=str(folder), teacher=other))   # is checked all the same
    teacher_dir = tmp_path / "teacher"
    load_teacher(other, torch_dtype=torch.float32).save_pretrained(teacher_dir)             # a teacher folder too
    with pytest.raises(ValueError, match="teacher architecture"):
        build_method(tiny_cfg(tmp_path / "run5", init_student=str(folder), teacher=str(teacher_dir)))


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_fsdp2_matches_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2 on every block and the root): the run completes,
    and its step-1 gradients equal those of one process accumulating the same two chunks (from
    a student whose zero-initialised layers are non-zero, so every gradient is)."""
    over = dict(steps=3, checkpoint_every=2, batch_size=2, **objective(cfg_scale=3.0, equal_fraction=0.5),
                init_student=str(trained_like_student(tmp_path)))
    values = tiny_values(tmp_path / "dist", **over)
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items() if k != "teacher"]
    overrides += [f"teacher.{k}={json.dumps(v)}" for k, v in values["teacher"].items()]
    proc = torchrun([str(TESTS / "methods" / "stage1_dist_worker.py"), str(tmp_path), *overrides], tmp_path)
    assert proc.returncode == 0, output(proc)
    assert (tmp_path / "done").read_text().strip() == "3"
    ckpt = tmp_path / "dist" / "checkpoint-0000003"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    TMDStudent.from_pretrained(tmp_path / "dist" / "student")

    # the CLI itself, 2 processes, resuming the run above (FSDP2 state loaded from the checkpoint)
    proc = torchrun(["-m", "tmd_train.stage1", *overrides, "steps=5", "--resume", "latest"], tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "stage1: 5 steps, 0 skipped" in proc.stdout
    assert [row["step"] for row in read_metrics(tmp_path / "dist")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in list_checkpoints(tmp_path / "dist")] == [3, 4, 5]          # keep_last=3

    single = build_method(tiny_cfg(tmp_path / "single", grad_accum_steps=2, **over))
    single.forward_backward(1, next(single.batches(1)))
    ref = single.full_gradients()
    got = torch.load(tmp_path / "grads.pt")
    assert got.keys() == ref.keys()
    assert ref["fusion.alpha"].abs() > 0                      # the replicated 0-d parameter
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4, msg=k)


def test_shipped_config_loads():
    cfg = load_config(Stage1Config, ROOT / "configs" / "stage1_wan2.1_1.3b.yaml")
    assert (cfg.method, cfg.head_blocks, cfg.objective.inner_steps, cfg.objective.outer_steps, cfg.lr) == (
        "tm_meanflow", 5, 2, 2, 3e-5)
    assert cfg.objective.delta == 5e-3 and cfg.objective.equal_fraction == 0.75


def test_no_arguments_uses_the_toy_world(monkeypatch, tmp_path, capsys):
    """No arguments: the toy world when its teacher is there, else exit 2 saying what to pass."""
    import tmd_train.toy as toy
    missing = tmp_path / "no-toy"
    monkeypatch.setattr(toy, "TOY_TEACHER_DIR", missing)
    assert run_main(stage1.main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "teacher=" in err and "data=" in err and str(missing) in err
    present = tmp_path / "toy"
    present.mkdir()
    (present / "config.json").write_text("{}")
    (present / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    monkeypatch.setattr(toy, "TOY_TEACHER_DIR", present)
    args = stage1.parse_args([])
    cfg, resume = args.config, args.resume
    assert cfg.teacher == str(present) and cfg.data == "shapes" and resume is None
    assert (cfg.head_blocks, cfg.steps) == (1, stage1.TOY_STAGE1["steps"])
    cfg = stage1.parse_args(["teacher=/t"]).config  # a teacher given: no toy default
    assert cfg.teacher == "/t" and cfg.data == "synthetic"
