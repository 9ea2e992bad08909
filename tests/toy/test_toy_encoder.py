"""The fixed toy text encoder: shapes, padding/negative, determinism, vocabulary errors."""
from __future__ import annotations

import math

import pytest
import torch

from tmd_train.toy import clips as world
from tmd_train.toy import text_encoder as te


def test_shapes_and_mask():
    emb, mask = te.encode(["a red circle moving left", "a blue bar moving up and a green ring moving down"])
    assert emb.shape == (2, te.L_TEXT, te.TEXT_DIM) and emb.dtype == torch.float32
    assert mask.shape == (2, te.L_TEXT) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 11]
    assert torch.all(emb[0, 5:] == 0) and torch.all(emb[0, :5].abs().sum(-1) > 0)
    one, one_mask = te.encode("a red circle moving left")
    assert one.shape == (te.L_TEXT, te.TEXT_DIM) and torch.equal(one, emb[0]) and torch.equal(one_mask, mask[0])


def test_embedding_formula():
    """e[p] = W[token] + P[p] with the documented sinusoidal P."""
    emb, _ = te.encode("a green ring moving right")
    table, _ = te._tables()
    words = "a green ring moving right".split()
    for p, w in enumerate(words):
        pe = torch.tensor([math.sin(p / 10000 ** (i / te.TEXT_DIM)) if i % 2 == 0
                           else math.cos(p / 10000 ** ((i - 1) / te.TEXT_DIM)) for i in range(te.TEXT_DIM)],
                          dtype=torch.float64)
        want = (table[te.VOCAB.index(w)] + pe).float()
        torch.testing.assert_close(emb[p], want, atol=1e-6, rtol=1e-6)


def test_negative_is_all_padding():
    emb, mask = te.encode_negative()
    assert emb.shape == (te.L_TEXT, te.TEXT_DIM) and torch.all(emb == 0) and not mask.any()
    emb2, mask2 = te.encode(["", "   "])
    assert torch.all(emb2 == 0) and not mask2.any()


def test_word_order_and_case():
    a, _ = te.encode("a red circle moving left")
    b, _ = te.encode("A  RED circle moving\tLEFT")
    c, _ = te.encode("a circle red moving left")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_table_is_fixed():
    """The token table comes from a fixed seed on CPU in float64: these golden values must hold on every
    machine and torch version (a change here changes every toy dataset and teacher)."""
    table, _ = te._tables()
    assert table.shape == (len(te.VOCAB), te.TEXT_DIM) and table.dtype == torch.float64
    assert table[0, 0].item() == pytest.approx(-0.04547672770221355, abs=1e-15)
    assert table[5, 7].item() == pytest.approx(-0.021161196085422673, abs=1e-15)
    assert table[-1, -1].item() == pytest.approx(1.1909871537089305, abs=1e-15)
    assert table.sum().item() == pytest.approx(-23.37065236231247, abs=1e-11)
    # distinct tokens get distinct, O(1) embeddings
    assert torch.linalg.matrix_rank(table) == min(table.shape)
    assert 0.5 < table.std().item() < 2.0


@pytest.mark.parametrize("bad", ["a purple circle moving left", "a red circle, moving left", "<pad>",
                                 "a red circle moving left and a blue bar moving up and a red"])
def test_errors(bad):
    with pytest.raises(ValueError, match="unknown word|at most"):
        te.encode(bad)


def test_not_a_string():
    with pytest.raises(ValueError, match="str"):
        te.encode([3])


def test_vocabulary_covers_the_world():
    words = {"a", "moving", "and", *world.SHAPES, *world.COLOURS, *world.DIRECTIONS}
    assert words == set(te.VOCAB[1:])
    longest = "a yellow ring moving right and a yellow ring moving right"
    assert len(te.tokenize(longest)) <= te.L_TEXT
