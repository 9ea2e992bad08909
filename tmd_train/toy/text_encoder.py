"""The fixed toy text encoder of the moving-shapes world (no training, no download).

A prompt is lower-cased and split on whitespace; every word must be in :data:`VOCAB` (anything else
raises ``ValueError`` naming the word). Token ``k`` at position ``p < L_TEXT`` is embedded as

    e[p] = W[k] + P[p]

* ``W [V, TEXT_DIM]`` — i.i.d. ``N(0, 1)`` drawn once by ``torch.Generator("cpu").manual_seed(TABLE_SEED)``
  in float64 (the same bits on every machine), then cast to float32;
* ``P [L_TEXT, TEXT_DIM]`` — the standard sinusoidal position code
  ``P[p, 2i] = sin(p / 10000^(2i/D))``, ``P[p, 2i+1] = cos(p / 10000^(2i/D))`` (float64, then cast).

Padding positions (after the last word) are **exactly zero** and masked out (``mask = False``),
as Wan's pipeline zero-pads the umT5 embeddings beyond each prompt's length (diffusers' Wan
transformer takes no text mask). The empty prompt ``""`` is therefore the all-zero embedding with
an all-False mask: the toy world's negative / unconditional prompt.

``L_TEXT = 12`` holds the longest world prompt, "a red circle moving left and a blue ring moving up"
(11 words); ``TEXT_DIM = 32``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

#: Token order is part of the encoder's definition: changing it changes every embedding.
VOCAB: tuple[str, ...] = (
    "<pad>", "a", "moving", "and",
    "circle", "bar", "ring",
    "red", "green", "blue", "yellow",
    "left", "right", "up", "down",
)
PAD_ID = 0
L_TEXT = 12
TEXT_DIM = 32
TABLE_SEED = 20260116

_TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}


@lru_cache(maxsize=1)
def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [V, D], P [L_TEXT, D])`` in float64, generated on CPU from :data:`TABLE_SEED`."""
    g = torch.Generator(device="cpu").manual_seed(TABLE_SEED)
    table = torch.randn(len(VOCAB), TEXT_DIM, generator=g, dtype=torch.float64, device="cpu")
    pos = torch.arange(L_TEXT, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, TEXT_DIM, 2, dtype=torch.float64) / TEXT_DIM)
    pe = torch.zeros(L_TEXT, TEXT_DIM, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return table, pe


def tokenize(prompt: str) -> list[int]:
    """Token ids of ``prompt`` (no padding). ``""`` gives ``[]``.

    Raises ``ValueError`` for a word outside :data:`VOCAB`, the literal ``<pad>`` token, or more than
    :data:`L_TEXT` words.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"toy text encoder: prompt must be a str, got {type(prompt).__name__}")
    words = prompt.lower().split()
    ids = []
    for w in words:
        if w not in _TOKEN_ID or w == VOCAB[PAD_ID]:
            known = ", ".join(VOCAB[1:])
            raise ValueError(f"toy text encoder: unknown word {w!r} in prompt {prompt!r}; vocabulary: {known}")
        ids.append(_TOKEN_ID[w])
    if len(ids) > L_TEXT:
        raise ValueError(f"toy text encoder: prompt {prompt!r} has {len(ids)} words, at most L_TEXT={L_TEXT}")
    return ids


def encode(prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed prompts.

    Args:
        prompts: one prompt or a sequence of ``B`` prompts.
    Returns:
        ``(text_emb, text_mask)``: float32 ``[B, L_TEXT, TEXT_DIM]`` and bool ``[B, L_TEXT]``
        (``[L_TEXT, TEXT_DIM]`` / ``[L_TEXT]`` for a single str), on CPU. Padding rows are zero.
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    table, pe = _tables()
    emb = torch.zeros(len(batch), L_TEXT, TEXT_DIM, dtype=torch.float64)
    mask = torch.zeros(len(batch), L_TEXT, dtype=torch.bool)
    for b, prompt in enumerate(batch):
        ids = tokenize(prompt)
        n = len(ids)
        emb[b, :n] = table[torch.tensor(ids, dtype=torch.long)] + pe[:n]
        mask[b, :n] = True
    emb = emb.to(torch.float32)
    return (emb[0], mask[0]) if single else (emb, mask)


def encode_negative() -> tuple[torch.Tensor, torch.Tensor]:
    """The negative / unconditional prompt: ``encode("")`` — zeros ``[L_TEXT, TEXT_DIM]``, mask all False."""
    return encode("")
