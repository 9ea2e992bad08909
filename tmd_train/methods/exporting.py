"""The small files of the exported model folders (the weights are streamed by
:mod:`tmd_train.engine.consolidate`): a TMD student's ``config.json`` (as :meth:`TMDStudent.save_pretrained`
writes it) and a plain diffusers ``WanTransformer3DModel`` folder's ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers.utils import CONFIG_NAME as DIFFUSERS_CONFIG
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from ..models.student import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, TMDStudent
from .networks import empty_wan


def student_files(student: TMDStudent) -> tuple[str, dict[str, str]]:
    """``(weights file name, {file: text})`` of a :meth:`TMDStudent.from_pretrained` folder of ``student``'s
    architecture (``student`` may be FSDP-sharded: only its options are read)."""
    cfg = {"format": FORMAT, "version": FORMAT_VERSION, "student": dataclasses.asdict(student.config),
           "transformer": student.teacher_config}
    return WEIGHTS_NAME, {CONFIG_NAME: json.dumps(cfg, indent=2) + "\n"}


def plain_files(config: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """``(weights file name, {file: text})`` of a diffusers ``WanTransformer3DModel`` folder of the
    architecture ``config`` (the ``config.json`` that ``save_pretrained`` writes)."""
    with tempfile.TemporaryDirectory() as tmp:
        empty_wan(config).save_config(tmp)
        text = (Path(tmp) / DIFFUSERS_CONFIG).read_text()
    return SAFETENSORS_WEIGHTS_NAME, {DIFFUSERS_CONFIG: text}
