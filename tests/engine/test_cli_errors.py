"""The command-line convention of every ``python -m tmd_train.…`` entry point: a user error is one line
``error: …`` on stderr and exit status 2, before any model loads; a bug keeps its traceback; ``--debug``
shows the traceback of user errors; stage ``--help`` lists every config key with its default and
meaning; overrides apply on top of the toy world when neither ``--config`` nor ``teacher=`` is given."""
from __future__ import annotations

import pytest
import torch
from support.run import output, run_module

import tmd_train.kd_pairs as kd_pairs
import tmd_train.stage1 as stage1
import tmd_train.stage2 as stage2
import tmd_train.toy.clips as clips
import tmd_train.toy.evaluator as evaluator
import tmd_train.toy.train_teacher as train_teacher
from tmd_train.data.format import DatasetWriter
from tmd_train.data.sources import open_source
from tmd_train.engine.config import config_key_table
from tmd_train.errors import ConfigError, DataError, UserError, check_device, run_main
from tmd_train.methods import Stage1Config, Stage2Config
from tmd_train.toy import TOY_TEACHER_DIR, toy_teacher_available


def one_error_line(err: str) -> str:
    """The single ``error: …`` line of ``err`` (asserting there is nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a stage gets as far as building its models."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was reported")
    monkeypatch.setattr(stage1, "build_method", refuse)
    monkeypatch.setattr(stage2, "build_method", refuse)


@pytest.fixture
def fake_teacher(tmp_path):
    """A folder that passes the teacher path check (the models never load in these tests)."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_run_main_convention(capsys):
    def user_error(argv):
        raise ConfigError("steps must be >= 1, got 0\nsecond line")

    def bug(argv):
        raise KeyError("a bug")

    assert run_main(user_error, []) == 2
    assert one_error_line(capsys.readouterr().err) == "error: steps must be >= 1, got 0; second line"
    with pytest.raises(KeyError):                          # a bug keeps its traceback
        run_main(bug, [])
    with pytest.raises(ConfigError):                       # --debug: the user error's traceback too
        run_main(user_error, ["--debug"])
    seen = []
    assert run_main(lambda argv: seen.append(argv) or 0, ["a=1", "--debug", "b=2"]) == 0
    assert seen == [["a=1", "b=2"]]
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)


def stage_cases(tmp_path, fake_teacher):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: 3\nlr: 1e-4\nseed: 1: 2\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    teacher = f"teacher={fake_teacher}"
    return [
        (["lrr=1"], "unknown config key 'lrr'"),
        (["steps=abc"], "steps: expected an int, got 'abc'"),
        (["steps=0"], "steps must be >= 1"),
        (["steps=[1,"], "override 'steps=[1,': the value is not valid YAML"),
        (["--config", str(bad_yaml)], f"{bad_yaml}: YAML syntax error, line 3"),
        (["--config", str(tmp_path / "missing.yaml")], f"config file not found: {tmp_path / 'missing.yaml'}"),
        ([f"teacher={tmp_path / 'nope'}"], f"teacher={tmp_path / 'nope'}: no such folder"),
        ([teacher, f"output_dir={a_file}"], f"output_dir={a_file} is a file, not a folder"),
        ([teacher, f"output_dir={a_file}/run"], "is a file, so the folder cannot be created"),
        ([teacher, f"data={tmp_path / 'no-data'}"], "no such dataset folder"),
        ([teacher, "--resume", str(tmp_path / "no-ckpt")], "no such checkpoint folder"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]


@pytest.mark.parametrize("stage", [stage1, stage2], ids=["stage1", "stage2"])
def test_stage_user_errors_are_one_line_before_any_model(stage, tmp_path, fake_teacher, no_model_load, capsys):
    for argv, expected in stage_cases(tmp_path, fake_teacher):
        assert run_main(stage.main, argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert expected in line, (argv, line)


def test_stage2_datasets_checked_before_any_model(tmp_path, fake_teacher, no_model_load, capsys):
    """kd_pairs must be a 'kd' dataset and data a 'latents' one (read from the index only)."""
    n, L, D = 2, 3, 4
    with DatasetWriter(tmp_path / "latents", shard_size=4) as w:
        w.add_batch(["a", "b"], latents=torch.zeros(n, 4, 1, 2, 2), text_emb=torch.zeros(n, L, D),
                    text_mask=torch.ones(n, L, dtype=torch.bool))
        w.set_negative(torch.zeros(L, D), torch.ones(L, dtype=torch.bool))
    teacher = f"teacher={fake_teacher}"
    cases = [([teacher, f"kd_pairs={tmp_path / 'latents'}", "kd_steps=2", "outer_steps=1"], "needs a 'kd' dataset"),
             ([teacher, f"kd_pairs={tmp_path / 'none'}", "kd_steps=2", "outer_steps=1"], "no such dataset folder"),
             ([teacher, f"init_student={tmp_path / 'none'}"], "init_student=")]
    for argv, expected in cases:
        assert run_main(stage2.main, argv) == 2, argv
        assert expected in one_error_line(capsys.readouterr().err)


def test_dataset_that_does_not_fit_the_teacher(tmp_path):
    n, L, D = 2, 3, 4
    with DatasetWriter(tmp_path / "ds", shard_size=4) as w:
        w.add_batch(["a", "b"], latents=torch.zeros(n, 4, 1, 4, 4), text_emb=torch.zeros(n, L, D),
                    text_mask=torch.ones(n, L, dtype=torch.bool))
        w.set_negative(torch.zeros(L, D), torch.ones(L, dtype=torch.bool))
    fits = {"in_channels": 4, "text_dim": D, "patch_size": [1, 2, 2]}
    open_source(str(tmp_path / "ds"), teacher_config=fits)
    for change, words in [({"in_channels": 16}, "4 latent channels, the teacher takes 16"),
                          ({"text_dim": 8}, "text_dim is 8"), ({"patch_size": [1, 3, 3]}, "not divisible")]:
        with pytest.raises(DataError, match=words):
            open_source(str(tmp_path / "ds"), teacher_config={**fits, **change})
    with pytest.raises(DataError, match="data=shapes"):
        open_source("shapes", teacher_config={**fits, "in_channels": 16}, synthetic_samples=2)


def test_cli_subprocess_one_line_and_debug_traceback(tmp_path):
    """``python -m``: exit 2 and one stderr line; ``--debug``: the traceback of the user error. (The
    stages run in-process above: each ``python -m tmd_train.stageN`` start imports diffusers.)"""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    args = ["--out", str(a_file), "--n", "2", "--overwrite"]
    proc = run_module("tmd_train.toy.clips", args, tmp_path)
    assert proc.returncode == 2, output(proc)
    assert f"--out {a_file} is a file" in one_error_line(proc.stderr)
    proc = run_module("tmd_train.toy.clips", ["--debug", *args], tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "OutputError" in proc.stderr, output(proc)
    assert a_file.read_text() == "keep me"


def test_kd_pairs_argument_errors(tmp_path, capsys):
    base = ["--teacher", "toy", "--data", "shapes", "--n", "2"]
    (tmp_path / "used").mkdir()
    cases = [(base[:4] + ["--n", "0", "--out", str(tmp_path / "o")], "--n must be >= 1, got 0"),
             (base + ["--out", str(tmp_path / "used")], f"--out {tmp_path / 'used'} already exists"),
             (["--teacher", str(tmp_path / "nope"), "--data", "shapes", "--n", "2", "--out", str(tmp_path / "o")],
              "--teacher " + str(tmp_path / "nope") + ": no such folder"),
             (base[:2] + ["--data", str(tmp_path / "nope"), "--n", "2", "--out", str(tmp_path / "o")],
              "no such dataset folder"),
             (base + ["--out", str(tmp_path / "o"), "--device", "tpu"], "--device"),
             (base, "the following arguments are required: --out")]
    for argv, expected in cases:
        assert run_main(kd_pairs.main, argv) == 2, argv
        assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            check_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA GPU"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_toy_clips_never_destroys_before_it_can_succeed(tmp_path, capsys):
    """--overwrite onto a file or a non-dataset folder is refused up front and touches nothing; a
    dataset folder is replaced only by a complete new one."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me too")
    for out, expected in [(a_file, "is a file, not a folder"), (other, "not a dataset")]:
        assert run_main(clips.main, ["--out", str(out), "--n", "2", "--overwrite"]) == 2
        assert expected in one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "keep me" and (other / "notes.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "other"]      # no temp or moved-aside copies
    ds = tmp_path / "ds"
    assert run_main(clips.main, ["--out", str(ds), "--n", "2"]) == 0
    capsys.readouterr()
    assert run_main(clips.main, ["--out", str(ds), "--n", "3"]) == 2                # no --overwrite
    assert "pass --overwrite" in one_error_line(capsys.readouterr().err)
    assert run_main(clips.main, ["--out", str(ds), "--n", "3", "--overwrite"]) == 0
    assert len(open_source(str(ds))[0]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ds", "other"]
    with pytest.raises(FileExistsError, match="is a file"):                         # the writer itself, too
        DatasetWriter(a_file, overwrite=True)


def test_toy_trainers_do_not_overwrite_shipped_weights(tmp_path, capsys):
    shipped = sorted((p.name, p.stat().st_mtime_ns) for p in TOY_TEACHER_DIR.iterdir())
    cases = [(train_teacher.main, [], "the following arguments are required: --out"),
             (train_teacher.main, ["--out", str(TOY_TEACHER_DIR)], "--replace-shipped"),
             (train_teacher.main, ["--out", str(TOY_TEACHER_DIR), "--replace-shipped"], "already holds a model"),
             (evaluator.main, ["--train"], "--train needs --out"),
             (evaluator.main, ["--train", "--out", str(evaluator.ASSET_PATH)], "--replace-shipped")]
    for main, argv, expected in cases:
        assert run_main(main, argv) == 2, argv
        assert expected in one_error_line(capsys.readouterr().err)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in TOY_TEACHER_DIR.iterdir()) == shipped


@pytest.mark.parametrize("stage,cls", [(stage1, Stage1Config), (stage2, Stage2Config)], ids=["stage1", "stage2"])
def test_help_lists_every_key_with_default_and_meaning(stage, cls, capsys):
    rows = config_key_table(cls)
    assert all(meaning for _, _, meaning in rows), [key for key, _, meaning in rows if not meaning]
    sub = "objective" if cls is Stage1Config else "dmd"
    assert any(key.startswith(f"{sub}.") for key, _, _ in rows)
    with pytest.raises(SystemExit) as exc:
        stage.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for key, default, meaning in rows:
        assert f"  {key} = {default}" in text, key
        assert meaning.split()[0] in text
    assert "--overwrite" in text and "--allow-config-change" in text and "--debug" in text


@pytest.mark.skipif(not toy_teacher_available(), reason="the shipped toy teacher is not there")
def test_overrides_apply_on_top_of_the_toy_world(tmp_path):
    args = stage1.parse_args(["steps=3", "objective.outer_steps=1"])
    cfg = args.config
    assert (cfg.teacher, cfg.data, cfg.steps, cfg.objective.outer_steps) == (str(TOY_TEACHER_DIR), "shapes", 3, 1)
    assert cfg.head_blocks == stage1.TOY_STAGE1["head_blocks"] and cfg.objective.inner_steps == 2
    assert args.source == "toy default + 2 overrides"
    cfg = stage1.parse_args(["steps=3", "objective={cfg_scale: 2.0}"]).config      # a whole sub-config wins
    assert (cfg.objective.cfg_scale, cfg.objective.outer_steps) == (2.0, Stage1Config().objective.outer_steps)
    cfg = stage2.parse_args(["steps=3"]).config
    assert (cfg.teacher, cfg.steps, cfg.disc_width) == (str(TOY_TEACHER_DIR), 3, stage2.TOY_STAGE2["disc_width"])
    args = stage2.parse_args([f"teacher={tmp_path}", "steps=3"])             # teacher given: no toy values
    assert (args.config.data, args.config.disc_width, args.config.head_blocks) == ("synthetic", 256, 5)
    assert args.source.startswith("defaults + 2 overrides")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"teacher: {tmp_path}\n")
    args = stage1.parse_args(["--config", str(cfg_file), "steps=4", "--overwrite", "lr=1e-4", "--resume", "latest"])
    assert (args.config.steps, args.config.lr, args.config.head_blocks, args.overwrite, args.resume, args.source) == (
        4, 1e-4, 5, True, "latest", f"{cfg_file} + 2 overrides")


@pytest.mark.slow
@pytest.mark.skipif(not toy_teacher_available(), reason="the shipped toy teacher is not there")
def test_steps_override_trains_the_toy_world(tmp_path):
    """``python -m tmd_train.stage1 steps=3`` (no --config) trains the toy world for 3 steps and says so
    in its first line."""
    out = tmp_path / "run"
    proc = run_module("tmd_train.stage1", ["steps=3", f"output_dir={out}", "batch_size=2", "cpu_threads=1"],
                      tmp_path, timeout=600)
    assert proc.returncode == 0, output(proc)
    first = proc.stdout.splitlines()[0]
    assert first == f"stage1: config toy default + 4 overrides; output_dir {out}; method tm_meanflow; world size 1"
    assert (out / "student" / "model.safetensors").is_file()
    assert f"teacher: {TOY_TEACHER_DIR}" in (out / "config.yaml").read_text()


def test_no_traceback_leaks_from_the_toy_world_check(monkeypatch, tmp_path, capsys):
    """Without the toy teacher, an override-only command says what to pass (one line, exit 2)."""
    import tmd_train.toy as toy
    monkeypatch.setattr(toy, "TOY_TEACHER_DIR", tmp_path / "no-toy")
    assert run_main(stage1.main, ["steps=10"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "teacher=" in line and str(tmp_path / "no-toy") in line
