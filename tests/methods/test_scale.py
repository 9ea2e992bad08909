"""Memory features of the trainers (docs/design.md §7) on tiny models (CPU): the LoRA fake score
(the teacher exactly at init, only its adapters train), checkpointing of the teacher's GAN feature
pass (same gradients, fewer saved activations, adapters off in the recomputation), models of a
teacher folder built on the meta device and filled from the safetensors (the same weights as the
CPU load), stage-2 gradient accumulation, and one 2-process FSDP2 run over gloo (sharded loading,
LoRA and accumulation against the 1-process run, bf16 mixed-precision all-gathers)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.run import ROOT, TESTS, output, torchrun
from support.tiny import TINY_CONFIG, tiny_inputs, tiny_teacher
from support.wan_folder import build_wan_folder

from tmd_train.engine.config import config_from_dict, load_config
from tmd_train.engine.trainer import fit
from tmd_train.errors import ConfigError
from tmd_train.methods import Stage2Config, build_method
from tmd_train.methods.distill import FrozenTeacher
from tmd_train.methods.networks import FakeScoreConfig, add_lora, is_adapter_name, set_adapters
from tmd_train.methods.tm_meanflow import Stage1Config
from tmd_train.models import TMDStudent, load_teacher
from tmd_train.models.discriminator import teacher_block_features
from tmd_train.objectives.dmd import teacher_velocity

TEACHER = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}
SMALL = dict(head_blocks=2, synthetic_samples=8, synthetic_latent_size=[1, 4, 4], synthetic_text_len=3, lr=1e-3,
             disc_width=8, disc_groups=4, seed=0)
LORA = {"fake_score.kind": "lora", "fake_score.lora_rank": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    return build_wan_folder(tmp_path_factory.mktemp("scale") / "wan")


def stage2(tmp_path, **over):
    return build_method(config_from_dict(Stage2Config, {**SMALL, "teacher": TEACHER, "batch_size": 2, "steps": 5,
                                                        "output_dir": str(tmp_path / "run"), **over}))


# ------------------------------------------------------------------ LoRA fake score
def test_lora_fake_score_is_the_teacher_at_init_and_trains_only_its_adapters(tmp_path):
    method = stage2(tmp_path, **LORA)
    fake, root = method.fake_score, method.teacher
    adapters = {n for n, _ in root.named_parameters() if is_adapter_name(n)}
    assert adapters and len(adapters) == len(list(fake.parameters()))
    assert {id(p) for p in fake.parameters()} == {id(p) for n, p in root.named_parameters() if n in adapters}
    opt = {id(p) for g in method.optimizers["fake_score"].param_groups for p in g["params"]}
    assert opt == {id(p) for p in fake.parameters()}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for n, p in root.named_parameters() if n not in adapters)
    x, t, text = tiny_inputs(2, torch.Generator().manual_seed(1))
    x = x[:, :, :1, :4, :4]
    text = text[:, :3]
    with torch.no_grad():
        assert torch.equal(teacher_velocity(fake, x, t, text), teacher_velocity(root, x, t, text))
    before = {n: p.detach().clone() for n, p in root.named_parameters()}
    disc = {n: p.detach().clone() for n, p in method.disc.named_parameters()}
    method.train_step(1, next(iter(method.batches(1))))                    # a critic iteration
    changed = {n for n, p in root.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapters and any(".lora_B." in n for n in changed)
    assert all(p.grad is None for p in root.parameters())
    assert any(not torch.equal(p, disc[n]) for n, p in method.disc.named_parameters())
    with torch.no_grad():                           # adapters on: the fake score has moved, the real one has not
        assert not torch.equal(teacher_velocity(fake, x, t, text), teacher_velocity(root, x, t, text))
        assert torch.equal(teacher_velocity(root, x, t, text), teacher_velocity(method.teacher.teacher, x, t, text))


def test_lora_and_accumulation_resume_exactly(tmp_path):
    """A run with the LoRA fake score and 2 accumulated micro-batches, stopped at step 2 and resumed
    to 4, ends with the weights of the uninterrupted run (adapters, generator, discriminator)."""
    over = dict(LORA, batch_size=1, grad_accum_steps=2, generator_every=2, checkpoint_every=2)
    full = stage2(tmp_path / "full", **over, steps=4)
    fit(full)
    fit(stage2(tmp_path / "cut", **over, steps=2))
    resumed = stage2(tmp_path / "cut", **over, steps=4)
    fit(resumed, resume="latest")
    assert full.gen_updates == resumed.gen_updates == 2
    for name in ("gen_model", "fake_score", "disc"):
        want, got = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert all("-lora_" in k for k in resumed.fake_score.state_dict())   # the adapters only


def test_fake_score_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="fake_score.kind"):
        config_from_dict(Stage2Config, {"teacher": TEACHER, "fake_score.kind": "half"})
    with pytest.raises(ConfigError, match="fake_score.lora_rank"):
        config_from_dict(Stage2Config, {"teacher": TEACHER, "fake_score": {"kind": "lora", "lora_rank": 0}})
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        config_from_dict(Stage2Config, {"teacher": TEACHER, "grad_accum_steps": 0})
    with pytest.raises(ConfigError, match=r"fake_score.lora_targets \[.nope.\]"):
        add_lora(tiny_teacher().requires_grad_(False), FakeScoreConfig(kind="lora", lora_targets=["nope"]), 0)


def test_shipped_configs_state_world_size_and_batch():
    """The 1.3B configs' header states the processes and per-GPU batch they are planned for, the
    config holds that batch, and the global batch is the paper's 64."""
    for cls, name in ((Stage1Config, "stage1"), (Stage2Config, "stage2")):
        path = ROOT / "configs" / f"{name}_wan2.1_1.3b.yaml"
        found = re.search(r"Planned for (\d+) GPUs.*per-GPU batch (\d+) x grad_accum_steps (\d+)", path.read_text())
        gpus, batch, accum = map(int, found.groups())
        cfg = load_config(cls, path)
        assert (cfg.batch_size, cfg.grad_accum_steps) == (batch, accum) and gpus * batch * accum == 64
    assert cfg.checkpoint_teacher and cfg.fake_score == FakeScoreConfig()


# ------------------------------------------------------------------ teacher checkpointing
def _saved_and_grad(teacher, x, t, text, checkpoint):
    count = [0]

    def pack(tensor):
        count[0] += 1
        return tensor
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        feats = teacher_block_features(teacher, x, t, text, (1, 3), checkpoint=checkpoint)
    sum((f.square() * (i + 1)).mean() for i, f in enumerate(feats)).backward()
    return count[0], x.grad


def test_teacher_checkpointing_same_gradients_fewer_saved_tensors():
    teacher = tiny_teacher().requires_grad_(False)
    x, t, text = tiny_inputs(2, torch.Generator().manual_seed(0))
    n_plain, g_plain = _saved_and_grad(teacher, x, t, text, False)
    n_ckpt, g_ckpt = _saved_and_grad(teacher, x, t, text, True)
    assert n_ckpt < n_plain / 3
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-6, atol=1e-7)


def test_checkpointed_features_recompute_with_the_adapters_off():
    """The feature pass runs with the adapters off; its backward recomputation must too, though
    the adapters are on by then in a LoRA teacher's root outside a call."""
    teacher = tiny_teacher().requires_grad_(False)
    add_lora(teacher, FakeScoreConfig(kind="lora", lora_rank=2), 0)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    plain = tiny_teacher().requires_grad_(False)
    x, t, text = tiny_inputs(2, torch.Generator().manual_seed(0))
    _, want = _saved_and_grad(plain, x, t, text, False)
    root = FrozenTeacher(teacher, checkpoint=True)
    xg = x.clone().requires_grad_(True)
    feats = root.features(xg, t, text, (1, 3))
    set_adapters(teacher, True)                                  # what a fake-score call leaves behind
    sum((f.square() * (i + 1)).mean() for i, f in enumerate(feats)).backward()
    torch.testing.assert_close(xg.grad, want, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------ meta-device initialisation
def test_folder_models_are_built_on_meta_and_match_the_cpu_load(wan_folder, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        teacher = load_teacher(wan_folder, torch_dtype=torch.float32)
        student = TMDStudent.from_teacher(teacher, head_blocks=2)
    want, want_t = student.state_dict(), teacher.state_dict()
    common = {**SMALL, "teacher": str(wan_folder), "seed": 3, "batch_size": 2, "steps": 2}
    s1 = build_method(config_from_dict(Stage1Config, {k: v for k, v in common.items() if not k.startswith("disc")}
                                       | {"output_dir": str(tmp_path / "s1"), "objective.cfg_source": "teacher"}))
    got = s1.student.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, want_t[k]) for k, v in s1.teacher.state_dict().items())
    s2 = build_method(config_from_dict(Stage2Config, {**common, "output_dir": str(tmp_path / "s2"), **LORA}))
    assert all(torch.equal(v, want[k]) for k, v in s2.generator.state_dict().items())
    base = {k.replace(".base_layer", ""): v for k, v in s2.teacher.teacher.state_dict().items() if "lora_" not in k}
    assert base.keys() == want_t.keys() and all(torch.equal(v, want_t[k]) for k, v in base.items())
    assert not any(p.is_meta for m in (s1.model, s2.gen_model, s2.teacher) for p in m.parameters())


# ------------------------------------------------------------------ 2 processes
@pytest.mark.dist
def test_two_process_sharded_loading_lora_and_accumulation(wan_folder, tmp_path):
    """2 processes × batch 1 (folder teacher loaded shard by shard, LoRA fake score, teacher and
    generator checkpointing) = 1 process × 2 accumulated micro-batches of 1: same initial weights
    exactly, same weights after 2 iterations (the second a generator update) up to reduction order."""
    values = {**SMALL, "teacher": str(wan_folder), "batch_size": 1, "steps": 2, "generator_every": 2,
              "gradient_checkpointing": True,
              **LORA}
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()] + [f"output_dir={tmp_path / 'run'}"]
    proc = torchrun([str(TESTS / "methods" / "scale_dist_worker.py"), str(tmp_path), *overrides], tmp_path,
                    before_retry=lambda: shutil.rmtree(tmp_path / "run", ignore_errors=True))
    assert proc.returncode == 0, output(proc)
    assert all(math.isfinite(v) for v in json.loads((tmp_path / "bf16.json").read_text()).values())

    one = build_method(config_from_dict(Stage2Config, {**values, "grad_accum_steps": 2,
                                                       "output_dir": str(tmp_path / "one")}))
    init = load_file(str(tmp_path / "init.safetensors"))
    mine = {f"teacher.{n}": p for n, p in one.teacher.teacher.named_parameters()}
    mine |= {f"generator.{n}": p for n, p in one.generator.named_parameters()}
    assert init.keys() == mine.keys() and all(torch.equal(init[k], mine[k].float()) for k in init)
    for step, batch in zip(range(1, 3), one.batches(1), strict=True):
        one.train_step(step, batch)
    final = load_file(str(tmp_path / "final.safetensors"))
    mine = {f"generator.{n}": p for n, p in one.generator.named_parameters()}
    mine |= {f"fake.{n}": p for n, p in one.fake_score.named_parameters()}
    assert final.keys() == mine.keys()
    moved = max((final[k] - init[k]).abs().max().item() for k in final if k in init)
    assert moved > 1e-4
    for k in final:
        torch.testing.assert_close(final[k], mine[k].detach(), rtol=1e-5, atol=1e-6, msg=k)

    stage1 = load_file(str(tmp_path / "stage1.safetensors"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = load_teacher(wan_folder, torch_dtype=torch.float32)
        student = TMDStudent.from_teacher(teacher, head_blocks=2)
    want = {f"student.{n}": p for n, p in student.named_parameters()}
    want |= {f"teacher.{n}": p for n, p in teacher.named_parameters()}
    assert stage1.keys() == want.keys() and all(torch.equal(stage1[k], want[k]) for k in want)
