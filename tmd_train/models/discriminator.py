"""The stage-2 GAN discriminator: Conv3D heads on unpatchified frozen-teacher features
(docs/design.md §1.5 and §2.6; arXiv:2601.09881 App. A.3).

Blocks (0-based indices into ``teacher.blocks``): the paper's lists, (15, 22, 29) for the 30-block
1.3B teacher and (19, 29, 39) for the 40-block 14B teacher, both end at ``L - 1``, so they are
0-based and include the last block. Both are the last block and the blocks ``k`` and ``2k`` before
it with ``k = ⌊L/4⌋``; :func:`default_blocks` applies that rule to every depth (``k`` at least 1,
clipped to ``[0, L-1]``, de-duplicated): L=6 (the toy teacher): 3, 4, 5; L=4: 1, 2, 3; L=2: 0, 1.

Losses (non-saturating, averaged over heads, mean over the batch):
``gan_generator_loss = softplus(-D(fake))``, ``gan_discriminator_loss = softplus(D(fake)) +
softplus(-D(real))``; real = noised data, fake = noised x̂ at the same τ. The caller weights the
generator's loss by :data:`GAN_WEIGHT` (λ = 0.03).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .teacher import wan_timestep

GAN_WEIGHT = 0.03


def default_blocks(num_layers: int) -> tuple[int, ...]:
    """The discriminator's default 0-based teacher blocks for an ``L = num_layers``-block teacher:
    ``(L-1-2k, L-1-k, L-1)`` with ``k = max(1, ⌊L/4⌋)``, clipped to ``[0, L-1]`` and de-duplicated
    (ascending). Reproduces the paper: L=30 -> (15, 22, 29), L=40 -> (19, 29, 39)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    k = max(1, num_layers // 4)
    return tuple(sorted({max(num_layers - 1 - j * k, 0) for j in (2, 1, 0)}))


def teacher_block_features(teacher: WanTransformer3DModel, x_t: torch.Tensor, t: torch.Tensor,
                           text: torch.Tensor, blocks: Sequence[int],
                           checkpoint: bool | Callable[..., torch.Tensor] = False) -> list[torch.Tensor]:
    """Run the frozen teacher up to ``max(blocks)`` and return those blocks' outputs, unpatchified
    to the token grid.

    The teacher's parameters must not require grad (raises ValueError otherwise; LoRA adapter
    parameters — names with a ``lora_`` component — are exempt: the caller runs the teacher with
    them switched off); gradients flow to ``x_t`` (the generator's GAN loss needs them).

    Args:
        x_t: ``[B, C, F, H, W]`` noised latents at flow time ``t [B]``; text: ``[B, L, text_dim]``.
        blocks: 0-based block indices.
        checkpoint: when autograd records, keep only each block's input and recompute the block in
            backward (``torch.utils.checkpoint``, non-reentrant): the activations of the pass shrink
            from every block's internals to one ``[B, N, D]`` tensor per block; values and gradients
            are unchanged. A callable ``checkpoint(block, *inputs)`` does the recomputing instead
            (e.g. one that also restores a model state for the recomputation).
    Returns:
        One ``[B, dim, F', H', W']`` tensor per entry of ``blocks`` (in that order), model dtype.
    """
    if any(p.requires_grad for n, p in teacher.named_parameters() if ".lora_" not in f".{n}"):
        raise ValueError("teacher must be frozen (teacher.requires_grad_(False)) for its features")
    L = teacher.config.num_layers
    if not blocks or any(not 0 <= b < L for b in blocks):
        raise ValueError(f"blocks must be non-empty 0-based indices in [0, {L}), got {list(blocks)}")
    dtype = teacher.patch_embedding.weight.dtype
    x = x_t.to(dtype)
    rotary = teacher.rope(x)
    h = teacher.patch_embedding(x)
    grid = tuple(h.shape[2:])
    h = h.flatten(2).transpose(1, 2)
    _, tproj, text_h, _ = teacher.condition_embedder(wan_timestep(t), text.to(dtype), None)
    tproj = tproj.unflatten(1, (6, -1))
    wanted = set(blocks)
    found: dict[int, torch.Tensor] = {}
    recompute = None
    if checkpoint is not False and checkpoint is not None and torch.is_grad_enabled():
        recompute = checkpoint if callable(checkpoint) else functools.partial(torch_checkpoint, use_reentrant=False)
    for k in range(max(blocks) + 1):
        if recompute is not None:
            h = recompute(teacher.blocks[k], h, text_h, tproj, rotary)
        else:
            h = teacher.blocks[k](h, text_h, tproj, rotary)
        if k in wanted:
            found[k] = h.transpose(1, 2).unflatten(2, grid)
    return [found[b] for b in blocks]


class _Head(nn.Module):
    """One head: ``Conv3d(dim→w, 1)``, then ``depth`` × [Conv3d(w→w, 3, stride (1,2,2)) +
    GroupNorm + SiLU], global average pool, ``Linear(w→1)``."""

    def __init__(self, dim: int, width: int, depth: int, groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(dim, width, 1), nn.GroupNorm(groups, width), nn.SiLU()]
        for _ in range(depth):
            layers += [nn.Conv3d(width, width, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(groups, width),
                       nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(feat).mean(dim=(2, 3, 4))).squeeze(1)


class Conv3DDiscriminator(nn.Module):
    """One Conv3D head per teacher block.

    Args:
        dim: teacher hidden size (heads × head_dim).
        num_layers: teacher depth L (picks :func:`default_blocks` when ``blocks`` is None).
        blocks: 0-based block indices.
        width: channels of every head (default 256), depth: strided conv layers per head (2),
        groups: GroupNorm groups (32; must divide ``width``).

    Parameters: per head ``dim·w + w`` (1×1 conv) ``+ depth·(27·w² + w)`` (3×3×3 convs)
    ``+ 2·w·(depth+1)`` (GroupNorm) ``+ w + 1`` (linear) — see :meth:`num_parameters`
    (1.3B, dim 1536, w 256, depth 2, 3 heads: ≈ 11.8M).
    """

    def __init__(self, dim: int, num_layers: int, blocks: Sequence[int] | None = None, width: int = 256,
                 depth: int = 2, groups: int = 32) -> None:
        super().__init__()
        if width < 1 or depth < 0 or groups < 1 or width % groups:
            raise ValueError(f"need width >= 1 divisible by groups >= 1 and depth >= 0, "
                             f"got width={width}, groups={groups}, depth={depth}")
        self.blocks = tuple(default_blocks(num_layers) if blocks is None else blocks)
        if not self.blocks or any(not 0 <= b < num_layers for b in self.blocks):
            raise ValueError(f"blocks must be non-empty 0-based indices in [0, {num_layers}), got {self.blocks}")
        self.heads = nn.ModuleList(_Head(dim, width, depth, groups) for _ in self.blocks)

    @classmethod
    def for_teacher(cls, teacher: WanTransformer3DModel, **kwargs) -> Conv3DDiscriminator:
        """A discriminator sized for ``teacher`` (on its device, float32; on CPU when the teacher is
        on the meta device: the heads are small and initialised at once)."""
        c = teacher.config
        disc = cls(c.num_attention_heads * c.attention_head_dim, c.num_layers, **kwargs)
        device = teacher.patch_embedding.weight.device
        return disc if device.type == "meta" else disc.to(device)

    @staticmethod
    def expected_parameters(dim: int, width: int, depth: int, heads: int) -> int:
        """The closed-form parameter count of the class docstring."""
        per = dim * width + width + depth * (27 * width * width + width) + 2 * width * (depth + 1) + width + 1
        return heads * per

    def num_parameters(self) -> int:
        """Number of parameters (all trainable)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features`` (one ``[B, dim, F', H', W']`` per head) -> logits ``[B, heads]`` (float32).

        The heads run in their own precision with autocast off: their GroupNorms see few
        elements per group on the deep, strided layers, and in bf16 nearly equal values round to
        a zero variance whose gradient blows up (seen as non-finite discriminator steps)."""
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        w = self.heads[0].out.weight
        with torch.autocast(w.device.type, enabled=False):
            return torch.stack([h(f.to(w.dtype)) for h, f in zip(self.heads, features, strict=True)], dim=1)

    def logits(self, teacher: WanTransformer3DModel, x_t: torch.Tensor, t: torch.Tensor,
               text: torch.Tensor) -> torch.Tensor:
        """``D(x_t, t)``: teacher features of :attr:`blocks`, then the heads. ``[B, heads]``."""
        return self(teacher_block_features(teacher, x_t, t, text, self.blocks))


#: ``features(x_t, t, text, blocks) -> list of [B, dim, F', H', W']``: how the losses get teacher
#: features (default :func:`teacher_block_features`; the stage-2 trainer routes them through the
#: FSDP root of the sharded teacher).
FeatureFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int]], list[torch.Tensor]]


def gan_generator_loss(disc: Conv3DDiscriminator, teacher: WanTransformer3DModel | None, fake_t: torch.Tensor,
                       t: torch.Tensor, text: torch.Tensor, features: FeatureFn | None = None) -> torch.Tensor:
    """``mean softplus(-D(fake))`` over batch and heads; grads reach ``fake_t`` (the noised x̂)
    only — the discriminator's parameters are used through detached copies. ``features``
    replaces ``teacher_block_features(teacher, …)`` when given."""
    feats = (features or functools.partial(teacher_block_features, teacher))(fake_t, t, text, disc.blocks)
    params = {n: p.detach() for n, p in disc.named_parameters()}
    logits = torch.func.functional_call(disc, params, (feats,))
    return F.softplus(-logits).mean()


def gan_discriminator_loss(disc: Conv3DDiscriminator, teacher: WanTransformer3DModel | None, real_t: torch.Tensor,
                           fake_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                           features: FeatureFn | None = None) -> torch.Tensor:
    """``mean[softplus(D(fake)) + softplus(-D(real))]`` over batch and heads; the teacher runs
    without grad and ``fake_t`` is detached, so only the discriminator gets gradients.
    ``real_t``/``fake_t`` ``[B, C, F, H, W]`` at the same ``t [B]``; ``features`` as in
    :func:`gan_generator_loss`."""
    features = features or functools.partial(teacher_block_features, teacher)
    with torch.no_grad():
        feats = features(torch.cat([real_t, fake_t.detach()]), torch.cat([t, t]), torch.cat([text, text]),
                         disc.blocks)
    real, fake = disc(feats).chunk(2)
    return (F.softplus(fake) + F.softplus(-real)).mean()
