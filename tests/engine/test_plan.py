"""The memory planner (``python -m tmd_train.plan``): its per-category and peak estimate, made on fake
tensors under a fake process group, must match the same iteration run for real (real CPU tensors, the
same FSDP2 sharding over the same fake process group, whose collectives do nothing) within 15 %."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from support.run import ROOT, output, run_module
from support.tiny import TINY_CONFIG

from tmd_train import plan
from tmd_train.methods import Stage2Config

WORLD = 2
LATENT = (3, 8, 8)
TEXT_LEN = 5
# two blocks keep the fake run short (its cost is per op, not per element)
TEACHER = {**TINY_CONFIG, "patch_size": list(TINY_CONFIG["patch_size"]), "num_layers": 2}


def assert_close(estimated: plan.Plan, measured: plan.Plan, rel: float = 0.15) -> None:
    """Every category and the peak within ``rel`` (categories below 2 % of the peak: within 2 % of it)."""
    assert measured.peak > 0
    assert abs(estimated.peak - measured.peak) <= rel * measured.peak, (estimated.categories, measured.categories)
    for name, value in measured.categories.items():
        slack = max(rel * value, 0.02 * measured.peak)
        assert abs(estimated.categories[name] - value) <= slack, (name, estimated.categories, measured.categories)


def test_stage1_cli_plan_matches_a_real_iteration(tmp_path, capsys) -> None:
    """The CLI's plan of a toy stage-1 config (FD pass on every row, CFG on every row, bf16 autocast,
    FSDP2 over 2 ranks) equals the memory of the same iteration run on real tensors."""
    config = {"method": "tm_meanflow", "teacher": "checkpoints/not-here", "data": "data/not-here",
              "head_blocks": 1, "batch_size": 2, "mixed_precision": "bf16", "gradient_checkpointing": True,
              "objective": {"equal_fraction": 0.0, "cond_dropout": 0.0}}
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(config))
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps(TEACHER))
    out = tmp_path / "plan.json"
    plan.main(["--config", str(path), f"teacher={arch}", "--world-size", str(WORLD), "--latent", "3x8x8",
               "--text-len", str(TEXT_LEN), "--gpu-memory", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer state", "activations", "temporaries", "peak"):
        assert f"  {row} " in printed, printed
    assert "fits in 1 GiB per GPU" in printed and str(arch / "config.json") in printed
    written = json.loads(out.read_text())
    assert written["fits"] is True and written["world_size"] == WORLD and written["latent"] == list(LATENT)
    estimated = plan.Plan(**{k: written[k] for k in ("method", "world_size", "batch_size", "grad_accum_steps",
                                                     "text_len", "precision", "teacher", "iteration",
                                                     "categories", "peak", "seconds")}, latent=LATENT)
    assert estimated.peak == sum(estimated.categories.values())

    cfg = plan.load_plan_config(path, [])
    cfg = dataclasses.replace(cfg, teacher=TEACHER, data="synthetic")
    measured = plan.estimate(cfg, WORLD, latent=LATENT, text_len=TEXT_LEN, fake=False)
    assert_close(estimated, measured)
    assert measured.categories["optimizer state"] > 0 and measured.categories["activations"] > 0


def test_stage2_plan_matches_a_real_iteration() -> None:
    """A toy stage-2 generator iteration (roll-out through 2 inner steps with gradients, DMD + GAN,
    then the fake-score and discriminator updates; float32, no checkpointing — the stage-1 test covers
    bf16 autocast and recomputation), planned and run for real."""
    cfg = Stage2Config(teacher=TEACHER, head_blocks=1, inner_steps=2, batch_size=2, mixed_precision="no",
                       disc_width=32, disc_groups=4, generator_every=1)
    estimated = plan.estimate(cfg, WORLD, latent=LATENT, text_len=TEXT_LEN, gpu=False, fake=True)
    measured = plan.estimate(cfg, WORLD, latent=LATENT, text_len=TEXT_LEN, gpu=False, fake=False)
    assert_close(estimated, measured)
    for row in ("parameters", "optimizer state", "EMA", "activations"):
        assert measured.categories[row] > 0, measured.categories
    assert "generator update" in estimated.iteration and "discriminator" in estimated.iteration


def test_presets_and_errors(tmp_path) -> None:
    """Teacher presets (the released Wan2.1 transformer configs) and one-line errors for bad input."""
    arch, note = plan.resolve_teacher("checkpoints/Wan2.1-T2V-14B-Diffusers", None)
    assert (arch["num_layers"], arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"]) == \
        (40, 5120, 13824) and "preset" in note
    arch, _ = plan.resolve_teacher("somewhere", "wan2.1-t2v-1.3b")
    assert (arch["num_layers"], arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"],
            arch["text_dim"], arch["in_channels"]) == (30, 1536, 8960, 4096, 16)
    assert plan.parse_latent("21x60x104") == (21, 60, 104)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"method": "tmd", "teacher": "checkpoints/mystery"}))
    proc = run_module("tmd_train.plan", ["--config", str(config), "--world-size", "2"], cwd=ROOT)
    assert proc.returncode == 2 and "--teacher-preset" in proc.stderr and proc.stderr.count("\n") == 1, output(proc)
    with pytest.raises(ValueError, match="--latent"):
        plan.main(["--config", str(config), "--world-size", "2", "--latent", "3x8", "--teacher-preset",
                   "wan2.1-t2v-1.3b"])
    with pytest.raises(ValueError, match="--world-size"):
        plan.main(["--config", str(config), "--world-size", "0"])


@pytest.mark.parametrize("text", ["3x8", "0x8x8", "axbxc"])
def test_bad_latent(text: str) -> None:
    with pytest.raises(ValueError, match="--latent"):
        plan.parse_latent(text)


def test_worst_case_resolution() -> None:
    """Under fake tensors a boolean selection selects every row and ``any`` finds nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), plan.WorstCase():
        mask = torch.rand(5) < 0.1
        assert mask.nonzero().shape == (5, 1)
        assert torch.zeros(5, 3)[mask].shape == (5, 3)
        assert not bool(mask.any()) and bool(mask.all())
        assert float(torch.rand(())) == 1.0



def test_fsdp_internals_guard(monkeypatch) -> None:
    """The planner hooks FSDP2 internals; a torch without them is one UserError naming the version, not an
    AttributeError deep inside a plan."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from tmd_train.errors import UserError

    assert plan.fsdp_param_group_class() is FSDPParamGroup
    monkeypatch.delattr(FSDPParamGroup, "wait_for_unshard")
    with pytest.raises(UserError, match=r"FSDPParamGroup\.wait_for_unshard.*torch 2\."):
        plan.fsdp_param_group_class()
