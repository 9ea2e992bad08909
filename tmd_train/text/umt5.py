"""UMT5 prompt encoding of Wan2.1: the ``text_encoder/`` (``UMT5EncoderModel``) and
``tokenizer/`` of a Wan diffusers folder, used as diffusers' ``WanPipeline`` does."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

#: Wan2.1's negative prompt, as diffusers' WanPipeline example passes it (English rendering of the Chinese
#: default negative prompt of Wan's own sampling configs).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


class PromptEncoder:
    """UMT5 text encoder + tokenizer of a Wan folder, used as diffusers' ``WanPipeline`` does:
    tokens padded/truncated to ``max_len``, hidden states of the prompt tokens, zeros after them.

    Args:
        encoder_dir: the ``text_encoder/`` folder; tokenizer_dir: the ``tokenizer/`` folder (both
            loaded with ``local_files_only``: nothing is downloaded).
        device, dtype: where and in which dtype the encoder runs.
        max_len: tokens the prompt is padded/truncated to (Wan: 512).
    """

    def __init__(self, encoder_dir: Path, tokenizer_dir: Path, device: str, dtype: torch.dtype, max_len: int) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.encoder = UMT5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, torch_dtype=dtype)
        self.encoder.to(device).eval()
        self.device = device
        self.max_len = max_len

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        """``prompt`` -> ``[1, max_len, D]`` float32."""
        return self.encode([prompt])[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (a batch) -> ``(text_emb [B, max_len, D] float32, text_mask [B, max_len] bool)``:
        the encoder's states of each prompt's tokens, zeros after them; the mask marks the tokens."""
        enc = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_len,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        hidden = self.encoder(ids, mask).last_hidden_state.float()
        keep = torch.arange(self.max_len, device=self.device)[None, :] < mask.gt(0).sum(1, keepdim=True)
        return torch.where(keep[..., None], hidden, torch.zeros_like(hidden)), keep.cpu()
