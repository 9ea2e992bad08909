"""Worker of the 2-process memory-feature test (launched by ``torchrun`` from tests/methods/test_scale.py).

    torchrun --nproc_per_node 2 tests/methods/scale_dist_worker.py OUT key=value ...

Builds the stage-2 method of the overrides (a teacher folder: built on the meta device, sharded,
each process reading its shards), checks that the LoRA fake score's adapters are sharded with the
teacher, writes the unsharded initial weights (``init.safetensors``), runs ``steps`` iterations with
``train_step`` and writes the generator's and the adapters' final weights (``final.safetensors``).
Then builds stage 1 on the same folder (``stage1.safetensors``: its student and teacher) and runs one
stage-2 iteration with ``mixed_precision=bf16`` (the generator's FSDP2 units all-gather bf16, the
teacher's as stored; ``bf16.json``: its logs).
Exits with ``os._exit(0)`` after tearing the process group down.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from tmd_train.engine.config import load_config
from tmd_train.engine.distributed import local_tensor
from tmd_train.methods import Stage2Config, build_method
from tmd_train.methods.tm_meanflow import Stage1Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for support.dist
from support.dist import finish  # noqa: E402


def full(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of every parameter of ``module`` (collective)."""
    return {prefix + n: local_tensor(p).detach().float().cpu().clone().contiguous()
            for n, p in module.named_parameters()}


def main() -> None:
    out = Path(sys.argv[1])
    overrides = sys.argv[2:]
    cfg = load_config(Stage2Config, None, overrides)
    torch.set_num_threads(1)
    method = build_method(cfg)
    assert method.world == 2 and dist.get_backend() == "gloo"
    assert all(isinstance(p, DTensor) for p in method.fake_score.parameters())
    assert all(isinstance(p, DTensor) for p in method.teacher.parameters())
    init = full("teacher.", method.teacher.teacher) | full("generator.", method.generator)
    for step, batch in zip(range(1, cfg.steps + 1), method.batches(1), strict=False):
        method.train_step(step, batch)
    final = full("generator.", method.generator) | full("fake.", method.fake_score)
    stage1 = build_method(load_config(Stage1Config, None, [o for o in overrides if o.split("=")[0] in (
        "teacher", "seed", "head_blocks", "synthetic_latent_size", "synthetic_text_len", "synthetic_samples")]
        + [f"output_dir={out / 'stage1'}", "objective.cfg_source=teacher"]))
    s1 = full("student.", stage1.student) | full("teacher.", stage1.teacher)
    bf16 = build_method(load_config(Stage2Config, None, [*overrides, "mixed_precision=bf16", "generator_every=1"]))
    for root, param_dtype in ((bf16.gen_model, torch.bfloat16), (bf16.teacher, None)):
        policy = root._get_fsdp_state()._mp_policy
        assert policy.param_dtype == param_dtype and (param_dtype is None or not policy.cast_forward_inputs), policy
    logs = bf16.train_step(1, next(iter(bf16.batches(1))))
    assert all(math.isfinite(v) for v in logs.values()), logs
    if method.is_main:
        save_file(init, str(out / "init.safetensors"))
        save_file(final, str(out / "final.safetensors"))
        save_file(s1, str(out / "stage1.safetensors"))
        (out / "bf16.json").write_text(json.dumps(logs))
    finish()


if __name__ == "__main__":
    main()
