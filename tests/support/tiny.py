"""A tiny random Wan2.1-architecture transformer for fast CPU tests: 2 heads × 8 dims (D=16),
4 blocks, FFN 32, text_dim 16, patch (1, 2, 2), 4 latent channels, latents [B, 4, 3, 8, 8]
(48 tokens)."""
from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from tmd_train.models import load_teacher

TINY_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
    "out_channels": 4, "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 4,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64,
}
LATENT = (4, 3, 8, 8)
TEXT_LEN = 5
DIM = 16


def tiny_teacher(seed: int = 0, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    """The tiny teacher with seeded random weights (every parameter, biases included, non-zero)."""
    torch.manual_seed(seed)
    model = load_teacher(TINY_CONFIG, torch_dtype=None if dtype == torch.float32 else dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def tiny_inputs(batch: int, gen: torch.Generator, dtype: torch.dtype = torch.float32):
    """``(x_t [B, 4, 3, 8, 8], t [B], text [B, 5, 16])`` with ``t ∈ (0.05, 0.95)``."""
    x = torch.randn(batch, *LATENT, generator=gen, dtype=torch.float64).to(dtype)
    t = (0.05 + 0.9 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(dtype)
    text = torch.randn(batch, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen, dtype=torch.float64).to(dtype)
    return x, t, text


def randomize_zero_init(student, gen: torch.Generator, scale: float = 0.05) -> None:
    """Make the student's zero-initialised layers non-zero (fusion modulation and gate, α, the
    zero-init time embeddings), so tests of trained behaviour check something."""
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.startswith(("fusion.", "time_embed_s.", "time_embed_delta.")):
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
