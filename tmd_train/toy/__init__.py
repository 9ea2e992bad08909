"""The toy world: a procedural moving-shapes video world small enough to run the whole method on a CPU.

Modules: :mod:`~tmd_train.toy.clips` (the world: clips, prompts, datasets), :mod:`~tmd_train.toy.text_encoder`
(the fixed text encoder), :mod:`~tmd_train.toy.train_teacher` (the toy teacher's trainer),
:mod:`~tmd_train.toy.evaluator` and :mod:`~tmd_train.toy.tinybench` (TinyBench, a miniature VBench) and
:mod:`~tmd_train.toy.demo` (the paper's comparison in miniature). This package itself holds the fixed pieces:
the tiny pixel-space teacher architecture, where its shipped weights live, and the defaults every stage falls
back to when run with no arguments.

The toy teacher is a ``WanTransformer3DModel`` working directly on RGB clips ``[3, 8, 32, 32]`` in
``[-1, 1]`` (no VAE), conditioned on :mod:`tmd_train.toy.text_encoder` embeddings ``[12, 32]``.
Its trained weights are shipped in ``tmd_train/toy/assets/toy_teacher/`` (a diffusers model folder,
``load_teacher`` reads it); ``tmd_train/toy/assets/README.md`` records the command that produced them.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import text_encoder

ASSETS = Path(__file__).resolve().parent / "assets"
#: The shipped toy teacher (config.json + diffusion_pytorch_model.safetensors).
TOY_TEACHER_DIR = ASSETS / "toy_teacher"
#: Clip shape ``(C, F, H, W)``: pixel space.
TOY_CLIP_SHAPE = (3, 8, 32, 32)

#: The toy teacher's architecture: 6 blocks of width 128 (4 heads x 32), FFN 384, patch (2, 4, 4)
#: (4 x 8 x 8 = 256 tokens per clip), text [12, 32]; 1.56 M parameters. With H = 1 head block the
#: student's head is 1/6 of the network, as the paper's H = 5 of L = 30 (N2H1 here ~ N2H5 there).
#: The width must exceed a token's output size (2·4·4·3 = 96 values): a 64-wide model cannot
#: represent the noise it has to remove and leaves a third of it in every sample. Head dims are
#: powers of two on purpose: CPU attention is several times slower otherwise.
TOY_TEACHER_CONFIG: dict[str, Any] = {
    "patch_size": (2, 4, 4), "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 3,
    "out_channels": 3, "text_dim": text_encoder.TEXT_DIM, "freq_dim": 64, "ffn_dim": 384, "num_layers": 6,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64,
}


def toy_teacher_available() -> bool:
    """Whether the shipped toy teacher weights are present."""
    return (TOY_TEACHER_DIR / "config.json").is_file() and any(TOY_TEACHER_DIR.glob("*.safetensors"))


def require_toy_teacher() -> Path:
    """``TOY_TEACHER_DIR`` if the shipped weights are there; FileNotFoundError saying what to do otherwise."""
    if not toy_teacher_available():
        raise FileNotFoundError(
            f"the toy teacher is not in {TOY_TEACHER_DIR}: train it with `python -m tmd_train.toy.train_teacher "
            f"--out {TOY_TEACHER_DIR} --replace-shipped` or pass teacher=<a Wan2.1 diffusers folder> "
            "(and data=<dataset folder>)")
    return TOY_TEACHER_DIR


def toy_defaults(**values: Any) -> dict[str, Any]:
    """The config values of a stage run with no arguments: ``teacher`` = the shipped toy teacher,
    ``data="shapes"``, then ``values`` (the stage's small toy settings) on top.

    Raises:
        FileNotFoundError: the toy teacher is not there; the message says what to pass instead.
    """
    return {"teacher": str(require_toy_teacher()), "data": "shapes", **values}


def toy_config_mismatch(config: Mapping[str, Any]) -> str | None:
    """Why a ``WanTransformer3DModel`` config (a dict, as in its ``config.json``) cannot run in the toy world,
    or None if it can: it must take and return RGB clips (``in_channels = out_channels = 3``), read toy text
    embeddings (``text_dim = TEXT_DIM``) and have a patch size that tiles a ``TOY_CLIP_SHAPE`` clip."""
    problems = []
    for key, want in (("in_channels", 3), ("out_channels", 3), ("text_dim", text_encoder.TEXT_DIM)):
        if config.get(key) != want:
            problems.append(f"{key}={config.get(key)!r}, the toy world needs {want}")
    patch = config.get("patch_size")
    if (not isinstance(patch, (list, tuple)) or len(patch) != 3
            or any(not isinstance(p, int) or p < 1 or n % p for p, n in zip(patch, TOY_CLIP_SHAPE[1:], strict=True))):
        problems.append(f"patch_size={patch!r} does not tile a {'x'.join(map(str, TOY_CLIP_SHAPE[1:]))} clip")
    return "; ".join(problems) or None
