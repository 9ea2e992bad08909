"""The toy world's teacher: the trainer (`python -m tmd_train.toy.train_teacher`) and the shipped weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tmd_train.errors import UserError
from tmd_train.models.teacher import load_teacher
from tmd_train.sampling import sample_teacher
from tmd_train.toy import (
    TOY_CLIP_SHAPE,
    TOY_TEACHER_CONFIG,
    TOY_TEACHER_DIR,
    require_toy_teacher,
    text_encoder,
    toy_teacher_available,
)
from tmd_train.toy import train_teacher as T
from tmd_train.toy.tinybench import tinybench


def _weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_trainer_writes_a_loadable_folder_and_resumes_exactly(tmp_path):
    args = ["--steps", "3", "--batch-size", "2", "--warmup", "1", "--checkpoint-every", "100", "--log-every", "1"]
    assert T.main([*args, "--out", str(tmp_path / "a")]) == 0
    # the same run in two invocations: 2 steps, stop (checkpoint), then resume to 3
    assert T.main([*args, "--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "b" / "config.json").exists()
    assert T.main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = load_teacher(tmp_path / "a")
    assert model.config.num_layers == TOY_TEACHER_CONFIG["num_layers"]
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["steps"] == 3 and len(record["loss_history"]) == 3
    # training moved the weights away from the seeded initialisation
    torch.manual_seed(0)
    init = load_teacher(dict(TOY_TEACHER_CONFIG)).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_trainer_rejects_bad_arguments(tmp_path):
    out = str(tmp_path / "teacher")
    with pytest.raises(UserError, match="--steps"):
        T.main(["--out", out, "--steps", "0"])
    with pytest.raises(UserError, match="--lr"):
        T.main(["--out", out, "--lr", "-1"])
    with pytest.raises(UserError, match="--out"):
        T.main(["--steps", "3"])
    assert not (tmp_path / "teacher").exists()


def test_lr_schedule_warms_up_then_decays():
    assert T.lr_factor(0, 100, 10) == 0.0
    assert T.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert T.lr_factor(100, 100, 10) == pytest.approx(0.05)
    values = [T.lr_factor(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_training_batch_is_deterministic_and_drops_prompts():
    x1, t1 = T.training_batch(5, 64, 0.5, torch.Generator().manual_seed(1))
    x2, t2 = T.training_batch(5, 64, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert x1.shape == (64, *TOY_CLIP_SHAPE) and t1.shape == (64, text_encoder.L_TEXT, text_encoder.TEXT_DIM)
    empty = (t1.abs().sum((1, 2)) == 0).sum().item()
    assert 16 <= empty <= 48  # ~half of the prompts are the empty (unconditional) one


needs_toy = pytest.mark.skipif(not toy_teacher_available(), reason="the toy teacher is not shipped in this checkout")


@needs_toy
def test_shipped_teacher_is_trained():
    """Its flow-matching loss on fresh clips is far below an untrained model's."""
    torch.manual_seed(0)
    trained = load_teacher(require_toy_teacher()).eval()
    untrained = load_teacher(dict(TOY_TEACHER_CONFIG)).eval()
    assert (TOY_TEACHER_DIR / "training.json").is_file()
    x, text = T.training_batch(10_000, 16, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lt = T.flow_matching_loss(trained, x, text, torch.Generator().manual_seed(2)).item()
        lu = T.flow_matching_loss(untrained, x, text, torch.Generator().manual_seed(2)).item()
    assert lt < 0.5 * lu, (lt, lu)


@needs_toy
def test_shipped_teacher_follows_prompts():
    """A few guided samples: the evaluator reads the prompted attributes far above chance (~1/3)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = load_teacher(require_toy_teacher()).eval()
    prompts = ["a red circle moving left", "a blue bar moving up", "a green ring moving right",
               "a yellow circle moving down", "a blue ring moving left", "a red bar moving down"]
    text, _ = text_encoder.encode(prompts)
    neg = text_encoder.encode_negative()[0].unsqueeze(0)
    out = sample_teacher(teacher, text, negative_text=neg, shape=(len(prompts), *TOY_CLIP_SHAPE),
                         generator=torch.Generator().manual_seed(0), steps=16, cfg=5.0)
    assert out.nfe == 32
    scores = tinybench(out.x0.clamp(-1, 1), prompts, n_ref=24)
    assert scores["semantic"] > 50, scores  # chance: 27.8


def test_constant_schedule_extends_on_resume_and_refuses_other_recipes(tmp_path):
    """A constant-lr run stopped (--stop-after, then --time-limit) and resumed with another --steps equals one
    planned that long; the checkpoint keeps EMA snapshots and refuses a resume with another recipe;
    --init-from starts from a model folder; --export publishes the checkpoint's EMA."""
    args = ["--batch-size", "2", "--warmup", "1", "--schedule", "constant", "--checkpoint-every", "100",
            "--log-every", "1", "--init-from", str(TOY_TEACHER_DIR), "--lr", "1e-4"]
    assert T.main([*args, "--out", str(tmp_path / "a"), "--steps", "4"]) == 0
    b = str(tmp_path / "b")
    assert T.main([*args, "--out", b, "--steps", "10", "--stop-after", "2"]) == 0
    with pytest.raises(UserError, match="lr=0.0001"):
        T.main([*args[:-1], "2e-4", "--out", b, "--steps", "4", "--resume"])
    assert T.main([*args, "--out", b, "--steps", "4", "--resume", "--time-limit", "0", "--snapshot-every", "5"]) == 0
    assert not (tmp_path / "b" / "config.json").exists()  # stopped after its first step (step 3)
    snap = tmp_path / "b.ckpt" / "snapshots" / "step_000003"
    assert (snap / "config.json").is_file()  # the EMA at the stop, loadable as a model folder
    assert T.main([*args, "--out", b, "--steps", "4", "--resume"]) == 0
    a, bw = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], bw[k]), k
    record = json.loads((tmp_path / "b" / "training.json").read_text())
    assert record["planned_steps"] == [10, 4] and len(record["commands"]) == 3 and record["schedule"] == "constant"
    assert record["init_sha256"] == json.loads((tmp_path / "a" / "training.json").read_text())["init_sha256"]
    # --export writes the EMA of the latest checkpoint (step 3) to a model folder; the shipped one needs a flag
    with pytest.raises(UserError, match="--replace-shipped"):
        T.main(["--out", b, "--export", str(TOY_TEACHER_DIR)])
    assert T.main(["--out", b, "--export", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "training.json").read_text())["steps"] == 3
    c, at3 = _weights(tmp_path / "c"), load_file(str(snap / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(c[k], at3[k]) for k in c) and any(not torch.equal(c[k], a[k]) for k in c)
    shipped = _weights(TOY_TEACHER_DIR)
    assert max((a[k] - shipped[k]).abs().max().item() for k in a) < 0.01  # continued, not re-initialised
    assert any(not torch.equal(a[k], shipped[k]) for k in a)
