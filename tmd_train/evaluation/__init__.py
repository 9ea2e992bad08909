"""Judging generated videos: VBench generation and scores (:mod:`~tmd_train.evaluation.vbench`) and the
collapse checks (:mod:`~tmd_train.evaluation.checks`), both run by ``python -m tmd_train.evaluate``
(docs/design.md §8). Nothing here needs the ``vbench`` package except the scoring itself."""
