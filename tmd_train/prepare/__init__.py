"""Training data from prompts or videos: ``python -m tmd_train.prepare synthetic|videos`` (docs/design.md §5.6).

    python -m tmd_train.prepare synthetic --teacher WAN_FOLDER --prompts FILE --out DIR [options]
    python -m tmd_train.prepare videos --components WAN_FOLDER --videos CSV|JSONL|DIR --out DIR [options]

``synthetic``: every prompt (a ``.txt`` file, one per line, or ``.jsonl`` with a ``prompt`` field) gives
``--clips-per-prompt`` clips of the teacher: flow-matching Euler (``--steps`` 50) with classifier-free
guidance (``--cfg`` 5) against the negative prompt (Wan's by default), on the grid shifted by ``--shift``
(5), from noise seeded by the clip's index, started at ``--t-max`` (0.999, the student's first time, so
that the stored noise is exactly the student's KD input). Writes a ``latents`` dataset whose shards also
hold each clip's start ``noise``: training data for both stages and the KD pairs of stage 2 (``kd_pairs=``).

``videos``: every video of the list (CSV or JSONL with a video path and a caption, or a folder of videos
with ``.txt`` captions beside them) is decoded (PyAV), sampled at ``--fps`` from its start, resized and
centre-cropped to ``--height × --width``, encoded by Wan's VAE (the posterior mean) and normalised as
``(z - latents_mean) / latents_std`` — the inverse of what ``WanPipeline`` (and ``tmd_train.sample``)
do before decoding; its caption is encoded by UMT5 as ``WanPipeline`` does.

Both run on any number of processes (``torchrun --nproc_per_node N -m tmd_train.prepare ...``), in
bfloat16 on GPUs, resume when restarted with the same command, skip bad items into ``skipped.jsonl``
and print a summary (see :mod:`tmd_train.prepare.runner`).
"""
from __future__ import annotations

from .cli import build_parser, main

__all__ = ["build_parser", "main"]
