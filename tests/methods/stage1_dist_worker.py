"""Worker of the 2-process FSDP2 test (launched by ``torchrun`` from tests/methods/test_stage1.py).

    torchrun --nproc_per_node 2 tests/methods/stage1_dist_worker.py OUT key=value ...

Builds the stage-1 method from the overrides, computes the gradients of step 1 and saves them
(unsharded) to ``OUT/grads.pt``, then trains the configured steps with ``fit()`` (checkpoints and
the final student under ``output_dir``). Exits with ``os._exit(0)`` after tearing the process
group down (gloo sometimes aborts at interpreter exit otherwise).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tmd_train.engine.config import load_config
from tmd_train.engine.trainer import fit
from tmd_train.methods import Stage1Config, build_method

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for support.dist
from support.dist import finish  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(Stage1Config, None, sys.argv[2:])
    trainer = build_method(cfg)
    assert trainer.world == 2 and dist.get_backend() == "gloo"
    # FSDP2-sharded: every parameter but the 0-d ones (replicated) is a DTensor
    assert all(isinstance(p, DTensor) != (p.dim() == 0) for p in trainer.model.parameters())
    trainer.forward_backward(1, next(trainer.batches(1)))
    grads = trainer.full_gradients()
    if trainer.is_main:
        torch.save(grads, out / "grads.pt")
    trainer.optimizer.zero_grad(set_to_none=True)
    fit(trainer)
    if trainer.is_main:
        (out / "done").write_text(f"{trainer.step}\n")
    finish()


if __name__ == "__main__":
    main()
