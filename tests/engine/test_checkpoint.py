"""Checkpoint folders: atomic writes, the file manifest, keep-last, ``--resume latest|DIR``, RNG state
round trip (damage, full disks and the run folder: test_run_safety.py)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tmd_train.engine.checkpoint import (
    CheckpointWriter,
    list_checkpoints,
    read_checkpoint_state,
    resolve_resume,
    rng_state,
    set_rng_state,
)


def test_writer_is_atomic_and_keeps_the_last(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=2, is_main=True)
    seen = []

    def write(folder, is_main):
        assert folder.name.startswith(".tmp-") and is_main
        seen.append(folder.name)
        (folder / "x.txt").write_text("x")

    for step in (1, 2, 3):
        path = writer.save(step, write, {"counter": step * 10})
        assert path.name == f"checkpoint-{step:07d}" and (path / "x.txt").is_file()
    assert seen == [".tmp-checkpoint-0000001", ".tmp-checkpoint-0000002", ".tmp-checkpoint-0000003"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    state = read_checkpoint_state(tmp_path / "checkpoint-0000003")
    assert state == {"counter": 30, "step": 3, "run_id": writer.run_id,
                     "files": {"x.txt": {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # a folder without state.json (an interrupted write) is not a checkpoint
    (tmp_path / "checkpoint-0000009").mkdir()
    assert resolve_resume("latest", tmp_path).name == "checkpoint-0000003"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "empty") is None                 # fresh start
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-0000009"), tmp_path)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointWriter(tmp_path, keep_last=0, is_main=True)
    json.loads((tmp_path / "checkpoint-0000002" / "state.json").read_text())


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
