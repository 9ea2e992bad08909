"""Building and writing the networks the methods train: the teacher (from a folder or a random
config), the TMD student, and the folders the trained models are exported to."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

from ..errors import ConfigError, MissingFileError, UserError
from ..models.student import TMDStudent
from ..models.teacher import load_teacher


def load_training_teacher(teacher: str | Mapping, seed: int) -> WanTransformer3DModel:
    """The float32 teacher of a training config: a Wan2.1 folder, or a ``WanTransformer3DModel``
    config mapping (``patch_size`` may be a list, as YAML gives it) whose random weights are drawn
    from the global RNG seeded by ``seed`` inside a forked RNG state (every process and every
    restart builds the same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load(teacher)


def _load(teacher: str | Mapping) -> WanTransformer3DModel:
    if isinstance(teacher, Mapping):
        tcfg = dict(teacher)
        if "patch_size" in tcfg:
            tcfg["patch_size"] = tuple(tcfg["patch_size"])
        return load_teacher(tcfg, torch_dtype=torch.float32)
    return load_teacher(teacher, torch_dtype=torch.float32)


def teacher_config(model: WanTransformer3DModel) -> dict[str, Any]:
    """The teacher's architecture as a JSON-friendly dict (tuples as lists, no private keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}


def build_models(teacher: str | Mapping, seed: int, *, need_teacher: bool, init_student: str | None = None,
                 **student_options: Any) -> tuple[WanTransformer3DModel | None, TMDStudent]:
    """``(teacher, student)`` on CPU in float32.

    The teacher is loaded from a folder (or random from a config). The student is built from it
    (on a deep copy when the frozen teacher is needed later, else adopting its modules), or, with
    ``init_student``, loaded from that :meth:`TMDStudent.from_pretrained` folder (its options and
    teacher architecture must match; the teacher is then loaded only if ``need_teacher``).
    Every random initialisation (a random teacher; the student's new layers) draws from the
    global RNG seeded by ``seed`` inside a forked RNG state, so all processes and every restart
    build the same models.

    Raises:
        MissingFileError (a ``FileNotFoundError``): ``init_student`` is not a student folder (the
            message says what it is, e.g. a ``method=dmd2v`` output, and what is expected).
        ConfigError (a ``ValueError``): ``init_student`` does not match the configured student or
            teacher.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _load(teacher) if (need_teacher or init_student is None) else None
        if init_student is None:
            return (model if need_teacher else None), TMDStudent.from_teacher(model, copy=need_teacher,
                                                                              **student_options)
    try:
        student = TMDStudent.from_pretrained(init_student, torch_dtype=torch.float32)
    except UserError as e:
        raise type(e)(f"init_student: {e}") from None
    for key, value in student_options.items():
        if getattr(student.config, key) != value:
            raise ConfigError(f"init_student {init_student} has {key}={getattr(student.config, key)!r}, "
                              f"the config says {value!r}")
    architecture = teacher_config(model) if model is not None else teacher_architecture(teacher)
    if student.teacher_config != architecture:
        raise ConfigError(f"init_student {init_student} was built on another teacher architecture")
    return model, student


def teacher_architecture(teacher: str | Mapping) -> dict[str, Any]:
    """The teacher's architecture, as :func:`teacher_config` gives it, without loading its weights: from
    the config mapping, or from the ``config.json`` of the folder (its ``transformer/`` subfolder for a
    Wan2.1 diffusers folder)."""
    if isinstance(teacher, Mapping):
        return teacher_config(empty_wan(teacher))
    folder = Path(teacher)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"teacher {teacher}: no config.json (a Wan2.1 diffusers folder or its transformer/)")
    return teacher_config(empty_wan(WanTransformer3DModel.load_config(str(folder))))


def _empty_wan(config: Mapping[str, Any]) -> WanTransformer3DModel:
    tcfg = dict(config)
    tcfg["patch_size"] = tuple(tcfg["patch_size"])
    return WanTransformer3DModel.from_config(tcfg)


def empty_student(student: TMDStudent) -> TMDStudent:
    """A weightless (meta) copy of ``student``'s architecture, to load a full state dict into
    with ``load_state_dict(..., assign=True)``."""
    with init_empty_weights(include_buffers=False):
        return TMDStudent(_empty_wan(student.teacher_config), dataclasses.replace(student.config))


def empty_wan(config: Mapping[str, Any]) -> WanTransformer3DModel:
    """A weightless (meta) ``WanTransformer3DModel`` of the architecture ``config``."""
    with init_empty_weights(include_buffers=False):
        return _empty_wan(config)


def write_student(student: TMDStudent, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a :meth:`TMDStudent.from_pretrained` folder from a full state dict of ``student``
    (which may be FSDP-sharded: a fresh, weightless copy of its architecture does the writing)."""
    copy = empty_student(student)
    copy.load_state_dict(state_dict, strict=True, assign=True)
    copy.save_pretrained(directory)


def write_plain(config: Mapping[str, Any], state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """A diffusers ``WanTransformer3DModel`` folder from a full state dict (a weightless copy of
    the architecture ``config`` does the writing)."""
    model = empty_wan(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.save_pretrained(directory)
