"""TMD student: teacher loading, backbone/head split, identity at init, fusion, inner flow,
FD accuracy of the head's time embedding, save/load, bf16 loading that keeps Wan's float32
modules, and what a folder that is not a student is reported as (tiny random Wan,
float32/float64/bfloat16, CPU)."""
from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from support.tiny import DIM, LATENT, TINY_CONFIG, randomize_zero_init, tiny_inputs, tiny_teacher
from torch import nn

from tmd_train.errors import ConfigError, MissingFileError
from tmd_train.methods.distill import SAMPLING_FILE
from tmd_train.methods.networks import build_models, teacher_config, write_plain
from tmd_train.models import (
    ConcatFusion,
    Features,
    GatedFusion,
    SmoothTimeEmbedding,
    StudentConfig,
    TMDStudent,
    load_teacher,
    teacher_velocity,
    unpatchify,
)
from tmd_train.models.teacher import cast_keeping_fp32, fp32_tensor_names

ATOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher(seed=0)


def teacher_out(teacher, x, t, text):
    return teacher(x, 1000 * t, text, return_dict=False)[0]


def rand_sr(batch, gen, dtype=torch.float32):
    s = torch.rand(batch, generator=gen, dtype=torch.float64)
    r = s * torch.rand(batch, generator=gen, dtype=torch.float64)
    return s.to(dtype), r.to(dtype)


# ------------------------------------------------------------------ teacher loading
def test_load_teacher_from_config():
    model = load_teacher(TINY_CONFIG)
    assert isinstance(model, WanTransformer3DModel) and not model.training
    assert model.config.num_layers == 4 and len(model.blocks) == 4


def test_load_teacher_from_config_dtype_keeps_fp32_modules():
    model = load_teacher(TINY_CONFIG, torch_dtype=torch.bfloat16)
    assert model.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.blocks[0].scale_shift_table.dtype == torch.float32


@pytest.mark.parametrize("layout", ["model_folder", "transformer_folder"])
def test_load_teacher_from_folder(teacher, tmp_path, gen, layout):
    teacher.save_pretrained(tmp_path / "transformer")
    path = tmp_path if layout == "model_folder" else tmp_path / "transformer"
    loaded = load_teacher(path)
    x, t, text = tiny_inputs(2, gen)
    with torch.no_grad():
        torch.testing.assert_close(teacher_out(loaded, x, t, text), teacher_out(teacher, x, t, text),
                                   atol=0, rtol=0)
    loaded_bf16 = load_teacher(str(path), torch_dtype=torch.bfloat16)
    assert loaded_bf16.proj_out.weight.dtype == torch.bfloat16


def test_load_teacher_missing(tmp_path):
    missing = tmp_path / "no_such_wan"
    with pytest.raises(FileNotFoundError, match="no_such_wan"):
        load_teacher(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_teacher(str(empty))
    with pytest.raises(TypeError):
        load_teacher(42)


def test_load_teacher_rejects_image_models():
    with pytest.raises(ValueError, match="text-to-video"):
        load_teacher(dict(TINY_CONFIG, added_kv_proj_dim=16))


def test_teacher_velocity_helper(teacher, gen):
    x, t, text = tiny_inputs(2, gen)
    with torch.no_grad():
        torch.testing.assert_close(teacher_velocity(teacher, x, t, text), teacher_out(teacher, x, t, text),
                                   atol=0, rtol=0)


# ------------------------------------------------------------------ identity at init
@pytest.mark.parametrize("head_blocks", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_identity_at_init(teacher, gen, head_blocks, batch):
    """Default options (gated, outer): head(y_s, s, r, backbone(x_t, t, text)) == teacher(x_t, 1000t, text)
    for any y_s, s, r."""
    student = TMDStudent.from_teacher(teacher, head_blocks=head_blocks)
    assert student.backbone_blocks == 4 - head_blocks
    x, t, text = tiny_inputs(batch, gen)
    with torch.no_grad():
        ref = teacher_out(teacher, x, t, text)
        feats = student.backbone(x, t, text)
        assert feats.m.shape == (batch, 3 * 4 * 4, DIM)
        assert feats.temb.shape == (batch, DIM) and feats.timestep_proj.shape == (batch, 6, DIM)
        assert feats.text.shape == (batch, 5, DIM) and feats.grid == (3, 4, 4)
        for trial in range(3):
            y_s = torch.randn(batch, *LATENT, generator=gen)
            s, r = rand_sr(batch, gen)
            if trial == 1:
                r = s.clone()
            if trial == 2:
                s, r = torch.ones(batch), torch.zeros(batch)
            out = student.head(y_s, s, r, feats)
            assert out.shape == x.shape and out.dtype == torch.float32
            torch.testing.assert_close(out, ref, **ATOL)
            y1 = torch.randn(batch, *LATENT, generator=gen)
            torch.testing.assert_close(student.velocity(y_s, s, r, feats, y1), y1 - ref, **ATOL)


def test_teacher_unchanged_and_copied(teacher):
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    assert student.transformer is not teacher
    assert student.transformer.patch_embedding.weight.data_ptr() != teacher.patch_embedding.weight.data_ptr()
    adopted = TMDStudent.from_teacher(tiny_teacher(seed=3), head_blocks=2, copy=False)
    assert isinstance(adopted.transformer, WanTransformer3DModel)


def test_trained_head_depends_on_inputs(teacher, gen):
    """Once the zero-initialised layers move, the head differs from the teacher and depends on
    y_s, s and r separately (so the identity test above can fail)."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, gen)
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s, r = torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.1])
    with torch.no_grad():
        feats = student.backbone(x, t, text)
        base = student.head(y_s, s, r, feats)
        assert (base - teacher_out(teacher, x, t, text)).abs().max() > 1e-3
        assert (student.head(y_s + 0.5, s, r, feats) - base).abs().max() > 1e-4
        assert (student.head(y_s, s + 0.1, r, feats) - base).abs().max() > 1e-4
        assert (student.head(y_s, s, r + 0.1, feats) - base).abs().max() > 1e-4


def test_head_time_inner(teacher, gen):
    """"inner": the head embeds s with the teacher's embedding of 1000·s, so at init it equals
    the teacher run at time s — the teacher's output exactly when s = t, not otherwise."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2, head_time="inner")
    assert student.time_embed_s is None
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
        ref = teacher_out(teacher, x, t, text)
        torch.testing.assert_close(student.head(y_s, t, 0.3 * t, feats), ref, **ATOL)
        s = (t + 0.3) % 1.0
        assert (student.head(y_s, s, 0.3 * s, feats) - ref).abs().max() > 1e-3


def test_concat_fusion_init(teacher, gen):
    student = TMDStudent.from_teacher(teacher, head_blocks=2, fusion="concat")
    w = student.fusion.proj.weight
    torch.testing.assert_close(w[:, :DIM], torch.eye(DIM), atol=0, rtol=0)
    assert torch.count_nonzero(student.fusion.proj.bias) == 0
    assert 0.002 < w[:, DIM:].std().item() < 0.03
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s, r = rand_sr(2, gen)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
        ref = teacher_out(teacher, x, t, text)
        out = student.head(y_s, s, r, feats)
        assert 0 < (out - ref).abs().max() < 0.5 * ref.abs().max()   # close, not exact (documented)
        student.fusion.proj.weight[:, DIM:].zero_()
        torch.testing.assert_close(student.head(y_s, s, r, feats), ref, **ATOL)


def test_gated_fusion_formula(gen):
    """GatedFusion == the docs/design.md §2.2 formula written with plain torch ops, for non-zero parameters."""
    torch.manual_seed(1)
    fusion = GatedFusion(DIM, hidden_dim=24).double()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    m, e = (torch.randn(3, 11, DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    s = torch.rand(3, generator=gen, dtype=torch.float64)
    shift, scale, g = fusion.modulation(F.silu(fusion.time_embed(s))).chunk(3, dim=-1)
    a = F.layer_norm(e, (DIM,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    z = e + fusion.mlp(a)
    lam = torch.sigmoid(fusion.alpha) * g[:, None]
    torch.testing.assert_close(fusion(m, e, s), m + lam * (z - m), atol=1e-10, rtol=1e-10)


def test_gated_fusion_is_identity_at_init(gen):
    fusion = GatedFusion(DIM)
    m, e = (torch.randn(2, 7, DIM, generator=gen) for _ in range(2))
    torch.testing.assert_close(fusion(m, e, torch.rand(2, generator=gen)), m, atol=0, rtol=0)
    assert isinstance(ConcatFusion(DIM), torch.nn.Module)


def test_smooth_time_embedding():
    emb = SmoothTimeEmbedding(DIM, num_freqs=8, min_freq=0.5, max_freq=10.0, zero_init=True)
    assert max(emb.freqs) == pytest.approx(10.0) and min(emb.freqs) == pytest.approx(0.5)
    assert torch.count_nonzero(emb(torch.rand(3))) == 0
    emb.to(torch.bfloat16)
    assert max(emb.freqs) == pytest.approx(10.0)   # frequencies are not rounded with the weights
    with pytest.raises(ValueError, match="tau"):
        emb(torch.rand(3, 1))


def test_gradients_at_init(teacher, gen):
    """At init every new layer that must learn gets a gradient, and the backbone is not detached."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s, r = rand_sr(2, gen)
    out = student.head(y_s, s, r, student.backbone(x, t, text))
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for name in ("fusion.modulation.weight", "time_embed_s.linear_2.weight", "time_embed_delta.linear_2.weight",
                 "transformer.blocks.0.ffn.net.2.weight", "transformer.blocks.3.attn1.to_q.weight",
                 "transformer.proj_out.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_features_repeat_batched_head(teacher, gen):
    """One 2B head pass over repeated features equals two B passes (the fused FD pass)."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, gen)
    x, t, text = tiny_inputs(2, gen)
    ya, yb = (torch.randn(2, *LATENT, generator=gen) for _ in range(2))
    sa, ra = rand_sr(2, gen)
    sb, rb = rand_sr(2, gen)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
        both = student.head(torch.cat([ya, yb]), torch.cat([sa, sb]), torch.cat([ra, rb]), feats.repeat(2))
        assert feats.repeat(2).batch_size == 4
        torch.testing.assert_close(both, torch.cat([student.head(ya, sa, ra, feats),
                                                    student.head(yb, sb, rb, feats)]), **ATOL)
    assert not feats.detach().m.requires_grad


# ------------------------------------------------------------------ inner flow
def test_inner_flow_matches_manual_loop(teacher, gen):
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, gen)
    x, t, text = tiny_inputs(2, gen)
    y1 = torch.randn(2, *LATENT, generator=gen)
    grid = torch.tensor([0.0, 0.3, 0.8, 0.999], dtype=torch.float64)
    feats = student.backbone(x, t, text)
    out = student.inner_flow(feats, y1, grid)
    assert not out.requires_grad
    with torch.no_grad():
        y = y1
        for j in (3, 2, 1):
            s, r = grid[j].expand(2), grid[j - 1].expand(2)
            y = y - (grid[j] - grid[j - 1]).float() * student.velocity(y, s, r, feats, y1)
    torch.testing.assert_close(out, y, **ATOL)
    per_sample = torch.stack([grid, torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=torch.float64)])
    out2 = student.inner_flow(feats, y1, per_sample)
    torch.testing.assert_close(out2[:1], out[:1], **ATOL)
    assert (out2[1] - out[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="ascending"):
        student.inner_flow(feats, y1, grid.flip(0))
    with pytest.raises(ValueError, match="s_grid"):
        student.inner_flow(feats, y1, grid[:1])


def test_inner_flow_constant_velocity_is_exact(teacher, gen, monkeypatch):
    """Sign check (docs/design.md §1.2): if the head returns a constant c, the conditional path from y1 to
    y = c has velocity y1 - c = u, and every step lands exactly on it: y0 = c for any grid."""
    student = TMDStudent.from_teacher(teacher, head_blocks=1)
    c = torch.randn(2, *LATENT, generator=gen)
    monkeypatch.setattr(student, "head", lambda y_s, s, r, feats: c)
    y1 = torch.randn(2, *LATENT, generator=gen)
    feats = student.backbone(*tiny_inputs(2, gen))
    for grid in ([0.0, 1.0], [0.0, 0.2, 0.5, 1.0]):
        out = student.inner_flow(feats, y1, torch.tensor(grid, dtype=torch.float64))
        torch.testing.assert_close(out, c, **ATOL)


def test_inner_flow_grad_and_checkpoint(teacher, gen):
    """grad=True keeps the graph through all N steps; checkpoint=True gives the same values and grads."""
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, gen)
    x, t, text = tiny_inputs(2, gen)
    y1 = torch.randn(2, *LATENT, generator=gen)
    w = torch.randn(2, *LATENT, generator=gen)
    grid = torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64)
    results = []
    for ckpt in (False, True):
        student.zero_grad()
        out = student.inner_flow(student.backbone(x, t, text), y1, grid, grad=True, checkpoint=ckpt)
        assert out.requires_grad
        (out * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o1, o0, atol=0, rtol=0)
    assert g0.keys() == g1.keys() and "transformer.blocks.0.attn1.to_q.weight" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_blocks(teacher, gen):
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    randomize_zero_init(student, gen)
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s, r = rand_sr(2, gen)
    ref = student.head(y_s, s, r, student.backbone(x, t, text))
    ref.sum().backward()
    g_ref = student.transformer.blocks[0].attn1.to_q.weight.grad.clone()
    student.zero_grad()
    student.enable_gradient_checkpointing()
    out = student.head(y_s, s, r, student.backbone(x, t, text))
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(student.transformer.blocks[0].attn1.to_q.weight.grad, g_ref,
                               atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ FD accuracy of the head in s
def _fd_vs_exact(student, gen, delta=5e-3):
    """Central differences (step delta) of f = <w, head(y_s, s, r)> against autograd: along s alone
    (the time embeddings: ``rel_s`` relative to |∂f/∂s|) and along the conditional path
    (y_s + δ·v, s + δ) of the FD-JVP (``rel_total``, relative to |∂f/∂y·v| + |∂f/∂s|, immune to
    cancellation between the two terms). Worst case over 2 samples (one with r = s)."""
    dt = torch.float64
    x, t, text = tiny_inputs(2, gen, dt)
    y, y1, w = (torch.randn(2, *LATENT, generator=gen, dtype=dt) for _ in range(3))
    s = torch.tensor([0.35, 0.6], dtype=dt)
    r = torch.tensor([0.1, 0.6], dtype=dt)
    with torch.no_grad():
        feats = student.backbone(x, t, text)
    v = y1 - y
    y_s = ((1 - s.view(-1, 1, 1, 1, 1)) * y + s.view(-1, 1, 1, 1, 1) * y1).requires_grad_(True)
    s_var = s.clone().requires_grad_(True)

    def f(y_in, s_in):
        return (student.head(y_in, s_in, r, feats) * w).flatten(1).sum(1)

    g_y, g_s = torch.autograd.grad(f(y_s, s_var).sum(), (y_s, s_var))
    along_y = (g_y * v).flatten(1).sum(1)
    with torch.no_grad():
        fd_s = (f(y_s, s + delta) - f(y_s, s - delta)) / (2 * delta)
        fd_total = (f(y_s + delta * v, s + delta) - f(y_s - delta * v, s - delta)) / (2 * delta)
    rel_s = ((fd_s - g_s).abs() / g_s.abs()).max().item()
    rel_total = ((fd_total - along_y - g_s).abs() / (along_y.abs() + g_s.abs())).max().item()
    return rel_s, rel_total


def test_fd_accuracy_outer_time_embedding(gen):
    """docs/design.md §2.5: with the head's low-frequency embeddings of s and s-r (made non-zero first —
    at init ∂head/∂s = 0 and the test would check nothing: rel_s would be nan and fail), a central
    difference at δ = 5e-3 matches the exact derivatives (measured ≲ 2e-3 over seeds)."""
    student = TMDStudent.from_teacher(tiny_teacher(seed=5), head_blocks=2).double()
    randomize_zero_init(student, gen)
    rel_s, rel_total = _fd_vs_exact(student, gen)
    assert rel_s < 1e-2 and rel_total < 1e-2, (rel_s, rel_total)


def test_fd_inaccuracy_inner_time_embedding(gen, capsys):
    """Measured, not hidden (docs/design.md §2.5): head_time="inner" embeds s the Wan way (sinusoids of
    1000·s), and the same central difference is off by O(100%) along s (≈ 0.9–12× over seeds)."""
    student = TMDStudent.from_teacher(tiny_teacher(seed=5), head_blocks=2, head_time="inner").double()
    randomize_zero_init(student, gen)
    rel_s, rel_total = _fd_vs_exact(student, gen)
    with capsys.disabled():
        print(f"\n[head_time=inner] FD(δ=5e-3) relative error: along s {rel_s:.2f}, total {rel_total:.2f}")
    assert rel_s > 0.3, rel_s


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("fusion,head_time", [("gated", "outer"), ("concat", "inner")])
def test_save_load_roundtrip(teacher, tmp_path, gen, fusion, head_time):
    student = TMDStudent.from_teacher(teacher, head_blocks=3, fusion=fusion, head_time=head_time,
                                      time_num_freqs=6, fusion_hidden_dim=20)
    randomize_zero_init(student, gen)
    student.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["student"]["head_blocks"] == 3 and cfg["student"]["fusion"] == fusion
    assert cfg["transformer"]["num_layers"] == 4 and cfg["transformer"]["patch_size"] == [1, 2, 2]
    loaded = TMDStudent.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == student.config
    assert loaded.transformer.config.patch_size == (1, 2, 2)
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s, r = rand_sr(2, gen)
    with torch.no_grad():
        a = student.head(y_s, s, r, student.backbone(x, t, text))
        b = loaded.head(y_s, s, r, loaded.backbone(x, t, text))
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    half = TMDStudent.from_pretrained(str(tmp_path / "ckpt"), torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path, teacher):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        TMDStudent.from_pretrained(tmp_path / "nothing_here")
    (tmp_path / "w").mkdir()
    TMDStudent.from_teacher(teacher, head_blocks=1).save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: .*model\.safetensors not found"):
        TMDStudent.from_pretrained(tmp_path / "w")
    student = TMDStudent.from_teacher(teacher, head_blocks=1)
    student.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["format"] = "something-else"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tmd-student"):
        TMDStudent.from_pretrained(tmp_path / "c")


def dmd2v_folder(teacher, folder):
    """A folder as stage 2 with ``method=dmd2v`` exports it: a plain Wan transformer + tmd_sampling.json."""
    write_plain(teacher_config(teacher), teacher.state_dict(), folder)
    (folder / SAMPLING_FILE).write_text(json.dumps({"method": "dmd2v", "outer_steps": 2}))
    return folder


def test_init_student_folder_kinds(tmp_path, teacher):
    """A folder that is not a student says what it is and what is expected, as a user error, both
    from ``from_pretrained`` and as ``init_student`` of a training config."""
    expected = "TMD student folder .*stage 1 or by stage 2 with method=tmd"
    run = tmp_path / "run"
    TMDStudent.from_teacher(teacher, head_blocks=2).save_pretrained(run / "student")
    teacher.save_pretrained(tmp_path / "wan" / "transformer")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("x")
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    cases = {
        dmd2v_folder(teacher, tmp_path / "dmd2v"): (MissingFileError, "DMD2-v few-step generator .*method=dmd2v"),
        tmp_path / "wan" / "transformer": (MissingFileError, "plain WanTransformer3DModel folder"),
        tmp_path / "wan": (MissingFileError, "Wan diffusers model folder"),
        run: (MissingFileError, "training run's output folder.*its final student is .*student"),
        tmp_path / "random": (MissingFileError, "has no config.json"),
        tmp_path / "file.json": (MissingFileError, "is a file"),
        tmp_path / "bad": (ConfigError, "not valid JSON"),
    }
    for folder, (error, what) in cases.items():
        with pytest.raises(error, match=f"{what}.*" if error is ConfigError else f"{what}") as info:
            TMDStudent.from_pretrained(folder)
        assert str(folder) in str(info.value)
        if error is MissingFileError and "output folder" not in what:
            assert re.search(expected, str(info.value)), str(info.value)
        with pytest.raises(error, match=f"^init_student: .*{what}"):
            build_models(TINY_CONFIG, 0, need_teacher=False, init_student=str(folder), head_blocks=2)
    assert isinstance(TMDStudent.from_pretrained(run / "student"), TMDStudent)


# ------------------------------------------------------------------ bad input
def test_bad_options_and_inputs(teacher, gen):
    for kw in ({"head_blocks": 0}, {"head_blocks": 5}, {"fusion": "sum"}, {"head_time": "both"}):
        with pytest.raises(ValueError):
            TMDStudent.from_teacher(teacher, **{"head_blocks": 2, **kw})
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    x, t, text = tiny_inputs(2, gen)
    with pytest.raises(ValueError, match="t must"):
        student.backbone(x, t[:1], text)
    with pytest.raises(ValueError, match="text"):
        student.backbone(x, t, text[:1])
    with pytest.raises(ValueError, match="divisible"):
        student.backbone(x[..., :7], t, text)
    feats = student.backbone(x, t, text)
    with pytest.raises(ValueError, match="s must"):
        student.head(x, t[:, None], t, feats)
    with pytest.raises(ValueError, match="batch"):
        student.head(x[:1], t, t, feats)
    with pytest.raises(ValueError, match="grid"):
        student.head(x[:, :, :2], t, t, feats)
    assert isinstance(feats, Features)
    assert StudentConfig().head_blocks == 5


def test_unpatchify_inverts_wan_patching(gen):
    """unpatchify undoes Wan's patch layout: tokens built from a latent by the inverse permutation."""
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)
    tok = x.reshape(2, 4, 3, 1, 4, 2, 4, 2).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(2, 48, 16)
    torch.testing.assert_close(unpatchify(tok, (3, 4, 4), (1, 2, 2)), x, atol=0, rtol=0)


def fp32_names(model):
    return {n for n, x in itertools.chain(model.named_parameters(), model.named_buffers()) if x.dtype == torch.float32}


def test_bf16_loading_keeps_wan_fp32_modules(teacher, tmp_path, gen):
    """A student loaded in bf16 (``from_pretrained`` or ``from_teacher`` of a bf16 teacher) keeps
    exactly the tensors diffusers keeps in float32 when it loads the teacher in bf16 (RoPE tables,
    time embedder, every ``scale_shift_table``, the blocks' float32 LayerNorms), and so still
    equals that teacher at init, bit for bit."""
    teacher.save_pretrained(tmp_path / "transformer")
    wan_bf16 = load_teacher(tmp_path, torch_dtype=torch.bfloat16)               # diffusers' own loading
    kept = fp32_names(wan_bf16)
    assert {"rope.freqs_cos", "rope.freqs_sin", "scale_shift_table", "blocks.3.scale_shift_table",
            "condition_embedder.time_embedder.linear_2.weight", "blocks.0.norm2.weight"} <= kept
    assert wan_bf16.proj_out.weight.dtype == torch.bfloat16
    assert fp32_tensor_names(wan_bf16) == kept
    assert fp32_names(load_teacher(TINY_CONFIG, torch_dtype=torch.bfloat16)) == kept    # random, from a config

    TMDStudent.from_teacher(teacher, head_blocks=2).save_pretrained(tmp_path / "student")
    loaded = TMDStudent.from_pretrained(tmp_path / "student", torch_dtype=torch.bfloat16)
    built = TMDStudent.from_teacher(wan_bf16, head_blocks=2)
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s, r = rand_sr(2, gen)
    with torch.no_grad():
        ref = teacher_out(wan_bf16, x.bfloat16(), t, text.bfloat16())
        for student in (loaded, built):
            assert fp32_names(student) == {f"transformer.{n}" for n in kept}
            assert student.dtype == torch.bfloat16 and student.fusion.alpha.dtype == torch.bfloat16
            torch.testing.assert_close(student.head(y_s, s, r, student.backbone(x, t, text)), ref, atol=0, rtol=0)


def test_cast_keeping_fp32_any_module_tree(teacher, tmp_path):
    """The one helper casts any module tree holding Wan models (a fake score, a wrapped few-step
    generator, a student) the way diffusers loads a Wan model: the same tensors stay float32 (or
    become float32 again after a plain ``.to(bf16)``, RoPE buffers included), parameters stay the
    same objects; a plain few-step generator folder loads the same way."""
    tree = nn.ModuleDict({"fake_score": copy.deepcopy(teacher),
                          "student": TMDStudent.from_teacher(teacher, head_blocks=2)})
    tree.to(torch.bfloat16)
    assert not fp32_names(tree)
    param = tree["fake_score"].proj_out.weight
    assert cast_keeping_fp32(tree, torch.bfloat16) is tree
    assert tree["fake_score"].proj_out.weight is param and param.dtype == torch.bfloat16
    teacher.save_pretrained(tmp_path / "wan")
    kept = fp32_names(load_teacher(tmp_path / "wan", torch_dtype=torch.bfloat16))
    assert fp32_names(tree) == ({f"fake_score.{n}" for n in kept} | {f"student.transformer.{n}" for n in kept})
    assert fp32_names(load_teacher(dmd2v_folder(teacher, tmp_path / "dmd2v"), torch_dtype=torch.bfloat16)) == kept
    assert cast_keeping_fp32(tree, None) is tree
    with pytest.raises(ValueError, match="floating"):
        cast_keeping_fp32(tree, torch.int8)


def test_bfloat16_student(teacher, tmp_path, gen):
    """A bf16 teacher (loaded like a real checkpoint, Wan's fp32 modules kept) gives a bf16 student
    whose head runs, backpropagates, and stays close to the fp32 teacher at init; the inner flow
    keeps the dtype of y1."""
    teacher.save_pretrained(tmp_path / "transformer")
    student = TMDStudent.from_teacher(load_teacher(tmp_path, torch_dtype=torch.bfloat16), head_blocks=2)
    assert student.dtype == torch.bfloat16 and student.fusion.alpha.dtype == torch.bfloat16
    x, t, text = tiny_inputs(2, gen)
    y1 = torch.randn(2, *LATENT, generator=gen)
    s, r = rand_sr(2, gen)
    feats = student.backbone(x, t, text)
    out = student.head(y1, s, r, feats)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        ref = teacher_out(teacher, x, t, text)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    y0 = student.inner_flow(feats, y1, torch.tensor([0.0, 0.5, 0.999]), grad=True)
    assert y0.dtype == torch.float32
    y0.square().mean().backward()
    assert student.fusion.modulation.weight.grad.abs().max() > 0
