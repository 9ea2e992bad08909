"""TinyBench and its evaluator: the shipped weights, the metric's ceiling and floor, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from tmd_train.errors import MissingFileError
from tmd_train.models.teacher import load_teacher
from tmd_train.toy import TOY_TEACHER_DIR, toy_teacher_available
from tmd_train.toy import clips as world
from tmd_train.toy import evaluator as ev
from tmd_train.toy import tinybench as tb
from tmd_train.toy.clips import WorldConfig

N_REF = 192


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny CPU workloads are dominated by thread start-up and contention: run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real():
    """Held-out real clips (a seed used neither for training nor validation nor the reference)."""
    clips, prompts, labels = world.make_batch(128, seed=4242)
    return clips, prompts, labels


def test_shipped_evaluator(real):
    assert ev.ASSET_PATH.is_file() and ev.ASSET_PATH.stat().st_size < 2 * 1024 * 1024
    model = ev.load_evaluator()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.record["val_accuracy"]["mean"] >= 0.95
    clips, _, labels = real
    acc = ev.accuracy(model, clips, labels)
    assert min(acc[a] for a in world.ATTRIBUTE_NAMES) >= 0.95, acc
    logits, feats = model(clips[:4])
    assert [lg.shape for lg in logits] == [(4, 3), (4, 4), (4, 4)]
    assert feats.shape == (4, model.config.feature_dim)


def test_evaluator_training_smoke(tmp_path):
    """Two optimisation steps run, change the weights, and survive a save/load round trip."""
    torch.manual_seed(0)
    init = ev.ClipEvaluator()
    model, record = ev.train(steps=2, batch_size=4, n_val=6, log_every=0)
    assert record["steps"] == 2 and set(record["val_accuracy"]) == {"shape", "colour", "direction", "mean"}
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), model.state_dict().values(),
                                                       strict=True))
    path = tmp_path / "ev.safetensors"
    ev.save_evaluator(model, path, record)
    loaded = ev.load_evaluator(path)
    assert loaded.record == record
    x = world.make_batch(3, seed=1)[0]
    torch.testing.assert_close(loaded(x)[1], model(x)[1], atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="--train"):
        ev.load_evaluator(tmp_path / "missing.safetensors")


def test_real_clips_score_at_the_ceiling(real):
    clips, prompts, _ = real
    s = tb.tinybench(clips, prompts, n_ref=N_REF)
    assert s["n"] == 128
    assert s["semantic_accuracy"] >= 0.95 and s["semantic"] == pytest.approx(100 * s["semantic_accuracy"])
    assert min(s["shape_accuracy"], s["colour_accuracy"], s["direction_accuracy"]) >= 0.9
    assert s["fd_score"] > 80 and s["temporal_score"] > 80, s
    assert s["quality"] == pytest.approx((s["fd_score"] + s["temporal_score"]) / 2)
    assert s["total"] == pytest.approx((4 * s["quality"] + s["semantic"]) / 5)
    assert s["total"] > 85


def test_noise_scores_badly(real, gen):
    _, prompts, _ = real
    noise = torch.randn(128, 3, 8, 32, 32, generator=gen)
    s = tb.tinybench(noise, prompts, n_ref=N_REF)
    assert s["semantic_accuracy"] < 0.5, s  # chance is (1/3 + 1/4 + 1/4) / 3 ≈ 0.28
    assert s["fd_score"] < 5 and s["temporal_score"] < 5 and s["quality"] < 5, s
    assert s["total"] < 15


def test_shuffled_prompts_lose_semantic_not_quality(real):
    clips, prompts, _ = real
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [prompts[i] for i in perm]
    s = tb.tinybench(clips, shuffled, n_ref=N_REF)
    assert s["semantic_accuracy"] < 0.5, s
    assert s["fd_score"] > 80, "the same prompt multiset: still real-looking clips"


def test_static_and_blurred_clips(real):
    """Frozen clips keep colour/shape but lose direction and temporal score; blur lowers the FD score."""
    clips, prompts, _ = real
    frozen = clips[:, :, :1].expand_as(clips).contiguous()
    s = tb.tinybench(frozen, prompts, n_ref=N_REF)
    assert s["colour_accuracy"] > 0.9
    assert s["temporal_score"] < 20, s
    ceiling = tb.tinybench(clips, prompts, n_ref=N_REF)
    blurred = torch.nn.functional.avg_pool3d(clips, (1, 5, 5), stride=1, padding=(0, 2, 2), count_include_pad=False)
    assert tb.tinybench(blurred, prompts, n_ref=N_REF)["fd_score"] < ceiling["fd_score"] - 10


def test_two_object_prompts_count_either_object():
    clips, prompts, _ = world.make_batch(64, seed=515, config=WorldConfig(p_two=1.0))
    pred = torch.stack([torch.tensor(world.parse_prompt(p)[1].labels) for p in prompts])
    assert tb.semantic_accuracy(pred, prompts)["mean"] == 1.0
    wrong = (pred + 1) % torch.tensor([3, 4, 4])
    first = torch.stack([torch.tensor(world.parse_prompt(p)[0].labels) for p in prompts])
    expected = ((wrong == first) | (wrong == pred)).float().mean().item()
    assert tb.semantic_accuracy(wrong, prompts)["mean"] == pytest.approx(expected)


def test_frechet_distance(gen):
    x = torch.randn(4000, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 5, generator=gen,
                                                                                dtype=torch.float64)
    assert tb.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert tb.frechet_distance(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    # y = 2x: tr(C + 4C - 2·2C) + |μ|² = tr(C) + |μ|²
    expect = torch.cov(x.T).trace() + x.mean(0).square().sum()
    assert tb.frechet_distance(x, 2 * x) == pytest.approx(float(expect), rel=1e-6)
    scale = torch.full((5,), 2.0, dtype=torch.float64)
    assert tb.frechet_distance(x, x + shift, scale) == pytest.approx(float(shift.square().sum()) / 4, rel=1e-6)


def test_temporal_stats(gen):
    """Frames x_f = c + a·f + b·f²: mean |Δ1| = mean |a + b(2f+1)|, mean |Δ2| = 2|b|."""
    c = torch.randn(2, 3, 1, 4, 4, generator=gen)
    f = torch.arange(8.0)[None, None, :, None, None]
    a, b = 0.05, 0.01
    x = c + a * f + b * f * f
    stats = tb.temporal_stats(x)
    d1 = (a + b * (2 * torch.arange(7.0) + 1)).mean()
    torch.testing.assert_close(stats[:, 0], torch.log(d1 + tb._EPS).double().expand(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats[:, 1], torch.log(torch.tensor(2 * b + tb._EPS)).double().expand(2),
                               atol=1e-4, rtol=0)


def test_bad_inputs(real):
    clips, prompts, _ = real
    with pytest.raises(ValueError, match="clips must be"):
        tb.tinybench(clips[:, :, :4], prompts)
    with pytest.raises(ValueError, match="one prompt per clip"):
        tb.tinybench(clips, prompts[:-1])
    with pytest.raises(ValueError, match="non-finite"):
        tb.tinybench(clips * float("nan"), prompts)
    with pytest.raises(ValueError, match="at least 2"):
        tb.tinybench(clips[:1], prompts[:1])
    with pytest.raises(ValueError, match="parse_prompt"):
        tb.tinybench(clips[:2], ["a red circle moving left", "hello"])


def test_cli_clips_folder_and_sampler(tmp_path, real):
    clips, prompts, _ = real
    n, n_ref = 48, "64"
    tb.save_clips(tmp_path / "gen", clips[:n], prompts[:n])
    loaded, loaded_prompts = tb.load_clips(tmp_path / "gen")
    assert torch.equal(loaded, clips[:n]) and loaded_prompts == prompts[:n]
    out = tmp_path / "scores.json"
    scores = tb.main(["--clips", str(tmp_path / "gen"), "--n-ref", n_ref, "--json", str(out)])
    assert json.loads(out.read_text()) == scores
    assert scores == tb.tinybench(clips[:n], prompts[:n], n_ref=int(n_ref))
    sampled = tb.main(["--sampler", "tmd_train.toy.tinybench:world_sampler", "--n", "32", "--n-ref", n_ref])
    assert sampled["n"] == 32 and sampled["semantic_accuracy"] >= 0.9
    world.main(["--out", str(tmp_path / "ds"), "--n", "24", "--seed", "8"])
    from_ds = tb.main(["--dataset", str(tmp_path / "ds"), "--n-ref", n_ref])
    assert from_ds["n"] == 24 and from_ds["semantic_accuracy"] >= 0.9
    with pytest.raises(FileNotFoundError, match="clips.safetensors"):
        tb.load_clips(tmp_path)


def test_log_score_anchors():
    assert tb.log_score(0.1, (1.5, 80.0)) == 100.0 and tb.log_score(1e3, (1.5, 80.0)) == 0.0
    assert tb.log_score(40.0, (1.5, 80.0)) - tb.log_score(80.0, (1.5, 80.0)) == pytest.approx(
        tb.log_score(5.0, (1.5, 80.0)) - tb.log_score(10.0, (1.5, 80.0)))  # halving the distance: same gain
    # the shipped teacher's FD to real clips (~29 at the defaults) is not floored
    assert 15 < tb.log_score(29.0, tb.FD_ANCHORS) < 40


needs_toy = pytest.mark.skipif(not toy_teacher_available(), reason="the toy teacher is not shipped in this checkout")


@needs_toy
def test_teacher_fidelity_separates_the_teacher_from_degraded_generators(tmp_path, monkeypatch, gen):
    """The teacher against itself (other noise) is near the best fidelity; the teacher at 1 step and noise are
    clearly worse (at 4 steps × CFG 3 the self FD is 4.4 against 14.5 for 1 step; at 2 steps they are too close).
    The reference clips are cached per (weights, prompts, settings) and not sampled twice."""
    teacher = load_teacher(TOY_TEACHER_DIR).eval()
    prompts = world.sample_prompts(32, 11)
    ref = tb.teacher_reference(teacher, prompts, steps=4, cache_dir=tmp_path)
    assert ref.shape == (32, 3, 8, 32, 32) and len(list(tmp_path.glob("teacher_ref_*.safetensors"))) == 1
    itself = tb.teacher_reference(teacher, prompts, steps=4, seed=1, cache=False)
    one_step = tb.teacher_reference(teacher, prompts, steps=1, seed=1, cache=False)
    noise = torch.randn(32, 3, 8, 32, 32, generator=gen)
    s_self, s_one, s_noise = (tb.tinybench(c, prompts, n_ref=64, teacher_clips=ref) for c in (itself, one_step, noise))
    assert s_self["teacher_fd_score"] > 70 and s_self["teacher_fd"] < 0.5 * s_one["teacher_fd"], (s_self, s_one)
    assert s_noise["teacher_fd_score"] < 30 and s_noise["teacher_agreement"] < s_self["teacher_agreement"] - 0.2
    assert s_self["fidelity"] > s_one["fidelity"] + 10 and s_one["fidelity"] > s_noise["fidelity"] + 10
    assert s_self["fidelity"] == pytest.approx((s_self["teacher_fd_score"] + 100 * s_self["teacher_agreement"]) / 2)
    assert s_self["teacher_agreement"] == pytest.approx(
        sum(s_self[f"{a}_agreement"] for a in world.ATTRIBUTE_NAMES) / 3)
    without = tb.tinybench(itself, prompts, n_ref=64)
    assert "fidelity" not in without and without["total"] == s_self["total"]  # real-clip scores unchanged

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached reference was sampled again")

    monkeypatch.setattr(tb, "sample_teacher", no_sampling)
    assert torch.equal(tb.teacher_reference(TOY_TEACHER_DIR, prompts, steps=4, cache_dir=tmp_path), ref)
    with pytest.raises(AssertionError, match="sampled again"):  # other settings: another key
        tb.teacher_reference(teacher, prompts, steps=4, cfg=5.0, cache_dir=tmp_path)
    next(tmp_path.glob("teacher_ref_*.safetensors")).write_bytes(b"broken")
    with pytest.raises(AssertionError, match="sampled again"):  # an unreadable cache file is resampled
        tb.teacher_reference(teacher, prompts, steps=4, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="teacher_clips"):
        tb.tinybench(itself, prompts, teacher_clips=ref[:4])
    monkeypatch.undo()
    # the CLI: --teacher shipped adds the fidelity scores, computed against the (cached) reference
    tb.save_clips(tmp_path / "gen", itself[:8], prompts[:8])
    cli = tb.main(["--clips", str(tmp_path / "gen"), "--n-ref", "16", "--teacher", "shipped", "--teacher-steps", "1",
                   "--cache-dir", str(tmp_path / "cache")])
    ref8 = tb.teacher_reference(teacher, prompts[:8], steps=1, cache_dir=tmp_path / "cache")
    assert cli == tb.tinybench(itself[:8], prompts[:8], n_ref=16, teacher_clips=ref8)
    with pytest.raises(MissingFileError, match="--teacher"):
        tb.main(["--clips", str(tmp_path / "gen"), "--teacher", str(tmp_path)])


def test_aggregate_runs_skips_unfinished(tmp_path, capsys):
    for cell, totals in (("tmd_m1", (10.0, 14.0, 12.0)), ("dmd2v_m1", (11.0,))):
        for seed, total in enumerate(totals):
            run = tmp_path / cell / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "tinybench.json").write_text(json.dumps({"total": total, "semantic": 2 * total, "n": 8}))
    (tmp_path / "tmd_m1" / "seed9").mkdir()  # still running: no scores yet
    (tmp_path / "dmd2v_m1" / "seed1").mkdir()
    (tmp_path / "dmd2v_m1" / "seed1" / "tinybench.json").write_text('{"total": 1')  # cut short
    cells, skipped = tb.collect(tmp_path)
    assert sorted(cells) == ["dmd2v_m1", "tmd_m1"] and len(cells["tmd_m1"]) == 3
    assert skipped == [str(tmp_path / "dmd2v_m1" / "seed1" / "tinybench.json")]
    stats = tb.aggregate(cells)
    assert stats["tmd_m1"]["total"] == pytest.approx((12.0, 2.0, 3)) and stats["dmd2v_m1"]["total"] == (11.0, 0.0, 1)
    out = tb.main(["--aggregate", str(tmp_path)])
    assert out["tmd_m1"]["semantic"] == pytest.approx([24.0, 4.0, 3])
    printed = capsys.readouterr()
    assert "| tmd_m1 | 3 | 24 ± 4 |" in printed.out and "cut short" not in printed.out and "seed1" in printed.err
