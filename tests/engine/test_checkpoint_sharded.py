"""Sharded checkpoints (torch.distributed.checkpoint) and the streaming export: each of 2 processes writes
only its shards and a resume is exact; the streamed ``student/`` equals the full state; ``python -m
tmd_train.export`` turns a checkpoint into the same folder offline; an earlier full-state checkpoint is
refused; the safetensors stream writes what ``safetensors`` reads."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.run import TESTS, output, torchrun
from support.tiny import TINY_CONFIG
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tmd_train.engine.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    SaveError,
    folder_manifest,
    load_sharded,
    save_sharded,
    verify_checkpoint,
)
from tmd_train.engine.config import config_from_dict
from tmd_train.engine.consolidate import SafetensorsStream, dcp_metadata, read_dcp_tensors
from tmd_train.engine.logging import read_metrics
from tmd_train.engine.trainer import fit
from tmd_train.export import export_checkpoint
from tmd_train.export import main as export_main
from tmd_train.methods import Stage1Config, build_method
from tmd_train.models import TMDStudent

TEACHER = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return bool(a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the safetensors stream
def test_safetensors_stream_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.bf16": torch.randn(3, 5, generator=g).bfloat16(), "a.scalar": torch.tensor(2.5),
               "c.int": torch.arange(7, dtype=torch.int64), "d.empty": torch.zeros(0, 4),
               "e.half": torch.randn(2, 2, 2, generator=g).half(), "f.bool": torch.tensor([True, False])}
    path = tmp_path / "x.safetensors"
    stream = SafetensorsStream(path, [(k, v.dtype, v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        stream.write(k, v)
    stream.close()
    got = load_file(str(path))
    assert sorted(got) == sorted(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header % 8 == 0 and path.stat().st_size == 8 + header + sum(v.nbytes for v in tensors.values())
    # out of order, a wrong shape, a missing entry
    stream = SafetensorsStream(tmp_path / "y.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (1,))])
    with pytest.raises(ValueError, match="got b .*expected a"):
        stream.write("b", torch.zeros(1))
    with pytest.raises(ValueError, match=r"expected a torch.float32 \(2,\)"):
        stream.write("a", torch.zeros(3))
    stream.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors were not written"):
        stream.close()


# ------------------------------------------------------------------ the sharded save: round trip, full disk
def test_sharded_round_trip_and_full_disk(tmp_path, monkeypatch):
    """save_sharded/load_sharded round-trip a nested state (tensors and small values); a full disk inside
    torch.distributed.checkpoint's write is a SaveError (ENOSPC) that leaves no partial folder; a state
    that does not fit the checkpoint is an error naming the entry."""
    writer = CheckpointWriter(tmp_path, keep_last=2, is_main=True)
    state = {"net": {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optim": {"lr": 0.5}}}
    path = writer.save(1, lambda folder, is_main: save_sharded(folder, state), {})
    got = {"net": {"model": {"w": torch.zeros(2, 3)}, "optim": {"lr": 0.0}}}
    load_sharded(path, got)
    assert torch.equal(got["net"]["model"]["w"], state["net"]["model"]["w"]) and got["net"]["optim"]["lr"] == 0.5
    with pytest.raises(RuntimeError, match="net.model.v"):
        load_sharded(path, {"net": {"model": {"v": torch.zeros(2, 3)}}})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SaveError, match="checkpoint-0000002: no space left on device") as info:
        writer.save(2, lambda folder, is_main: save_sharded(folder, state), {})
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-0000001"]


# ------------------------------------------------------------------ one process: export = full state, CLI, old format
def stage1_cfg(output_dir, **over) -> Stage1Config:
    values = dict(teacher=TEACHER, head_blocks=2, synthetic_samples=8, synthetic_latent_size=[1, 4, 4],
                  synthetic_text_len=3, batch_size=8, lr=1e-2, steps=2, log_every=1, checkpoint_every=2,
                  keep_last=3, output_dir=str(output_dir), seed=0, objective={"cfg_scale": 1.0})
    values.update(over)
    return config_from_dict(Stage1Config, values)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    method = build_method(stage1_cfg(out))
    final = fit(method)
    return out, final, method


def test_streamed_export_equals_the_full_state(stage1_run):
    """``student/`` (streamed) holds exactly the trained student's full state dict; the checkpoint's
    model entries are that state too, and its optimizer state is AdamW's."""
    out, final, method = stage1_run
    full = {k: v.detach() for k, v in method.student.state_dict().items()}
    assert same(load_file(str(final / "model.safetensors")), full)
    assert json.loads((final / "config.json").read_text())["student"]["head_blocks"] == 2
    TMDStudent.from_pretrained(final)
    ckpt = out / "checkpoint-0000002"
    saved = dict(read_dcp_tensors(ckpt / "dcp"))
    assert same({k[len("student.model.student."):]: v for k, v in saved.items()
                 if k.startswith("student.model.student.")}, full)
    names = dict(method.model.named_parameters())
    exp_avg = {k[len("student.optim.state."):-len(".exp_avg")]: v for k, v in saved.items()
               if k.startswith("student.optim.state.") and k.endswith(".exp_avg")}
    assert exp_avg.keys() == names.keys()
    assert all(torch.equal(v, method.optimizer.state[names[k]]["exp_avg"]) for k, v in exp_avg.items())
    state = json.loads((ckpt / "state.json").read_text())
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "export/config.json", "export/export.json"} <= set(state["files"])
    assert state["files"] == folder_manifest(ckpt)


def test_export_cli(stage1_run, tmp_path, capsys):
    out, final, _ = stage1_run
    ckpt = out / "checkpoint-0000002"
    dest = tmp_path / "exported"
    # a small read budget (several reads of a few tensors), in process
    assert export_main([str(ckpt), "--out", str(dest), "--max-gib", "2e-5"]) == 0
    assert f"-> {dest}" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in final.iterdir())
    assert (dest / "config.json").read_text() == (final / "config.json").read_text()
    assert (dest / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    # an existing --out: refused, then replaced with --overwrite
    assert export_main([str(ckpt), "--out", str(dest)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    (dest / "model.safetensors").write_bytes(b"")
    assert export_main([str(ckpt), "--out", str(dest), "--overwrite"]) == 0
    assert same(load_file(str(dest / "model.safetensors")), load_file(str(final / "model.safetensors")))
    # a damaged checkpoint (a truncated shard) and a missing one
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = bad / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert export_main([str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "dcp/__0_0.distcp has 100 bytes" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_earlier_full_state_checkpoint_is_refused(stage1_run, tmp_path):
    """A checkpoint of the earlier format (whole-model safetensors + optimizer.pt), complete and verified,
    is refused by a resume and by the export CLI, saying what it is."""
    out, _, _ = stage1_run
    old = tmp_path / "run" / "checkpoint-0000002"
    old.mkdir(parents=True)
    shutil.copy(out / "checkpoint-0000002" / "config.yaml", old / "config.yaml")
    torch.save({"state": {}, "param_groups": []}, old / "optimizer.pt")
    (old / "student").mkdir()
    save_file({"w": torch.zeros(2)}, str(old / "student" / "model.safetensors"))
    state = {"step": 2, "run_id": "0" * 16, "skipped_steps": 0, "world_size": 1, "files": folder_manifest(old)}
    (old / "state.json").write_text(json.dumps(state))
    verify_checkpoint(old)
    with pytest.raises(CheckpointError, match=r"earlier full-state format \(optimizer.pt, student\)"):
        fit(build_method(stage1_cfg(tmp_path / "run", steps=4)), resume="latest")
    with pytest.raises(CheckpointError, match="earlier full-state format"):
        export_checkpoint(old, tmp_path / "x")


# ------------------------------------------------------------------ two processes
def shard_payload(dcp_dir: Path) -> tuple[dict[str, int], dict[str, set[str]]]:
    """From a ``dcp/`` folder's metadata: the tensor bytes in each shard file, and the files holding each
    tensor entry."""
    meta = dcp_metadata(dcp_dir)
    payload: dict[str, int] = {}
    files_of: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        entry = meta.state_dict_metadata[index.fqn]
        if not isinstance(entry, TensorStorageMetadata):
            continue
        chunk = next(c for c in entry.chunks if tuple(c.offsets) == tuple(index.offset))
        nbytes = torch.Size(chunk.sizes).numel() * torch.empty((), dtype=entry.properties.dtype).element_size()
        payload[info.relative_path] = payload.get(info.relative_path, 0) + nbytes
        files_of.setdefault(index.fqn, set()).add(info.relative_path)
    return payload, files_of


@pytest.mark.dist
def test_two_process_shards_and_exact_resume(tmp_path):
    """torchrun --nproc_per_node 2 (gloo), stage 2 (tmd): each process wrote one shard file of about
    half the state (no process a full copy); the run resumed at step 2 ends bit-identical to the
    uninterrupted one (every model, EMA and optimizer entry, the metrics, the exported student); the
    2-process checkpoint exports offline in one process to the same student."""
    values = dict(teacher=TEACHER, head_blocks=2, synthetic_samples=8, synthetic_latent_size=[1, 4, 4],
                  synthetic_text_len=3, batch_size=1, lr=1e-3, steps=2, generator_every=1, disc_width=8,
                  disc_groups=4, log_every=1, checkpoint_every=1, keep_last=5, seed=0, outer_steps=2,
                  inner_steps=2)
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items() if k != "teacher"]
    overrides += [f"teacher.{k}={json.dumps(v)}" for k, v in TEACHER.items()]

    def clean() -> None:
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        shutil.rmtree(tmp_path / "b", ignore_errors=True)
        (tmp_path / "done").unlink(missing_ok=True)

    proc = torchrun([str(TESTS / "engine" / "checkpoint_dist_worker.py"), str(tmp_path), *overrides], tmp_path,
                    before_retry=clean)
    assert proc.returncode == 0, output(proc)
    assert (tmp_path / "done").read_text().strip() == "2"
    a, b = tmp_path / "a" / "checkpoint-0000002", tmp_path / "b" / "checkpoint-0000002"

    # each process wrote only its shards: one file each, about half of the tensor bytes each, and every
    # sharded entry split between the two files
    shards = sorted((a / "dcp").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    payload, files_of = shard_payload(a / "dcp")
    total = sum(payload.values())
    assert all(0.3 < payload[p.name] / total < 0.7 for p in shards), payload
    sharded = [k for k, files in files_of.items() if len(files) > 1]
    assert all(files_of[k] == {"__0_0.distcp", "__1_0.distcp"} for k in sharded)
    assert any(k.startswith("generator.optim.state.") for k in sharded)
    assert all(k in sharded for k in files_of if k.startswith("generator_ema.generator.transformer.blocks."))
    saved = dict(read_dcp_tensors(a / "dcp"))
    state = verify_checkpoint(a)
    assert state["world_size"] == 2 and {"dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(state["files"])

    # the resume is exact
    resumed = dict(read_dcp_tensors(b / "dcp"))
    assert saved.keys() == resumed.keys()
    assert {k.split(".")[0] for k in saved} == {"generator", "generator_ema", "fake_score", "discriminator"}
    assert [k for k in saved if not torch.equal(saved[k], resumed[k])] == []

    def rows(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(out)]
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) == 2
    student = load_file(str(tmp_path / "a" / "student" / "model.safetensors"))
    assert same(student, load_file(str(tmp_path / "b" / "student" / "model.safetensors")))

    # the streamed student is the EMA generator; the offline export of the 2-process checkpoint equals it
    ema = {k[len("generator_ema.generator."):]: v for k, v in saved.items() if k.startswith("generator_ema.")}
    assert ema and all(torch.equal(student[k], v) for k, v in ema.items())
    exported = export_checkpoint(a, tmp_path / "exported", progress=False)
    assert same(load_file(str(exported / "model.safetensors")), student)
    TMDStudent.from_pretrained(exported)
