"""Worker of the 2-process FD-pass test (launched by ``torchrun`` from tests/objectives/test_tm_meanflow.py).

    torchrun --nproc_per_node 2 tests/objectives/tm_meanflow_dist_worker.py OUT

The stage-1 root (``Stage1Model``) over a tiny student, sharded with FSDP2 as the method shards it,
with the method's ``any_process``: process 0's batch has only r≠s rows, process 1's none. Two steps
(forward + backward); each process writes ``OUT/rank<k>.json`` with its losses, the same losses
from an unsharded copy of the student, and the rows each head-block call saw. The process group
times out after 60 s, so mismatched collectives fail instead of hanging.
"""
from __future__ import annotations

import copy
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for support.tiny
from support.dist import finish  # noqa: E402
from support.tiny import TEXT_LEN, TINY_CONFIG, randomize_zero_init, tiny_inputs, tiny_teacher  # noqa: E402

from tmd_train.engine.distributed import shard_fsdp2  # noqa: E402
from tmd_train.methods.tm_meanflow import Stage1Model, any_process_on  # noqa: E402
from tmd_train.models import TMDStudent  # noqa: E402
from tmd_train.objectives.tm_meanflow import TMMeanFlowConfig, tm_meanflow  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    student = TMDStudent.from_teacher(tiny_teacher(seed=0), head_blocks=2)
    randomize_zero_init(student, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(student)
    cfg = TMMeanFlowConfig(equal_fraction=0.0 if rank == 0 else 1.0, cond_dropout=0.0)
    model = Stage1Model(student, cfg, any_process_on(torch.device("cpu")))
    shard_fsdp2(model, student.transformer.blocks, "cpu")
    g = torch.Generator().manual_seed(rank)
    x, _, text = tiny_inputs(2, g)
    batch = {"latents": x, "text": text,
             "negative_text": torch.randn(TEXT_LEN, TINY_CONFIG["text_dim"], generator=g)}
    rows: list[int] = []
    for block in student.transformer.blocks[-1:]:
        block.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    result: dict = {"losses": [], "reference": [], "frac_fd": []}
    for step in range(2):
        loss, log = model(batch, torch.Generator().manual_seed(10 + step), None)
        loss["loss"].backward()
        result["losses"].append(loss["loss"].item())
        result["frac_fd"].append(log["frac_fd"].item())
        with torch.no_grad():
            ref, _ = tm_meanflow(reference, batch, cfg, torch.Generator().manual_seed(10 + step))
        result["reference"].append(ref["loss"].item())
    result["head_rows"] = rows
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    finish()


if __name__ == "__main__":
    main()
