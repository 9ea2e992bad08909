"""One entry point for every kind of model folder: :func:`sample_model` runs the sampler a model of
kind ``student`` (a :class:`~tmd_train.models.TMDStudent`: Algorithm 1), ``few_step`` (a DMD2-v
``WanTransformer3DModel``: Eq. 18) or ``teacher`` (a ``WanTransformer3DModel``: Euler with CFG) takes,
with the settings its ``tmd_sampling.json`` recorded and the defaults of docs/design.md §1.7 for the rest.
The sampling CLI, TinyBench and :class:`tmd_train.TMDPipeline` all sample through it.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from .samplers import Sample, sample_few_step, sample_teacher, sample_tmd

KINDS = ("student", "few_step", "teacher")
#: Teacher sampling defaults (docs/design.md §1.7; the toy demo samples its teacher the same way).
TEACHER_STEPS, TEACHER_CFG, TEACHER_SHIFT = 50, 5.0, 5.0
#: Student defaults when the folder has no tmd_sampling.json.
STUDENT_STEPS, STUDENT_INNER_STEPS, FEW_STEP_STEPS, STUDENT_SHIFT, STUDENT_T_MAX = 2, 2, 4, 10.0, 0.999


@contextmanager
def progress(module: nn.Module, total: int, desc: str, enabled: bool) -> Iterator[None]:
    """A tqdm bar advanced by every forward of ``module`` (one per backbone pass or teacher pass)."""
    if not enabled:
        yield
        return
    bar = tqdm(total=total, desc=desc, unit="pass", file=sys.stderr)

    def hook(*_) -> None:  # a pre-hook returning a value would replace the module's inputs
        bar.update(1)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def resolved_settings(kind: str, settings: Mapping, *, steps: int | None = None, inner_steps: int | None = None,
                      cfg: float | None = None, shift: float | None = None,
                      inner_shift: float | None = None) -> dict:
    """Every sampler setting of a model of ``kind``: the given options, else the folder's
    ``tmd_sampling.json`` ``settings``, else the defaults (what settings.json files record)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "teacher":
        return {"kind": kind, "steps": steps or TEACHER_STEPS, "cfg": cfg if cfg is not None else TEACHER_CFG,
                "shift": shift if shift is not None else TEACHER_SHIFT, "t_max": 1.0}
    out = {"kind": kind, "method": settings.get("method", "tmd" if kind == "student" else "dmd2v"),
           "steps": steps or settings.get("outer_steps", STUDENT_STEPS if kind == "student" else FEW_STEP_STEPS),
           "cfg": None, "shift": shift if shift is not None else settings.get("outer_shift", STUDENT_SHIFT),
           "t_max": settings.get("t_max", STUDENT_T_MAX)}
    if kind == "student":
        out.update(inner_steps=inner_steps or settings.get("inner_steps", STUDENT_INNER_STEPS),
                   inner_shift=inner_shift if inner_shift is not None else settings.get("inner_shift", STUDENT_SHIFT),
                   s_max=settings.get("s_max", STUDENT_T_MAX))
    return out


def sampler_label(kind: str, settings: Mapping, model: nn.Module, loop: bool = False) -> str:
    """What a run of :func:`sample_model` samples, in words (``settings`` from :func:`resolved_settings`)."""
    if kind == "student":
        return (f"TMD student M={settings['steps']} N={settings['inner_steps']} H={model.head_blocks} "
                f"L={model.num_layers}" + (" (FlowHeadLoop)" if loop else ""))
    if kind == "few_step":
        return f"DMD2-v student M={settings['steps']}"
    return f"teacher {settings['steps']} steps cfg={settings['cfg']}"


def sample_model(model: nn.Module, kind: str, settings: Mapping, text: torch.Tensor, *,
                 shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
                 negative: torch.Tensor | None = None, noise: torch.Tensor | None = None, steps: int | None = None,
                 inner_steps: int | None = None, cfg: float | None = None, shift: float | None = None,
                 inner_shift: float | None = None, loop: bool = False, show: bool = False) -> tuple[Sample, str, str]:
    """Sample ``model`` (of ``kind``, with its ``tmd_sampling.json`` ``settings``) for ``text [B, L, D]``
    from ``noise`` or from noise of ``shape`` drawn from ``generator``; options left None take the
    folder's settings, else the defaults of docs/design.md §1.7 (see :func:`resolved_settings`).
    ``loop``: a TMD student's inner flow through ``tmd_ext.FlowHeadLoop``. Returns the sample, a label
    and the steps as the toy demo's table writes them (``M×(N=2)``, ``M``, ``50×2`` for a teacher with CFG)."""
    s = resolved_settings(kind, settings, steps=steps, inner_steps=inner_steps, cfg=cfg, shift=shift,
                          inner_shift=inner_shift)
    M = s["steps"]
    if kind == "student":
        N = s["inner_steps"]
        kw = {"noise": noise, "shape": shape, "generator": generator, "M": M, "N": N, "outer_shift": s["shift"],
              "inner_shift": s["inner_shift"], "t_max": s["t_max"], "s_max": s["s_max"]}
        with progress(model.transformer.condition_embedder, M, "TMD outer steps", show):
            if loop:
                from .looped import sample_tmd_looped  # needs the compiled FlowHeadLoop

                result = sample_tmd_looped(model, text, **kw)
            else:
                result = sample_tmd(model, text, **kw)
        return result, sampler_label(kind, s, model, loop), f"{M}×(N={N})"
    if kind == "few_step":
        with progress(model.condition_embedder, M, "few-step student", show):
            result = sample_few_step(model, text, noise=noise, shape=shape, generator=generator, steps=M,
                                     shift=s["shift"], t_max=s["t_max"])
        return result, sampler_label(kind, s, model), f"{M}"
    cfg = s["cfg"]
    passes = 1 if cfg == 1.0 or negative is None or negative.shape[1] == text.shape[1] else 2
    with progress(model.condition_embedder, M * passes, "teacher steps", show):
        result = sample_teacher(model, text, negative_text=negative, noise=noise, shape=shape, generator=generator,
                                steps=M, cfg=cfg, shift=s["shift"])
    return result, sampler_label(kind, s, model), f"{M}×2" if cfg != 1.0 else f"{M}"
