"""No run's work is lost: a used output folder is refused (``--overwrite`` replaces the run and leaves
nothing of it), keep-last counts only the run's own checkpoints, a changed config is refused on resume
(allowed and recorded with ``--allow-config-change``), a damaged checkpoint is named and ``--resume
latest`` falls back past it (bit-exact from there), a full disk during a save leaves no partial folder
and says so, ``metrics.jsonl`` is strict JSON and survives a torn last line, files get the umask's modes.

Runs use the tiny stage-1 method (4-block D=16 teacher, 8 synthetic samples of [4, 1, 4, 4]) for a
few steps."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.tiny import TINY_CONFIG

import tmd_train.engine.checkpoint as checkpoint
from tmd_train.engine.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    SaveError,
    checkpoint_folders,
    folder_manifest,
    list_checkpoints,
    prepare_run,
    read_checkpoint_state,
    resolve_resume,
    save_tensors,
    verify_checkpoint,
)
from tmd_train.engine.config import config_from_dict, yaml_load
from tmd_train.engine.logging import METRICS_FILE, ScalarLogger, read_metrics
from tmd_train.engine.trainer import fit
from tmd_train.errors import ConfigError, OutputError, UserError
from tmd_train.export import export_checkpoint
from tmd_train.methods import Stage1Config, build_method


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for the whole module (faster on a busy machine; results depend on the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(output_dir, **over) -> Stage1Config:
    teacher = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}
    values = dict(teacher=teacher, head_blocks=2, synthetic_samples=8, synthetic_latent_size=[1, 4, 4],
                  synthetic_text_len=3, batch_size=8, lr=1e-2, steps=4, log_every=1, checkpoint_every=2,
                  keep_last=3, output_dir=str(output_dir), seed=0, objective={"cfg_scale": 1.0})
    values.update(over)
    return config_from_dict(Stage1Config, values)


def run(output_dir, resume=None, **over) -> Path:
    overwrite = over.pop("overwrite", False)
    allow = over.pop("allow_config_change", False)
    return fit(build_method(tiny_cfg(output_dir, **over)), resume, overwrite=overwrite, allow_config_change=allow)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    """The logged rows without the wall-clock throughput."""
    return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in read_metrics(out)]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-step run: checkpoints 2 and 4, metrics, student."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(out)
    return out


# ------------------------------------------------------------------ used output folders
def test_fresh_run_into_used_folder_is_refused_and_overwrite_replaces_it(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")                          # not the run's: never touched
    before = snapshot(out)
    with pytest.raises(OutputError) as info:
        run(out, seed=1)
    msg = str(info.value)
    assert "already holds a run" in msg and "checkpoint-0000004/" in msg and "metrics.jsonl" in msg
    assert "--resume latest" in msg and "--overwrite" in msg
    assert snapshot(out) == before                                   # nothing destroyed

    old_id = read_checkpoint_state(out / "checkpoint-0000004")["run_id"]
    run(out, seed=1, steps=2, checkpoint_every=1, overwrite=True)
    assert [s for s, _ in checkpoint_folders(out)] == [1, 2]         # the old run's 4 is gone, not "newer"
    ids = {read_checkpoint_state(p)["run_id"] for _, p in list_checkpoints(out)}
    assert len(ids) == 1 and old_id not in ids
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert same_weights(weights(out / "student"), weights(export_checkpoint(out / "checkpoint-0000002",
                                                                            tmp_path / "exported", progress=False)))
    assert not same_weights(weights(out / "student"), weights(reference / "student"))
    assert tiny_cfg(out, seed=1, steps=2, checkpoint_every=1) == config_from_dict(
        Stage1Config, yaml_load((out / "config.yaml").read_text()))
    assert len(list((out / "logs").iterdir())) == 1                  # one TensorBoard file: the new run's
    assert (out / "notes.txt").read_text() == "mine"
    assert resolve_resume("latest", out).name == "checkpoint-0000002"


def test_prepare_run_cases(tmp_path, capsys):
    """The output-folder rules without training: a file is refused; other programs' files are no run;
    ``--resume latest`` with no checkpoint starts over; a checkpoint of another folder may not be resumed
    into a used one; resuming an earlier checkpoint of the folder would mix histories."""
    cfg = {"lr": 1.0}
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_run(tmp_path / "file", None, cfg)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_text("x")
    assert prepare_run(other, None, cfg).checkpoint is None and (other / "data.bin").is_file()

    killed = tmp_path / "killed"                                      # a run killed before its first checkpoint
    killed.mkdir()
    (killed / "config.yaml").write_text("lr: 1.0\n")
    (killed / METRICS_FILE).write_text('{"step": 1}\n')
    (killed / "logs").mkdir()
    with pytest.raises(OutputError, match="already holds a run"):
        prepare_run(killed, None, cfg)
    assert prepare_run(killed, "latest", cfg).checkpoint is None
    assert "starting the run over" in capsys.readouterr().err and not list(killed.iterdir())

    out = tmp_path / "run"
    writer = CheckpointWriter(out, keep_last=5, is_main=True)
    for step in (1, 2, 3):
        writer.save(step, lambda folder, is_main: (folder / "config.yaml").write_text("lr: 1.0\n"), {})
    (out / "student").mkdir()
    start = prepare_run(out, str(out / "checkpoint-0000003"), cfg)
    assert start.checkpoint == out / "checkpoint-0000003" and start.run_id == writer.run_id
    with pytest.raises(OutputError, match="two histories.*checkpoint-0000003/"):
        prepare_run(out, str(out / "checkpoint-0000002"), cfg)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoint-0000001", elsewhere)
    with pytest.raises(OutputError, match="is not one of its checkpoints"):
        prepare_run(out, str(elsewhere), cfg)
    assert [s for s, _ in checkpoint_folders(out)] == [1, 2, 3]
    prepare_run(out, str(out / "checkpoint-0000002"), cfg, overwrite=True)
    assert [s for s, _ in checkpoint_folders(out)] == [1, 2] and not (out / "student").exists()


def test_keep_last_counts_only_this_runs_checkpoints(tmp_path):
    """Another run's checkpoints (earlier or later steps) never push out this run's, and are never
    deleted by it."""
    def write(folder, is_main):
        (folder / "w.txt").write_text(folder.name)

    old = CheckpointWriter(tmp_path, keep_last=3, is_main=True)
    for step in (1, 6, 7):
        old.save(step, write, {})
    new = CheckpointWriter(tmp_path, keep_last=1, is_main=True)
    new.save(2, write, {})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 6, 7]
    new.save(3, write, {})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3, 6, 7]


# ------------------------------------------------------------------ changed config on resume
def test_config_change_is_refused_then_allowed_and_recorded(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    with pytest.raises(ConfigError) as info:
        run(out, "latest", head_blocks=3, lr=2e-2, steps=6)
    msg = str(info.value)
    assert "head_blocks: 2 -> 3" in msg and "lr: 0.01 -> 0.02" in msg and "--allow-config-change" in msg
    assert "steps" not in msg                                          # a resumable key
    with pytest.raises(ConfigError, match=r"objective\.cfg_scale: 1\.0 -> 2\.0"):
        run(out, "latest", **{"objective": {"cfg_scale": 2.0}})
    with pytest.raises(ConfigError, match=r"teacher\.ffn_dim: 32 -> 48"):
        run(out, "latest", teacher={**TINY_CONFIG, "patch_size": [1, 2, 2], "ffn_dim": 48})
    assert snapshot(out) == before

    run(out, "latest", lr=2e-2, steps=6, allow_config_change=True)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
    (record,) = [json.loads(ln) for ln in (out / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and record["checkpoint"] == str(out / "checkpoint-0000004")
    assert record["changes"] == {"lr": {"old": 0.01, "new": 0.02}, "steps": {"old": 4, "new": 6},
                                 "output_dir": {"old": str(reference), "new": str(out)}}    # the copied folder
    assert record["allowed_by_flag"] == ["lr"]
    run(out, "latest", lr=2e-2, steps=7)                               # resumable keys only: no flag needed
    record = json.loads((out / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["changes"] == {"steps": {"old": 6, "new": 7}} and record["allowed_by_flag"] == []


# ------------------------------------------------------------------ damaged checkpoints
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": (lambda c: truncate(c / "dcp" / "__0_0.distcp"),
                        r"dcp/__0_0.distcp has \d+ bytes, \d+ were written \(truncated\)"),
    "truncated shard index": (lambda c: truncate(c / "dcp" / ".metadata"),
                              r"dcp/.metadata has \d+ bytes, \d+ were written \(truncated\)"),
    "flipped byte": (lambda c: flip_byte(c / "rng_state_0.pt"), "rng_state_0.pt does not match the SHA-256"),
    "missing file": (lambda c: (c / "rng_state_0.pt").unlink(), "rng_state_0.pt is missing"),
    "empty state.json": (lambda c: (c / "state.json").write_text(""), "state.json is empty"),
    "bad state.json": (lambda c: (c / "state.json").write_text('{"step": '), "state.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_and_resumes_exactly(reference, tmp_path, capsys, damage):
    hurt, problem = DAMAGE[damage]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    hurt(out / "checkpoint-0000004")
    with pytest.raises(CheckpointError, match=f"checkpoint-0000004 is damaged: {problem}") as info:
        resolve_resume(str(out / "checkpoint-0000004"), out)           # explicit: an error, no fallback
    assert "--resume latest" in str(info.value)
    capsys.readouterr()
    run(out, "latest")
    err = capsys.readouterr().err
    assert "checkpoint-0000004 is damaged: " in err and "resuming from checkpoint-0000002" in err
    assert (out / "damaged-checkpoint-0000004").is_dir()              # set aside, not deleted
    assert metrics(out) == metrics(reference)                          # steps 3, 4 repeated bit for bit
    assert same_weights(weights(out / "student"), weights(reference / "student"))
    verify_checkpoint(out / "checkpoint-0000004")
    assert resolve_resume("latest", out).name == "checkpoint-0000004"


def test_every_checkpoint_damaged(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for _, path in checkpoint_folders(out):
        (path / "state.json").write_text("")
    with pytest.raises(CheckpointError, match="no complete checkpoint .*checkpoint-0000004 is damaged.*"
                                              "checkpoint-0000002 is damaged"):
        run(out, "latest")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), out)


def test_load_error_names_the_checkpoint(reference, tmp_path):
    """A verified checkpoint that does not fit the model (an allowed architecture change)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(CheckpointError, match="could not load checkpoint .*checkpoint-0000004: RuntimeError"):
        run(out, "latest", fusion="concat", allow_config_change=True)


def test_stale_temporary_folder_is_ignored_and_removed(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    stale = out / ".tmp-checkpoint-0000006"
    shutil.copytree(out / "checkpoint-0000004", stale)
    (stale / "state.json").unlink()
    run(out, "latest", steps=5, checkpoint_every=5)
    assert not stale.exists() and "left by an interrupted save" in capsys.readouterr().err
    assert [s for s, _ in checkpoint_folders(out)] == [2, 4, 5]


# ------------------------------------------------------------------ failed saves (full disk)
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=30)


def fill(fs: Path, leave: int = 4096) -> Path:
    """Fill the filesystem of ``fs`` until ``leave`` bytes are free; returns the filler file."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def full_at(method, step: int, make_full):
    """Make the disk full just before ``method`` writes the checkpoint of ``step``."""
    real = method.save

    def save(folder, is_main):
        if method.step == step:
            make_full(folder)
        real(folder, is_main)
    method.save = save
    return method


def test_disk_full_on_a_small_tmpfs(reference, tmp_path):
    """A real ENOSPC (torch.save / safetensors on a full tmpfs) while saving checkpoint 4: the partial
    folder is removed, the message says so, checkpoint 2 is intact, and once space is freed
    ``--resume latest`` finishes the run exactly like the uninterrupted one."""
    with small_tmpfs(tmp_path / "fs", "16m") as fs:
        out = fs / "run"
        fillers = []
        method = full_at(build_method(tiny_cfg(out)), 4, lambda folder: fillers.append(fill(fs)))
        with pytest.raises(SaveError) as info:
            fit(method)
        msg = str(info.value)
        assert "checkpoint-0000004" in msg and "no space left on device" in msg and "--resume latest" in msg
        assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
        assert isinstance(info.value, UserError)
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
        assert [s for s, _ in checkpoint_folders(out)] == [2]
        verify_checkpoint(out / "checkpoint-0000002")
        fillers[0].unlink()
        run(out, "latest")
        assert metrics(out) == metrics(reference)
        assert same_weights(weights(out / "student"), weights(reference / "student"))


def test_disk_full_simulated(tmp_path):
    """The same with a simulated write failure: OSError(ENOSPC) after a partial file."""
    out = tmp_path / "run"

    def enospc(folder):
        (folder / "partial.bin").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    method = full_at(build_method(tiny_cfg(out)), 4, enospc)
    with pytest.raises(SaveError, match="could not write the checkpoint .*checkpoint-0000004: no space left on "
                                        "device; the partial checkpoint was removed"):
        fit(method)
    assert [p.name for p in out.iterdir() if p.name.startswith((".tmp", "checkpoint-"))] == ["checkpoint-0000002"]


def test_failed_save_kinds(tmp_path, monkeypatch):
    """A writer that loses the errno (torch.save's RuntimeError) on a full filesystem is still a full
    disk; other I/O errors say what they are; a bug keeps its exception; each leaves no temp folder."""
    writer = CheckpointWriter(tmp_path, keep_last=2, is_main=True)

    def fails(error):
        def write(folder, is_main):
            (folder / "a.bin").write_bytes(b"a")
            raise error
        return write

    class Full:
        f_bfree = f_bavail = 0
        f_frsize = 4096

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "statvfs", lambda path: Full())
        with pytest.raises(SaveError, match="no space left on device"):
            writer.save(1, fails(RuntimeError("PytorchStreamWriter failed writing file data/0")), {})
    with pytest.raises(SaveError, match="Permission denied") as info:
        writer.save(1, fails(PermissionError(errno.EACCES, "Permission denied")), {})
    assert info.value.errno == errno.EACCES
    with pytest.raises(KeyError, match="bug"):
        writer.save(1, fails(KeyError("bug")), {})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ metrics.jsonl
def test_metrics_are_strict_json_and_tolerate_a_torn_last_line(tmp_path, capsys):
    logger = ScalarLogger(tmp_path, enabled=True)
    logger.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    logger.log(2, {"loss": 0.25, "grad_norm": -float("inf"), "lr": 0.5})
    logger.log(3, {"loss": 0.125, "grad_norm": 1.0, "lr": 0.5})
    logger.close()
    path = tmp_path / METRICS_FILE

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    rows = [strict(ln) for ln in path.read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}
    assert rows[1]["grad_norm"] is None and rows[2]["loss"] == 0.125
    assert read_metrics(tmp_path) == rows

    with path.open("a") as f:
        f.write('{"step": 4, "loss": 0.1')                         # killed mid-write
    assert read_metrics(tmp_path) == rows
    assert "dropped the torn last line 4" in capsys.readouterr().err
    ScalarLogger(tmp_path, enabled=True, resume_step=2).close()     # resume from step 2 drops it too
    assert "dropped the torn last line 4" in capsys.readouterr().err
    assert read_metrics(tmp_path) == rows[:2] and path.read_text().endswith("}\n")
    assert "torn" not in capsys.readouterr().err

    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_metrics(tmp_path)
    path.write_text('{"loss": 1}\n')
    with pytest.raises(UserError, match=r"line 1: not a metrics row"):
        read_metrics(tmp_path)
    assert math.isnan(json.loads("NaN"))                             # older files with bare NaN still load
    path.write_text('{"step": 1, "loss": NaN}\n')
    assert math.isnan(read_metrics(tmp_path)[0]["loss"])


# ------------------------------------------------------------------ file modes
@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> set[int]:
    return {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def test_written_files_follow_the_umask(reference, tmp_path):
    assert modes(reference / "checkpoint-0000004") == {0o644} and modes(reference / "student") == {0o644}
    with umask(0o027):
        writer = CheckpointWriter(tmp_path, keep_last=1, is_main=True)
        path = writer.save(1, lambda folder, is_main: save_tensors({"w": torch.ones(2)}, folder / "w.safetensors"),
                           {})
    assert modes(path) == {0o640}
    assert read_checkpoint_state(path)["files"] == folder_manifest(path)
