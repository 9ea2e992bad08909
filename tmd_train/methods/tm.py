"""Stage 1, ``method=tm``: plain transition matching — the TM-MF recipe with ``r = s`` on every
sample, so no derivative pass (the paper's ablation of the MeanFlow term)."""
from __future__ import annotations

from .registry import register
from .tm_meanflow import TMMeanFlow


@register("tm")
class TM(TMMeanFlow):
    """:class:`~tmd_train.methods.tm_meanflow.TMMeanFlow` with ``TMMeanFlowConfig.variant = "tm"``."""

    variant = "tm"
