"""The toy world through the normal CLIs: `python -m tmd_train.sample` on the shipped toy teacher and on toy
students (PNG grid, GIF, clips equal to the samplers'), `python -m tmd_train.evaluate tinybench` on a model
folder (the scores TinyBench gives the same clips), and their user errors (one `error:` line, exit 2)."""
from __future__ import annotations

import json
import math
import re
import shutil

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.run import output, run_module
from support.tiny import TINY_CONFIG, randomize_zero_init

from tmd_train import (
    TMDStudent,
    effective_nfe,
    evaluate,
    load_teacher,
    sample,
    sample_few_step,
    sample_teacher,
    sample_tmd,
)
from tmd_train.toy import TOY_TEACHER_DIR, text_encoder, tinybench
from tmd_train.toy.clips import make_batch, sample_prompts

PROMPTS = ["a red circle moving left", "a blue bar moving up and a green ring moving down"]
SCALE = 2
GRID = (2 * (32 + 2) - 2, 8 * (32 + 2) - 2)  # a row per prompt, 8 frames, 2 px apart; before upscaling


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The subprocesses run on one thread; so do the in-process references (same arithmetic, same bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Toy model folders: a TMD student N2H1 (tmd_sampling.json M=1), a DMD2-v student (M=2), a non-toy
    transformer folder (config only)."""
    root = tmp_path_factory.mktemp("toy_cli")
    student = TMDStudent.from_teacher(load_teacher(TOY_TEACHER_DIR), head_blocks=1)
    randomize_zero_init(student, torch.Generator().manual_seed(3))
    student.save_pretrained(root / "tmd")
    (root / "tmd" / "tmd_sampling.json").write_text(json.dumps(
        {"method": "tmd", "outer_steps": 1, "outer_shift": 10.0, "t_max": 0.999, "inner_steps": 2,
         "inner_shift": 10.0, "s_max": 0.999, "head_blocks": 1}))
    shutil.copytree(TOY_TEACHER_DIR, root / "dmd2v")
    (root / "dmd2v" / "tmd_sampling.json").write_text(json.dumps(
        {"method": "dmd2v", "outer_steps": 2, "outer_shift": 10.0, "t_max": 0.999}))
    (root / "wan").mkdir()
    (root / "wan" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TINY_CONFIG}))
    return {"teacher": TOY_TEACHER_DIR, "tmd": root / "tmd", "dmd2v": root / "dmd2v", "wan": root / "wan"}


def _one_error_line(proc_or_err, match: str) -> str:
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    assert ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err and re.search(match, err), err
    return err


def test_sample_toy_teacher(tmp_path):
    """The shipped toy teacher from plain prompts: PNG grid and GIF of the right size, clips = sample_teacher."""
    outs = [tmp_path / "grid.png", tmp_path / "anim.gif", tmp_path / "clips.safetensors"]
    proc = run_module("tmd_train.sample", ["--model", str(TOY_TEACHER_DIR), "--prompt", PROMPTS[0], "--prompt",
                                           PROMPTS[1], "--steps", "2", "--seed", "5", "--scale", str(SCALE),
                                           *[a for o in outs for a in ("--out", str(o))], "--no-progress"], tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "NFE 4.000" in proc.stdout  # 2 Euler steps, each a conditional + an unconditional pass
    grid = iio.imread(outs[0])
    assert grid.shape == (GRID[0] * SCALE, GRID[1] * SCALE, 3) and grid.dtype == "uint8"
    assert grid[:32 * SCALE, :32 * SCALE].std() > 5, "the first clip's first frame is not constant"
    gif = iio.imread(outs[1])  # [frames, H, W, 3]: the two clips side by side
    assert gif.shape[:3] == (8, 32 * SCALE, (2 * (32 + 2) - 2) * SCALE), gif.shape
    assert gif[:, :, :32 * SCALE].astype(float).std(axis=0).mean() > 1, "the GIF's frames differ"
    text, _ = text_encoder.encode(PROMPTS)
    want = sample_teacher(load_teacher(TOY_TEACHER_DIR), text, negative_text=text_encoder.encode_negative()[0][None],
                          shape=(2, 3, 8, 32, 32), generator=torch.Generator().manual_seed(5), steps=2, cfg=5.0)
    got = load_file(str(outs[2]))["latents"]
    torch.testing.assert_close(got, want.x0.clamp(-1, 1), atol=1e-5, rtol=0)
    frame0 = ((got[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(torch.from_numpy(grid[:32 * SCALE:SCALE, :32 * SCALE:SCALE].copy()), frame0)


def test_sample_toy_student(folders, tmp_path):
    """A TMD toy student with its tmd_sampling.json (M=1, N=2) through a subprocess: PNG + GIF, NFE of the formula."""
    png, gif = tmp_path / "s.png", tmp_path / "s.gif"
    proc = run_module("tmd_train.sample", ["--model", str(folders["tmd"]), "--prompt", PROMPTS[0], "--out", str(png),
                                           "--out", str(gif), "--no-progress"], tmp_path)
    assert proc.returncode == 0, output(proc)
    assert f"NFE {effective_nfe(1, 2, 1, 6):.3f}" in proc.stdout and "M=1 N=2 H=1 L=6" in proc.stdout
    assert iio.imread(png).shape == (32 * 4, GRID[1] * 4, 3)
    assert iio.imread(gif).shape[:3] == (8, 32 * 4, 32 * 4)


@pytest.mark.parametrize("kind", ["tmd", "dmd2v"])
def test_student_clips_match_sampler(folders, kind, tmp_path):
    """In process: the toy clips of a student folder are its sampler's, with the folder's settings."""
    out = tmp_path / "c.safetensors"
    assert sample.main(["--model", str(folders[kind]), "--prompt", PROMPTS[1], "--prompt", PROMPTS[0], "--seed", "9",
                        "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    text = text_encoder.encode([PROMPTS[1], PROMPTS[0]])[0]
    kw = {"shape": (2, 3, 8, 32, 32), "generator": torch.Generator().manual_seed(9)}
    if kind == "tmd":
        want = sample_tmd(TMDStudent.from_pretrained(folders[kind]).eval(), text, M=1, N=2, **kw)
    else:
        want = sample_few_step(load_teacher(folders[kind]), text, steps=2, **kw)
    torch.testing.assert_close(load_file(str(out))["latents"], want.x0.clamp(-1, 1), atol=0, rtol=0)


def test_unknown_toy_word_is_one_error_line(tmp_path):
    proc = run_module("tmd_train.sample", ["--model", str(TOY_TEACHER_DIR), "--prompt", "a purple circle moving left",
                                           "--out", str(tmp_path / "x.png")], tmp_path)
    assert proc.returncode == 2, output(proc)
    _one_error_line(proc, r"unknown word 'purple'.*colours: red, green, blue, yellow; shapes: circle")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case, match", [
    ("grammar", r"'red circle moving left': not of the grammar; a toy prompt is 'a <colour>"),
    ("no_prompt", "pass --prompt"),
    ("height", "--height does not apply to the toy world"),
    ("embeds", "--prompt-embeds does not apply to the toy world"),
    ("suffix", r"--out must end in \.png, \.gif, \.safetensors in the toy world"),
    ("cfg_student", "--cfg applies to the teacher only"),
    ("not_toy", r"--world toy: --model .* is not a toy-world model \(in_channels=4"),
    ("negative", "--negative-prompt 'blurry': unknown words 'blurry'"),
    ("incomplete_student", r"cannot load the student model \(.*model\.safetensors not found"),
])
def test_sample_user_errors(folders, case, match, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folders["tmd"], broken)
    (broken / "model.safetensors").unlink()
    teacher, png = ["--model", str(TOY_TEACHER_DIR)], ["--out", str(tmp_path / "x.png")]
    args = {
        "grammar": [*teacher, "--prompt", "red circle moving left", *png],
        "no_prompt": [*teacher, *png],
        "height": [*teacher, "--prompt", PROMPTS[0], "--height", "64", *png],
        "embeds": [*teacher, "--prompt-embeds", str(tmp_path / "e.safetensors"), *png],
        "suffix": [*teacher, "--prompt", PROMPTS[0], "--out", str(tmp_path / "x.mp4")],
        "cfg_student": ["--model", str(folders["tmd"]), "--prompt", PROMPTS[0], "--cfg", "2", *png],
        "not_toy": ["--model", str(folders["wan"]), "--world", "toy", "--prompt", PROMPTS[0], *png],
        "negative": [*teacher, "--prompt", PROMPTS[0], "--negative-prompt", "blurry", *png],
        "incomplete_student": ["--model", str(broken), "--prompt", PROMPTS[0], *png],
    }[case]
    assert sample.main([*args, "--steps", "1", "--no-progress", "--device", "cpu"]) == 2
    _one_error_line(capsys.readouterr().err, match)
    assert not (tmp_path / "x.png").exists()


def test_evaluate_tinybench_teacher(tmp_path):
    """`evaluate tinybench` on the toy teacher: the demo's columns printed, a JSON report of finite scores that
    are TinyBench's scores of the same clips sampled in process."""
    report = tmp_path / "r" / "report.json"
    proc = run_module("tmd_train.evaluate", ["tinybench", "--model", str(TOY_TEACHER_DIR), "--n", "4", "--seed", "3",
                                             "--steps", "2", "--n-ref", "8", "--batch-size", "3", "--out",
                                             str(report), "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, output(proc)
    assert re.search(r"\| method \| steps \| NFE \| semantic \| FD \(score\) \| temporal FD \(score\) \| quality \| "
                     r"\*\*total\*\*", proc.stdout), proc.stdout
    got = json.loads(report.read_text())
    columns = ("semantic", "fd", "fd_score", "temporal_fd", "temporal_score", "quality", "total", "nfe")
    assert all(math.isfinite(got[c]) for c in columns), got
    assert got["n"] == 4 and got["nfe"] == 4.0 and got["kind"] == "teacher" and got["steps"] == "2×2"
    prompts = sample_prompts(4, 3)
    text, _ = text_encoder.encode(prompts)
    teacher, gen = load_teacher(TOY_TEACHER_DIR), torch.Generator().manual_seed(3)
    negative = text_encoder.encode_negative()[0][None]
    clips = torch.cat([sample_teacher(teacher, text[i:i + 3], negative_text=negative, shape=(len(text[i:i + 3]), 3, 8,
                                                                                              32, 32),
                                      generator=gen, steps=2).x0 for i in (0, 3)])
    want = tinybench.tinybench(clips.clamp(-1, 1), prompts, n_ref=8)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_evaluate_tinybench_student(folders, tmp_path, capsys):
    """In process on a TMD student folder: its tmd_sampling.json settings and NFE."""
    out = tmp_path / "s.json"
    assert evaluate.main(["tinybench", "--model", str(folders["tmd"]), "--n", "3", "--n-ref", "6", "--out", str(out),
                          "--device", "cpu"]) == 0
    got = json.loads(out.read_text())
    assert got["kind"] == "student" and got["steps"] == "1×(N=2)"
    assert got["nfe"] == pytest.approx(effective_nfe(1, 2, 1, 6)) and 0 <= got["total"] <= 100
    assert f"| {effective_nfe(1, 2, 1, 6):.3g} |" in capsys.readouterr().out


@pytest.mark.parametrize("case, match", [
    ("not_toy", "TinyBench scores models of the toy world"),
    ("small_n", "--n must be >= 2, got 1"),
    ("missing", "no such folder"),
])
def test_evaluate_user_errors(folders, case, match, tmp_path, capsys):
    model = {"not_toy": folders["wan"], "small_n": TOY_TEACHER_DIR, "missing": tmp_path / "nope"}[case]
    n = "1" if case == "small_n" else "4"
    assert evaluate.main(["tinybench", "--model", str(model), "--n", n, "--device", "cpu"]) == 2
    _one_error_line(capsys.readouterr().err, match)


def test_tinybench_bad_prompts_line_names_file_and_line(tmp_path):
    clips, prompts, _ = make_batch(4, seed=1)
    tinybench.save_clips(tmp_path / "gen", clips, prompts)
    path = tmp_path / "gen" / "prompts.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"id": 2, "prompt": "a red circle moving sideways"}'
    path.write_text("\n".join(lines) + "\n")
    proc = run_module("tmd_train.toy.tinybench", ["--clips", str(tmp_path / "gen")], tmp_path)
    assert proc.returncode == 2, output(proc)
    _one_error_line(proc, re.escape(f"{path} line 3: 'a red circle moving sideways' is not a prompt of the toy world"))


@pytest.mark.parametrize("line, match", [
    ('{"id": 1, "prompt"', "line 2: not JSON"),
    ('["a red circle moving left"]', "line 2: expected an object with a string 'prompt'"),
])
def test_read_prompts_errors(tmp_path, line, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 0, "prompt": "a red circle moving left"}\n' + line + "\n\n")
    with pytest.raises(tinybench.ClipsFolderError, match=re.escape(f"{path} ") + match):
        tinybench.read_prompts(path)
    save_file({"clips": torch.zeros(3, 3, 8, 32, 32)}, str(tmp_path / "clips.safetensors"))
    path.write_text('{"id": 0, "prompt": "a red circle moving left"}\n')
    with pytest.raises(tinybench.ClipsFolderError, match="holds \\(3, 3, 8, 32, 32\\) clips but prompts.jsonl 1"):
        tinybench.load_clips(tmp_path)
