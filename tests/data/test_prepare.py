"""``python -m tmd_train.prepare synthetic|videos`` on the tiny real-format Wan folder and tiny mp4 files:
the datasets, what they hold (teacher samples from the stored noise; VAE latents that tmd_train.sample's
decoder turns back into diffusers' own reconstruction), bad items skipped with reasons, one training step of
each stage on the results, resume after a kill, and a 2-process torchrun run equal to one process."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from support.run import output, torchrun
from support.wan_folder import FRAMES, HEIGHT, WIDTH, build_wan_folder

import tmd_train.prepare.runner as runner
from tmd_train.data.format import LatentDataset, load_negative
from tmd_train.data.sources import masked_text
from tmd_train.errors import DataError, run_main
from tmd_train.methods.distill import open_kd
from tmd_train.prepare import main
from tmd_train.prepare.synthetic import clip_noise
from tmd_train.text.umt5 import WAN_NEGATIVE_PROMPT, PromptEncoder

TEXT_LEN = 16
STEPS, CFG = 2, 3.0
PROMPTS = ["a red ball bounces on the floor", "", "a cat walks across the grass"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread (as the torchrun workers): the datasets are compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mp4(path: Path, n: int, fps: int = 24, h: int = 40, w: int = 56, faststart: bool = False) -> Path:
    """``n`` frames of a moving bar on a colour ramp, H.264 (``faststart``: the index before the frames)."""
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = 20 * i % 256
        a[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None]
        a[:, 4 * i % w:4 * i % w + 6] = 220
        for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    wan = build_wan_folder(root / "wan")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    vids = root / "videos"
    vids.mkdir()
    make_mp4(vids / "a.mp4", 12)
    make_mp4(vids / "b.mp4", 10, fps=30, h=48, w=36)
    make_mp4(vids / "c_short.mp4", 3)
    (vids / "d_corrupt.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + bytes(range(256)) * 4)
    make_mp4(vids / "e_nocaption.mp4", 12)
    whole = make_mp4(root / "whole.mp4", 24, faststart=True).read_bytes()
    (vids / "f_truncated.mp4").write_bytes(whole[:len(whole) // 3])   # opens, then the stream breaks off
    for name, cap in [("a", "a red ball bounces on the floor"), ("b", "two triangles spin around"),
                      ("c_short", "the green circle grows slowly"), ("d_corrupt", "a blue square"),
                      ("f_truncated", "a cat walks across the grass")]:
        (vids / f"{name}.txt").write_text(cap + "\n")
    with (root / "list.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption"])
        w.writerow(["videos/b.mp4", "two triangles spin around"])
        w.writerow(["videos/a.mp4", "a red ball bounces on the floor"])
        w.writerow(["videos/a.mp4", ""])
    return root, wan


def synthetic_args(root: Path, wan: Path, out: Path) -> list[str]:
    return ["synthetic", "--teacher", str(wan), "--prompts", str(root / "prompts.txt"), "--out", str(out),
            "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS),
            "--cfg", str(CFG), "--clips-per-prompt", "2", "--shard-size", "2", "--batch-size", "2",
            "--max-text-len", str(TEXT_LEN), "--dtype", "float32", "--no-progress"]


def video_args(wan: Path, videos: Path, out: Path) -> list[str]:
    return ["videos", "--components", str(wan), "--videos", str(videos), "--out", str(out), "--frames", str(FRAMES),
            "--height", str(HEIGHT), "--width", str(WIDTH), "--fps", "16", "--shard-size", "2", "--batch-size", "2",
            "--max-text-len", str(TEXT_LEN), "--dtype", "float32", "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def synthetic(world):
    root, wan = world
    assert main(synthetic_args(root, wan, root / "synthetic")) == 0
    return root / "synthetic"


@pytest.fixture(scope="module")
def videos(world):
    root, wan = world
    assert main(video_args(wan, root / "videos", root / "from_videos")) == 0
    return root / "from_videos"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def skipped(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "skipped.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ synthetic
def test_synthetic_holds_teacher_samples_from_the_stored_noise(world, synthetic):
    from tmd_train.models import load_teacher
    from tmd_train.sampling import sample_teacher

    _, wan = world
    ds = LatentDataset(synthetic)
    assert ds.kind == "latents" and "noise" in ds.tensor_keys and len(ds) == 4
    assert ds.prompts == [PROMPTS[0]] * 2 + [PROMPTS[2]] * 2
    assert [(s["index"], s["reason"]) for s in skipped(synthetic)] == [(2, "empty prompt"), (3, "empty prompt")]
    assert ds.shapes["latents"] == (4, 2, 4, 4) and ds.shapes["text_emb"] == (TEXT_LEN, 16)
    assert ds.metadata["t_max"] == 0.999 and ds.metadata["steps"] == STEPS
    encoder = PromptEncoder(wan / "text_encoder", wan / "tokenizer", "cpu", torch.float32, TEXT_LEN)
    neg_emb, neg_mask = load_negative(synthetic)
    want_emb, want_mask = encoder.encode([WAN_NEGATIVE_PROMPT])
    assert torch.equal(neg_emb, want_emb[0]) and torch.equal(neg_mask, want_mask[0])
    teacher = load_teacher(wan)
    for i, index in [(1, 1), (3, 5)]:            # clip 1 of prompt 0; clip 1 of prompt 2 (items 2, 3 skipped)
        item = ds[i]
        assert torch.equal(item["noise"], clip_noise(0, index, ds.shapes["noise"], torch.float32))
        emb, mask = encoder.encode([item["prompt"]])
        assert torch.equal(item["text_emb"], emb[0]) and torch.equal(item["text_mask"], mask[0])
        x0 = sample_teacher(teacher, masked_text(emb, mask), negative_text=masked_text(want_emb, want_mask),
                            noise=item["noise"][None], steps=STEPS, cfg=CFG, shift=5.0, t_max=0.999).x0
        torch.testing.assert_close(item["latents"][None], x0, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ds[0]["noise"], ds[1]["noise"])


def test_wan_negative_prompt_is_diffusers_one():
    import diffusers.pipelines.wan.pipeline_wan as pipeline_wan

    assert re.search(r'negative_prompt = "([^"]+)"', pipeline_wan.EXAMPLE_DOC_STRING).group(1) == WAN_NEGATIVE_PROMPT


def test_synthetic_serves_as_kd_pairs(world, synthetic):
    teacher_config = LatentDataset(synthetic).teacher_config
    pairs = open_kd(str(synthetic), teacher_config, t_max=0.999)
    ds = LatentDataset(synthetic)
    assert len(pairs) == 4 and torch.equal(pairs[2]["target"], ds[2]["latents"])
    assert torch.equal(pairs[2]["noise"], ds[2]["noise"])
    with pytest.raises(DataError, match="started at t = 0.999"):
        open_kd(str(synthetic), teacher_config, t_max=0.99)


# ------------------------------------------------------------------ videos
def test_videos_dataset_and_round_trip(world, videos):
    from diffusers import AutoencoderKLWan

    from tmd_train.data.video import read_clip
    from tmd_train.pipeline import TMDPipeline

    root, wan = world
    ds = LatentDataset(videos)
    assert ds.kind == "latents" and "noise" not in ds.tensor_keys and len(ds) == 2
    assert ds.prompts == ["a red ball bounces on the floor", "two triangles spin around"]
    reasons = {Path(s["source"]).name: s["reason"] for s in skipped(videos)}
    assert reasons == {"c_short.mp4": "too-short video", "d_corrupt.mp4": "unreadable video",
                       "e_nocaption.mp4": "missing caption", "f_truncated.mp4": "truncated video"}
    # prepare -> latents -> the decoder of tmd_train.sample (TMDPipeline.decode_latents) == diffusers' own
    # encode (posterior mean) / decode of the same clip
    vae = AutoencoderKLWan.from_pretrained(wan / "vae").eval()
    clip = read_clip(root / "videos" / "a.mp4", frames=FRAMES, fps=16, height=HEIGHT, width=WIDTH)
    assert clip.shape == (3, FRAMES, HEIGHT, WIDTH) and -1 <= clip.min() < clip.max() <= 1
    with torch.no_grad():
        z = vae.encode(clip[None]).latent_dist.mode()
        ref = vae.decode(z, return_dict=False)[0].clamp(-1, 1)
    got = TMDPipeline.from_pretrained(wan).decode_latents(ds[0]["latents"][None])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ds[0]["latents"], z[0], atol=1e-2)      # normalised, not raw VAE latents
    # the same videos from a CSV list (relative paths, an empty caption skipped) give the same latents
    out = root / "from_csv"
    assert main(video_args(wan, root / "list.csv", out)) == 0
    csv_ds = LatentDataset(out)
    assert csv_ds.prompts == ["two triangles spin around", "a red ball bounces on the floor"]
    assert torch.equal(csv_ds[1]["latents"], ds[0]["latents"]) and torch.equal(csv_ds[0]["latents"], ds[1]["latents"])
    assert [s["reason"] for s in skipped(out)] == ["missing caption"]


def test_missing_component_is_one_error_before_any_work(world, tmp_path, capsys):
    _, wan = world
    partial = tmp_path / "partial"
    shutil.copytree(wan, partial, ignore=shutil.ignore_patterns("vae"))
    out = tmp_path / "out"
    assert run_main(main, video_args(partial, tmp_path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no vae/ folder" in err and str(partial) in err
    assert run_main(main, synthetic_args(tmp_path, tmp_path / "nope", out)) == 2
    assert "--teacher" in capsys.readouterr().err and not out.exists()


def test_unavailable_attention_backend_is_one_error_before_any_work(world, tmp_path, capsys):
    """--attention-backend reaches the teacher through diffusers' dispatcher; a backend that cannot run here
    (flash-attn is not installed, and it needs CUDA) is one error naming the option, before any work."""
    root, wan = world
    out = tmp_path / "out"
    assert run_main(main, [*synthetic_args(root, wan, out), "--attention-backend", "flash"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--attention-backend" in err and "flash" in err
    assert not (out / "shards").exists() and not list(out.glob("*.safetensors"))


# ------------------------------------------------------------------ training on the results
def test_both_stages_train_a_step_on_prepared_data(world, synthetic, videos, tmp_path):
    from tmd_train.engine.config import config_from_dict
    from tmd_train.engine.logging import read_metrics
    from tmd_train.engine.trainer import fit
    from tmd_train.methods import Stage1Config, Stage2Config, build_method

    _, wan = world
    common = dict(teacher=str(wan), head_blocks=2, batch_size=2, lr=1e-3, steps=1, log_every=1, checkpoint_every=1,
                  seed=0)
    fit(build_method(config_from_dict(Stage1Config, dict(common, data=str(videos), output_dir=str(tmp_path / "s1")))))
    assert (tmp_path / "s1" / "student").is_dir()
    cfg = config_from_dict(Stage2Config, dict(common, data=str(synthetic), output_dir=str(tmp_path / "s2"),
                                              outer_steps=1, kd_pairs=str(synthetic), kd_steps=1, disc_width=8,
                                              disc_groups=4))
    fit(build_method(cfg))
    rows = read_metrics(tmp_path / "s2")
    assert any("loss_kd" in r for r in rows) and all(math.isfinite(v) for r in rows for v in r.values()
                                                      if isinstance(v, float))


# ------------------------------------------------------------------ resume, several processes
def test_resume_after_a_kill_gives_the_same_dataset(world, synthetic, tmp_path, monkeypatch, capsys):
    root, wan = world
    out = tmp_path / "killed"
    real = runner._run_chunk
    calls = []

    def dies_in_the_second_chunk(plan, worker, c, bar, counter):
        calls.append(c)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-run
        real(plan, worker, c, bar, counter)

    monkeypatch.setattr(runner, "_run_chunk", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        main(synthetic_args(root, wan, out))
    monkeypatch.setattr(runner, "_run_chunk", real)
    assert not (out / "index.json").exists() and (out / "shard-00000.safetensors").is_file()
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    assert main(synthetic_args(root, wan, out)) == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first      # finished shard not redone
    assert files(out) == files(synthetic)
    assert main(synthetic_args(root, wan, out)) == 0
    assert "already complete" in capsys.readouterr().out
    assert run_main(main, [*synthetic_args(root, wan, out), "--seed", "1"]) == 2
    assert "other settings (seed differ)" in capsys.readouterr().err


@pytest.mark.dist
def test_torchrun_two_processes_give_the_same_dataset(world, synthetic, tmp_path):
    root, wan = world
    out = tmp_path / "two"
    proc = torchrun(["-m", "tmd_train.prepare", *synthetic_args(root, wan, out)], tmp_path,
                    before_retry=lambda: shutil.rmtree(out, ignore_errors=True))
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("prepare synthetic: 4 clips") == 1, output(proc)   # rank 0 reports
    assert files(out) == files(synthetic)


def test_kd_pairs_resume_after_a_kill_gives_the_same_pairs(world, tmp_path, monkeypatch):
    from tmd_train.kd_pairs import main as kd_main

    _, wan = world

    def args(out):
        return ["--teacher", str(wan), "--data", "synthetic", "--n", "5", "--out", str(out), "--steps", "2",
                "--cfg", "2", "--batch-size", "2", "--shard-size", "2", "--latent-size", "2", "4", "4",
                "--text-len", "3", "--no-progress"]

    assert kd_main(args(tmp_path / "whole")) == 0
    real = runner._run_chunk
    calls = []

    def dies_in_the_third_chunk(plan, worker, c, bar, counter):
        calls.append(c)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(plan, worker, c, bar, counter)

    monkeypatch.setattr(runner, "_run_chunk", dies_in_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        kd_main(args(tmp_path / "killed"))
    monkeypatch.setattr(runner, "_run_chunk", real)
    assert kd_main(args(tmp_path / "killed")) == 0
    assert files(tmp_path / "killed") == files(tmp_path / "whole")
    ds = LatentDataset(tmp_path / "whole")
    assert ds.kind == "kd" and len(ds) == 5 and ds.metadata["t_max"] == 0.999


def test_batched_prompt_encoding_is_wan_pipelines(world):
    from diffusers import WanPipeline

    _, wan = world
    prompts = ["a red  ball bounces ", "two triangles spin around the green circle slowly"]
    pipe = WanPipeline.from_pretrained(wan, local_files_only=True)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                                     device="cpu")
    emb, mask = PromptEncoder(wan / "text_encoder", wan / "tokenizer", "cpu", torch.float32, TEXT_LEN).encode(prompts)
    torch.testing.assert_close(emb, want)
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True).attention_mask
    assert torch.equal(mask, torch.tensor(tokens).bool()) and mask.sum(1).tolist()[0] < mask.sum(1).tolist()[1]
