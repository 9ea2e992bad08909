"""Worker of the 2-process sharded-checkpoint test (launched by ``torchrun`` from
tests/engine/test_checkpoint_sharded.py).

    torchrun --nproc_per_node 2 tests/engine/checkpoint_dist_worker.py OUT key=value ...

Trains the stage-2 method of the overrides twice with ``fit()``: ``OUT/a`` uninterrupted to ``steps``;
``OUT/b`` stopped at ``steps // 2`` (checkpoint), then a fresh method resumes it (``--resume latest``)
to ``steps``. Writes ``OUT/done``; exits with ``os._exit(0)`` after tearing the process group down.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from tmd_train.engine.config import load_config
from tmd_train.engine.trainer import fit
from tmd_train.methods import Stage2Config, build_method

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for support.dist
from support.dist import finish  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    cfg = load_config(Stage2Config, None, [*overrides, f"output_dir={out / 'a'}"])
    fit(build_method(cfg))
    half = cfg.steps // 2
    fit(build_method(load_config(Stage2Config, None, [*overrides, f"output_dir={out / 'b'}", f"steps={half}"])))
    resumed = build_method(load_config(Stage2Config, None, [*overrides, f"output_dir={out / 'b'}"]))
    assert resumed.world == 2 and dist.get_backend() == "gloo"
    fit(resumed, resume="latest")
    if resumed.is_main:
        (out / "done").write_text(f"{resumed.step}\n")
    finish()


if __name__ == "__main__":
    main()
