"""TMDPipeline on a tiny Wan2.1 folder in the real formats: the same frames as the samplers + Wan's decode, a
save_pretrained/from_pretrained round trip (copied and referenced components), a DMD2-v folder, the stage-2 run
fallback for the components, model CPU offload and VAE tiling, the attention-backend option and the sampling
CLI's prompt file."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from support.tiny import TINY_CONFIG, randomize_zero_init
from support.wan_folder import FRAMES, HEIGHT, WIDTH, build_wan_folder

from tmd_train import TMDPipeline, TMDStudent, effective_nfe, load_teacher, sample_few_step, sample_tmd
from tmd_train.engine.config import TrainConfig
from tmd_train.errors import ConfigError, MissingFileError
from tmd_train.models import attention
from tmd_train.sample import main as sample_main
from tmd_train.text.umt5 import PromptEncoder

H = 2
TEXT_LEN = 16
LATENT = (1, TINY_CONFIG["in_channels"], 2, HEIGHT // 8, WIDTH // 8)
VIDEO = {"num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "max_sequence_length": TEXT_LEN}
PROMPT = "a red ball bounces"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """wan: the tiny Wan folder; tmd: a stage-2-like TMD student folder (tmd_sampling.json M=1, N=3);
    dmd2v: a DMD2-v folder (M=2); run: a training run folder whose config.yaml names the teacher."""
    root = tmp_path_factory.mktemp("pipeline")
    wan = build_wan_folder(root / "wan")
    student = TMDStudent.from_teacher(load_teacher(wan), head_blocks=H)
    randomize_zero_init(student, torch.Generator().manual_seed(4))
    student.save_pretrained(root / "tmd")
    (root / "tmd" / "tmd_sampling.json").write_text(json.dumps(
        {"method": "tmd", "outer_steps": 1, "outer_shift": 10.0, "t_max": 0.999, "inner_steps": 3,
         "inner_shift": 10.0, "s_max": 0.999, "head_blocks": H}))
    shutil.copytree(wan / "transformer", root / "dmd2v")
    (root / "dmd2v" / "tmd_sampling.json").write_text(json.dumps(
        {"method": "dmd2v", "outer_steps": 2, "outer_shift": 10.0, "t_max": 0.999}))
    shutil.copytree(root / "tmd", root / "run" / "student")
    (root / "run" / "config.yaml").write_text(f"teacher: {wan}\nmethod: tmd\n")
    return {"wan": wan, "tmd": root / "tmd", "dmd2v": root / "dmd2v", "run": root / "run"}


@pytest.fixture(scope="module")
def pipe(folders):
    p = TMDPipeline.from_pretrained(folders["tmd"], wan=folders["wan"])
    p.set_progress_bar_config(disable=True)
    return p


def _text(wan) -> torch.Tensor:
    return PromptEncoder(wan / "text_encoder", wan / "tokenizer", "cpu", torch.float32, TEXT_LEN)(PROMPT)


def _frames(wan, latents: torch.Tensor) -> np.ndarray:
    """Wan's decode of normalised latents -> [B, F, H, W, 3] in [0, 1], written out by hand."""
    vae = AutoencoderKLWan.from_pretrained(wan / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean, return_dict=False)[0].clamp(-1, 1)
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


def test_same_frames_as_sampler_and_decode(folders, pipe, tmp_path):
    """A TMD student folder + wan=: Algorithm 1 with the folder's tmd_sampling.json (M=1, N=3), decoded."""
    from diffusers.utils import export_to_video

    assert pipe.kind == "student" and pipe.settings()["steps"] == 1 and pipe.settings()["inner_steps"] == 3
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **VIDEO)
    student = TMDStudent.from_pretrained(folders["tmd"]).eval()
    want = sample_tmd(student, _text(folders["wan"]), shape=LATENT, generator=torch.Generator().manual_seed(3),
                      M=1, N=3)
    assert out.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(out.frames, _frames(folders["wan"], want.x0), rtol=0, atol=1e-6)
    assert out.nfe == pytest.approx(effective_nfe(1, 3, H, TINY_CONFIG["num_layers"]))
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **VIDEO).frames
    torch.testing.assert_close(latents, want.x0, atol=0, rtol=0)
    # options override the recorded settings; a second video per prompt is the next row of one draw
    two = pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", outer_steps=2,
               inner_steps=2, num_videos_per_prompt=2, **VIDEO).frames
    want2 = sample_tmd(student, _text(folders["wan"]).expand(2, -1, -1), shape=(2, *LATENT[1:]),
                       generator=torch.Generator().manual_seed(3), M=2, N=2)
    torch.testing.assert_close(two, want2.x0, atol=0, rtol=0)
    pil = pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type="pil", **VIDEO).frames[0]
    assert len(pil) == FRAMES and pil[0].size == (WIDTH, HEIGHT)
    path = export_to_video(list(out.frames[0]), str(tmp_path / "v.mp4"), fps=8)
    assert (tmp_path / "v.mp4").stat().st_size > 0 and path.endswith("v.mp4")
    with pytest.raises(ValueError, match="guidance_scale applies to a teacher only"):
        pipe(PROMPT, guidance_scale=3.0, **VIDEO)
    with pytest.raises(ValueError, match="num_frames must be 4k\\+1"):
        pipe(PROMPT, **{**VIDEO, "num_frames": 6})


@pytest.mark.parametrize("copy", [True, False])
def test_save_pretrained_round_trip(folders, pipe, tmp_path, copy):
    pipe.save_pretrained(tmp_path / "pipe", copy_components=copy)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "TMDPipeline" and index["transformer"] == ["tmd_train", "TMDStudent"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["sampling"]["inner_steps"] == 3
    assert (tmp_path / "pipe" / "transformer" / "tmd_sampling.json").is_file()
    assert (tmp_path / "pipe" / "vae").is_dir() == copy
    if not copy:
        assert index["tmd_components"]["vae"] == str((folders["wan"] / "vae").resolve())
    loaded = TMDPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.kind == "student" and loaded.sampling == pipe.sampling
    kw = {"generator": torch.Generator().manual_seed(7), "output_type": "np", **VIDEO}
    a = pipe(PROMPT, **kw).frames
    kw["generator"] = torch.Generator().manual_seed(7)
    np.testing.assert_array_equal(loaded(PROMPT, **kw).frames, a)
    assert loaded.model_hash() == pipe.model_hash()  # the same weights and config files


def test_dmd2v_folder(folders, tmp_path):
    pipe = TMDPipeline.from_pretrained(folders["dmd2v"], wan=folders["wan"], text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.kind == "few_step" and pipe.text_encoder is None
    text = _text(folders["wan"])
    out = pipe(prompt_embeds=text, generator=torch.Generator().manual_seed(2), output_type="latent", **VIDEO)
    want = sample_few_step(load_teacher(folders["dmd2v"]), text, shape=LATENT,
                           generator=torch.Generator().manual_seed(2), steps=2)
    torch.testing.assert_close(out.frames, want.x0, atol=0, rtol=0)
    assert out.nfe == 2
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(PROMPT, **VIDEO)
    pipe.save_pretrained(tmp_path / "p")
    assert TMDPipeline.from_pretrained(tmp_path / "p").kind == "few_step"


def test_components_from_the_run_or_a_clear_error(folders):
    """A stage-2 student folder alone: its run's config.yaml names the teacher; without it the error says
    what to pass."""
    assert TMDPipeline.from_pretrained(folders["run"] / "student").vae is not None
    with pytest.raises(MissingFileError, match="no vae/.*pass wan=<a Wan2.1 diffusers folder>"):
        TMDPipeline.from_pretrained(folders["tmd"])
    with pytest.raises(MissingFileError, match="not a Wan2.1 diffusers folder"):
        TMDPipeline.from_pretrained(folders["tmd"], wan=folders["tmd"])
    teacher = TMDPipeline.from_pretrained(folders["wan"])
    assert teacher.kind == "teacher" and teacher.settings()["steps"] == 50 and teacher.settings()["cfg"] == 5.0


def test_cpu_offload_and_vae_tiling(folders, monkeypatch):
    pipe = TMDPipeline.from_pretrained(folders["tmd"], wan=folders["wan"])
    pipe.set_progress_bar_config(disable=True)
    kw = {"output_type": "np", **VIDEO}
    want = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(getattr(pipe, n), "_hf_hook") for n in ("transformer", "vae", "text_encoder"))
    moved = []
    for name in ("transformer", "vae"):
        hook = getattr(pipe, name)._hf_hook
        monkeypatch.setattr(hook, "pre_forward", lambda m, *a, _f=hook.pre_forward, _n=name, **k: (
            moved.append(_n), _f(m, *a, **k))[1])
    np.testing.assert_allclose(pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames, want,
                               rtol=0, atol=1e-5)
    assert "transformer" in moved and "vae" in moved  # both were brought to the execution device
    pipe.remove_all_hooks()
    calls = []
    tiled = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda *a, **k: (calls.append(1), tiled(*a, **k))[1])
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                           tile_sample_stride_width=8)
    tiles = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).frames
    assert calls and tiles.shape == want.shape


def test_attention_backend_option(folders, pipe, monkeypatch, tmp_path, capsys):
    assert attention.attention_backend_of(pipe.wan_transformer) == "native"
    for name in ("flash", "sage", "_flash_3", "flash_hub"):
        try:
            __import__({"flash": "flash_attn", "sage": "sageattention", "_flash_3": "flash_attn_interface",
                        "flash_hub": "kernels"}[name])
            continue  # installed: nothing to refuse
        except ImportError:
            pass
        with pytest.raises(ConfigError, match=f"attention_backend={name}: the backend's package is not installed;"
                                              " install it with"):
            pipe.set_attention_backend(name)
    with pytest.raises(ConfigError, match="attention_backend=bogus: unknown attention backend"):
        pipe.set_attention_backend("bogus")
    with pytest.raises(ConfigError, match="attention_backend"):
        TrainConfig(teacher="x", attention_backend="flash2").validate()
    TrainConfig(teacher="x", attention_backend="sage").validate()  # a known name: checked when applied
    # the plumbing: with the package check passed, every attention layer gets the backend (CUDA-only on CPU refused)
    monkeypatch.setattr(attention, "_installed", lambda name: True)
    monkeypatch.setattr("diffusers.models.attention_dispatch._check_attention_backend_requirements", lambda b: None)
    with pytest.raises(ConfigError, match="runs on CUDA only, but the model is on cpu"):
        pipe.set_attention_backend("flash")
    student = TMDStudent.from_pretrained(folders["tmd"], device="meta")
    attention.set_attention_backend(student, "sage")
    assert attention.attention_backend_of(student) == "sage"
    attention.set_attention_backend(student, "native")
    assert attention.attention_backend_of(student) == "native"
    monkeypatch.undo()
    rc = sample_main(["--model", str(folders["tmd"]), "--components", str(folders["wan"]), "--prompt", PROMPT,
                      "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES), "--device", "cpu",
                      "--attention-backend", "flash", "--out", str(tmp_path / "x.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and ("\n" + err).count("\nerror: ") == 1 and "--attention-backend flash" in err, err


@pytest.mark.cuda
def test_flash_backend_matches_native_on_cuda(folders):
    pytest.importorskip("flash_attn")
    pipe = TMDPipeline.from_pretrained(folders["tmd"], wan=folders["wan"], torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw = {"output_type": "latent", **VIDEO}
    want = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames.float()
    pipe.set_attention_backend("flash")
    got = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames.float()
    pipe.set_attention_backend("native")
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_sample_cli_prompt_file(folders, tmp_path, capsys):
    """--prompts FILE --out DIR: one mp4 per prompt, named {prompt}-0.mp4, the i-th with seed --seed + i."""
    import imageio.v3 as iio

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball bounces\n\ntwo triangles spin around\n")
    rc = sample_main(["--model", str(folders["tmd"]), "--components", str(folders["wan"]), "--prompts",
                      str(prompts), "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES),
                      "--device", "cpu", "--out", str(tmp_path / "videos"), "--seed", "5", "--no-progress",
                      "--max-text-len", str(TEXT_LEN)])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["a red ball bounces-0.mp4", "two triangles spin around-0.mp4"]
    assert iio.imread(tmp_path / "videos" / names[1], index=None).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert re.search(r"-> .*videos \(2 videos\)", capsys.readouterr().out)
