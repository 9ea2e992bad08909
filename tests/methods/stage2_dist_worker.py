"""Worker of the 2-process stage-2 test (launched by ``torchrun`` from tests/methods/test_stage2.py).

    torchrun --nproc_per_node 2 tests/methods/stage2_dist_worker.py OUT key=value ...

Builds the stage-2 method from the overrides, checks the FSDP2 layout (generator, fake score and
teacher sharded: every parameter but the 0-d ones a DTensor; the discriminator replicated), trains
with ``fit()`` and writes the step count to ``OUT/done``. Exits with ``os._exit(0)`` after tearing
the process group down (gloo sometimes aborts at interpreter exit otherwise).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tmd_train.engine.config import load_config
from tmd_train.engine.trainer import fit
from tmd_train.methods import Stage2Config, build_method

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for support.dist
from support.dist import finish  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(Stage2Config, None, sys.argv[2:])
    trainer = build_method(cfg)
    assert trainer.world == 2 and dist.get_backend() == "gloo"
    for root in (trainer.gen_model, trainer.fake_score, trainer.teacher):
        assert all(isinstance(p, DTensor) != (p.dim() == 0) for p in root.parameters())
    assert not any(isinstance(p, DTensor) for p in trainer.disc.parameters())
    fit(trainer)
    if trainer.is_main:
        (out / "done").write_text(f"{trainer.step} {trainer.gen_updates}\n")
    finish()


if __name__ == "__main__":
    main()
