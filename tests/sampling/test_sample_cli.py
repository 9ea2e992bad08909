"""The sampling CLI (`python -m tmd_train.sample`) on a tiny random Wan folder in the real formats:
end to end through a subprocess (teacher baseline and TMD student -> mp4 read back with imageio),
in process against the samplers (same latents), prompt encoding against diffusers' WanPipeline,
and user errors."""
from __future__ import annotations

import re
from pathlib import Path

import imageio
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.run import run_module
from support.tiny import TINY_CONFIG, randomize_zero_init
from support.wan_folder import FRAMES, HEIGHT, WIDTH, build_wan_folder

from tmd_train import TMDStudent, effective_nfe, load_teacher, sample_teacher, sample_tmd
from tmd_train.sample import main
from tmd_train.text.umt5 import PromptEncoder

ROOT = Path(__file__).resolve().parents[2]
VIDEO = ["--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES)]
LATENT = (1, TINY_CONFIG["in_channels"], 2, HEIGHT // 8, WIDTH // 8)
H = 2  # head blocks of the test student (the tiny teacher has L = 4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(wan folder, student folder, prompt-embedding file, negative-embedding file)."""
    root = tmp_path_factory.mktemp("cli")
    wan = build_wan_folder(root / "wan")
    student = TMDStudent.from_teacher(load_teacher(wan), head_blocks=H)
    randomize_zero_init(student, torch.Generator().manual_seed(5))
    student.save_pretrained(root / "student")
    g = torch.Generator().manual_seed(6)
    emb, neg = root / "prompt.safetensors", root / "negative.safetensors"
    save_file({"text_emb": torch.randn(7, TINY_CONFIG["text_dim"], generator=g)}, str(emb))
    save_file({"text_emb": torch.randn(7, TINY_CONFIG["text_dim"], generator=g)}, str(neg))
    return wan, root / "student", emb, neg


def read_video(path: Path) -> list:
    with imageio.get_reader(str(path)) as r:
        return list(r.iter_data())


def test_folder_is_a_real_wan_folder(folders):
    """diffusers' own WanPipeline loads the tiny folder, and our prompt encoding is its encode_prompt."""
    from diffusers import WanPipeline

    wan = folders[0]
    pipe = WanPipeline.from_pretrained(wan, local_files_only=True)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLWan"
    with torch.no_grad():
        want, want_neg = pipe.encode_prompt("a red  ball bounces ", negative_prompt="blurry", max_sequence_length=32,
                                            device="cpu")
    enc = PromptEncoder(wan / "text_encoder", wan / "tokenizer", "cpu", torch.float32, 32)
    torch.testing.assert_close(enc("a red  ball bounces "), want)
    torch.testing.assert_close(enc("blurry"), want_neg)
    assert enc("a red ball")[0, -1].abs().sum() == 0  # zeros after the prompt tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_cli_end_to_end_mp4(folders, kind, tmp_path):
    wan, student, _, _ = folders
    out = tmp_path / f"{kind}.mp4"
    if kind == "teacher":
        args = ["--model", str(wan), "--steps", "2", "--cfg", "3"]
        nfe = 2 * 2  # 2 Euler steps, each a conditional + an unconditional pass
    else:
        args = ["--model", str(student), "--components", str(wan), "--steps", "2", "--inner-steps", "2", "--loop"]
        nfe = effective_nfe(2, 2, H, TINY_CONFIG["num_layers"])
    proc = run_module("tmd_train.sample", [*args, "--prompt", "a red ball bounces", *VIDEO, "--seed", "3",
                                           "--out", str(out), "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"NFE {nfe:.3f}" in proc.stdout and " s -> " in proc.stdout
    frames = read_video(out)
    assert len(frames) == FRAMES
    assert frames[0].shape == (HEIGHT, WIDTH, 3)


def _latents(path: Path) -> torch.Tensor:
    return load_file(str(path))["latents"]


@pytest.mark.parametrize("loop", ["--loop", "--no-loop"])
def test_student_latents_match_sampler(folders, loop, tmp_path, capsys):
    """Latent-only output (no text encoder, no VAE: embeddings from a file) equals sample_tmd."""
    _, student_dir, emb, _ = folders
    out = tmp_path / "x.safetensors"
    rc = main(["--model", str(student_dir), "--prompt-embeds", str(emb), *VIDEO, "--steps", "2",
               "--inner-steps", "3", "--seed", "11", "--out", str(out), "--device", "cpu", loop, "--no-progress"])
    assert rc == 0
    student = TMDStudent.from_pretrained(student_dir).eval()
    want = sample_tmd(student, load_file(str(emb))["text_emb"][None], shape=LATENT,
                      generator=torch.Generator().manual_seed(11), M=2, N=3)
    got = _latents(out)
    assert got.shape == LATENT
    torch.testing.assert_close(got, want.x0, atol=0, rtol=0)
    assert f"NFE {want.nfe:.3f}" in capsys.readouterr().out


def test_teacher_latents_match_sampler(folders, tmp_path):
    wan, _, emb, neg = folders
    out = tmp_path / "x.safetensors"
    rc = main(["--model", str(wan), "--prompt-embeds", str(emb), "--negative-prompt-embeds", str(neg), *VIDEO,
               "--steps", "3", "--cfg", "4", "--seed", "2", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    want = sample_teacher(load_teacher(wan), load_file(str(emb))["text_emb"][None],
                          negative_text=load_file(str(neg))["text_emb"][None], shape=LATENT,
                          generator=torch.Generator().manual_seed(2), steps=3, cfg=4.0)
    torch.testing.assert_close(_latents(out), want.x0, atol=0, rtol=0)


def test_prompt_is_encoded_by_the_folder_encoder(folders, tmp_path):
    """--prompt through the folder's UMT5 equals --prompt-embeds of the same encoding."""
    wan, student_dir, _, _ = folders
    enc = PromptEncoder(wan / "text_encoder", wan / "tokenizer", "cpu", torch.float32, 512)
    emb = tmp_path / "e.safetensors"
    save_file({"text_emb": enc("two triangles spin")[0]}, str(emb))
    outs = []
    for src in (["--prompt", "two triangles spin", "--components", str(wan)], ["--prompt-embeds", str(emb)]):
        outs.append(tmp_path / f"{len(outs)}.safetensors")
        assert main(["--model", str(student_dir), *src, *VIDEO, "--out", str(outs[-1]), "--device", "cpu",
                     "--no-progress"]) == 0
    torch.testing.assert_close(_latents(outs[0]), _latents(outs[1]), atol=0, rtol=0)


@pytest.mark.parametrize("case, match", [
    ("missing", "no such folder"),
    ("not_a_model", "neither a TMD student folder"),
    ("mp4_without_vae", "an mp4 needs a VAE"),
    ("no_text_encoder", "pass --prompt-embeds"),
    ("no_prompt", "pass --prompt or --prompt-embeds"),
    ("cfg_student", "--cfg applies to the teacher only"),
    ("bad_frames", "--frames must be 4k\\+1"),
    ("bad_height", "--height must be a positive multiple of 16"),
    ("bad_suffix", "--out must end in .mp4 or .safetensors"),
    ("bad_embeds", "no key 'text_emb'"),
    ("bad_width_embeds", "expects text_dim=16"),
    ("bad_steps", "--steps must be >= 1"),
])
def test_user_errors(folders, case, match, tmp_path, capsys):
    wan, student, emb, _ = folders
    bad = tmp_path / "bad.safetensors"
    save_file({"other": torch.zeros(2, 16)}, str(bad))
    wide = tmp_path / "wide.safetensors"
    save_file({"text_emb": torch.zeros(3, 8)}, str(wide))
    lat = ["--out", str(tmp_path / "x.safetensors")]
    args = {
        "missing": ["--model", str(tmp_path / "nope"), "--prompt", "x"],
        "not_a_model": ["--model", str(tmp_path), "--prompt", "x"],
        "mp4_without_vae": ["--model", str(student), "--prompt-embeds", str(emb), "--out", str(tmp_path / "x.mp4")],
        "no_text_encoder": ["--model", str(student), "--prompt", "x", *lat],
        "no_prompt": ["--model", str(student), "--components", str(wan), *lat],
        "cfg_student": ["--model", str(student), "--prompt-embeds", str(emb), "--cfg", "2", *lat],
        "bad_frames": ["--model", str(student), "--prompt-embeds", str(emb), "--frames", "6", *lat],
        "bad_height": ["--model", str(student), "--prompt-embeds", str(emb), "--height", "24", *lat],
        "bad_suffix": ["--model", str(student), "--prompt-embeds", str(emb), "--out", str(tmp_path / "x.png")],
        "bad_embeds": ["--model", str(student), "--prompt-embeds", str(bad), *lat],
        "bad_width_embeds": ["--model", str(student), "--prompt-embeds", str(wide), *lat],
        "bad_steps": ["--model", str(wan), "--prompt-embeds", str(emb), "--cfg", "1", "--steps", "0", *lat],
    }[case]
    assert main([*VIDEO, *args, "--device", "cpu", "--no-progress"]) == 2  # the case's flags come last and win
    err = capsys.readouterr().err
    assert ("\n" + err).count("\nerror: ") == 1 and re.search(match, err), err
