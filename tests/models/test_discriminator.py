"""The discriminator's default teacher blocks: the paper's 0-based lists for L = 30 and 40, the
rule for every other depth (the toy teacher's 6 and small L), and that index L-1 is the output of
the teacher's last block (tiny random Wan, CPU)."""
from __future__ import annotations

import pytest
import torch
from support.tiny import TINY_CONFIG, tiny_inputs, tiny_teacher

from tmd_train.models.discriminator import Conv3DDiscriminator, default_blocks, teacher_block_features
from tmd_train.models.teacher import wan_timestep
from tmd_train.toy import TOY_TEACHER_CONFIG


def test_default_blocks_paper_toy_and_small_depths():
    assert default_blocks(30) == (15, 22, 29)          # Wan2.1 1.3B (paper App. A.3)
    assert default_blocks(40) == (19, 29, 39)          # Wan2.1 14B
    assert TOY_TEACHER_CONFIG["num_layers"] == 6
    assert default_blocks(6) == (3, 4, 5)              # the toy teacher
    assert default_blocks(TINY_CONFIG["num_layers"]) == (1, 2, 3)
    assert [default_blocks(L) for L in (1, 2, 3, 5, 8)] == [(0,), (0, 1), (0, 1, 2), (2, 3, 4), (3, 5, 7)]


@pytest.mark.parametrize("L", range(1, 65))
def test_default_blocks_rule(L):
    """Every depth: ascending distinct 0-based indices ending at the last block, three of them
    equally spaced by max(1, ⌊L/4⌋) once L >= 3."""
    blocks = default_blocks(L)
    assert blocks[-1] == L - 1 and all(0 <= b < L for b in blocks)
    assert list(blocks) == sorted(set(blocks))
    if L >= 3:
        k = max(1, L // 4)
        assert blocks == (L - 1 - 2 * k, L - 1 - k, L - 1)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "30"])
def test_default_blocks_rejects(bad):
    with pytest.raises(ValueError, match="num_layers"):
        default_blocks(bad)


def test_last_default_block_is_the_teachers_last_block(gen):
    """``for_teacher`` takes :func:`default_blocks`; the feature of index ``L-1`` is the output of
    ``teacher.blocks[-1]`` (the hidden state entering ``norm_out``), unpatchified."""
    teacher = tiny_teacher(seed=2).requires_grad_(False)
    disc = Conv3DDiscriminator.for_teacher(teacher, width=8, groups=4)
    assert disc.blocks == default_blocks(4) and disc.blocks[-1] == len(teacher.blocks) - 1
    seen = {}
    teacher.norm_out.register_forward_hook(lambda mod, args, out: seen.setdefault("h", args[0]))
    x, t, text = tiny_inputs(2, gen)
    with torch.no_grad():
        teacher(x, wan_timestep(t), text, return_dict=False)
        feats = teacher_block_features(teacher, x, t, text, disc.blocks)
    grid = (x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
    torch.testing.assert_close(feats[-1], seen["h"].transpose(1, 2).unflatten(2, grid), atol=0, rtol=0)
    assert disc(feats).shape == (2, 3)
