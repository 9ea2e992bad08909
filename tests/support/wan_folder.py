"""A tiny random Wan2.1 diffusers folder built offline, in the real on-disk formats:
``transformer/`` (the tiny WanTransformer3DModel of tiny.py), ``text_encoder/`` (UMT5EncoderModel,
d_model = text_dim), ``tokenizer/`` (a T5Tokenizer over a sentencepiece unigram model trained here
on a few sentences), ``vae/`` (AutoencoderKLWan, z_dim = in_channels), ``scheduler/`` and
``model_index.json`` — loadable by diffusers' ``WanPipeline.from_pretrained``."""
from __future__ import annotations

import io
import json
from pathlib import Path

import diffusers
import sentencepiece as spm
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from support.tiny import TINY_CONFIG, tiny_teacher

SENTENCES = [
    "a red ball bounces on the floor", "a blue square slides to the left", "moving shapes in a small video",
    "the green circle grows slowly", "a cat walks across the grass", "two triangles spin around",
]
# Video size whose latents fit the tiny transformer: 5 frames 32x32 -> latents [4, 2, 4, 4].
FRAMES, HEIGHT, WIDTH = 5, 32, 32


def tiny_tokenizer() -> T5Tokenizer:
    """A T5 (UMT5-style) tokenizer over a unigram sentencepiece model trained on SENTENCES;
    ids 0/1/2 = <pad>/</s>/<unk> as in T5."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 10), model_writer=proto, vocab_size=48, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_wan_folder(root: Path, seed: int = 0) -> Path:
    """Write the tiny Wan folder at ``root`` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_teacher(seed=seed).save_pretrained(root / "transformer")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(seed + 1)
    cfg = UMT5Config(vocab_size=len(tok), d_model=TINY_CONFIG["text_dim"], d_kv=8, d_ff=32, num_layers=2,
                     num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     dropout_rate=0.0)
    UMT5EncoderModel(cfg).eval().save_pretrained(root / "text_encoder")
    torch.manual_seed(seed + 2)
    c = TINY_CONFIG["in_channels"]
    vae = AutoencoderKLWan(base_dim=4, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.1 * (i - 1) for i in range(c)],
                           latents_std=[1.0 + 0.2 * i for i in range(c)])
    vae.eval().save_pretrained(root / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=3.0).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root
