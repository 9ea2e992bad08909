"""Building and writing the networks the methods train: the teacher (from a folder or a random
config), the TMD student, the LoRA fake score, and the folders the trained models are exported to.

Models of a teacher folder (and of an ``init_student`` folder) are built on the meta device
(docs/design.md §7): their parameters carry a :class:`~tmd_train.engine.distributed.WeightSource`
(the folder's safetensors) and are filled by :func:`~tmd_train.engine.distributed.materialize`
after sharding, each process reading only its shards. The layers a student adds to the teacher
(fusion, time embeddings) are initialised on CPU as before; random teachers of a config mapping
are built on CPU."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from torch import nn

from ..engine.distributed import WEIGHTS_ATTR, WeightSource
from ..engine.seeding import derive_seed
from ..errors import ConfigError, MissingFileError, UserError
from ..models.student import TMDStudent
from ..models.teacher import empty_teacher, load_teacher, weight_files


def load_training_teacher(teacher: str | Mapping, seed: int) -> WanTransformer3DModel:
    """The float32 teacher of a training config: a Wan2.1 folder (built on the meta device with its
    weight source, see :func:`meta_teacher`), or a ``WanTransformer3DModel`` config mapping
    (``patch_size`` may be a list, as YAML gives it) whose random weights are drawn from the global
    RNG seeded by ``seed`` inside a forked RNG state (every process and every restart builds the
    same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load(teacher)


def _load(teacher: str | Mapping) -> WanTransformer3DModel:
    if isinstance(teacher, Mapping):
        tcfg = dict(teacher)
        if "patch_size" in tcfg:
            tcfg["patch_size"] = tuple(tcfg["patch_size"])
        return load_teacher(tcfg, torch_dtype=torch.float32)
    return meta_teacher(teacher)


def meta_teacher(folder: str | Path) -> WanTransformer3DModel:
    """The float32 teacher of a Wan2.1 folder on the meta device, its weights to be read from the
    folder's safetensors by :func:`~tmd_train.engine.distributed.materialize` (a folder without
    safetensors files is loaded on CPU instead). Raises as :func:`load_teacher`."""
    model, transformer_folder = empty_teacher(folder)
    files = weight_files(transformer_folder)
    if not files:
        return load_teacher(folder, torch_dtype=torch.float32)
    setattr(model, WEIGHTS_ATTR, WeightSource(files))
    return model


def is_meta(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` is on the meta device (its weights are still to be read)."""
    return any(p.is_meta for p in module.parameters())


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, except for a module built on the meta device: it stays where it is
    (sharding moves its real tensors; :func:`~tmd_train.engine.distributed.materialize` allocates
    the rest on the device). Returns ``module``."""
    return module if is_meta(module) else module.to(device)


def teacher_config(model: WanTransformer3DModel) -> dict[str, Any]:
    """The teacher's architecture as a JSON-friendly dict (tuples as lists, no private keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}


def build_models(teacher: str | Mapping, seed: int, *, need_teacher: bool, init_student: str | None = None,
                 **student_options: Any) -> tuple[WanTransformer3DModel | None, TMDStudent]:
    """``(teacher, student)`` in float32: on CPU, or, for a teacher folder or an ``init_student``
    folder, on the meta device with their weight sources (the student's new layers on CPU).

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
        student = TMDStudent.from_pretrained(init_student, torch_dtype=torch.float32, device="meta")
    except UserError as e:
        raise type(e)(f"init_student: {e}") from None
    setattr(student, WEIGHTS_ATTR, WeightSource(weight_files(Path(init_student))))
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


# ---------------------------------------------------------------------------- the LoRA fake score
FAKE_SCORE_KINDS = ("full", "lora")
#: peft ``target_modules`` of the default LoRA fake score: every linear layer of the blocks' self- and
#: cross-attention and feed-forward network (suffix match inside ``blocks.<i>``)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass
class FakeScoreConfig:
    """The stage-2 fake score (docs/design.md §7).

    Attributes:
        kind: "full" (a trainable full copy of the teacher, the method as published) or "lora"
            (LoRA adapters on the shared frozen teacher: the real score is the teacher with the
            adapters off, the fake score the teacher with them on; only the adapters train).
        lora_rank: rank r of every adapter (kind=lora).
        lora_alpha: LoRA alpha; the adapter output is scaled by alpha / r (null: r, i.e. scale 1).
        lora_targets: peft target_modules of the adapters, matched as name suffixes inside the
            teacher (default: the attention and feed-forward linears of every block).
    """

    kind: str = "full"
    lora_rank: int = 256
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if self.kind not in FAKE_SCORE_KINDS:
            raise ConfigError(f"kind must be one of {FAKE_SCORE_KINDS}, got {self.kind!r}")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"lora_alpha must be a finite number > 0 (or null), got {self.lora_alpha}")
        if not self.lora_targets or any(not t for t in self.lora_targets):
            raise ConfigError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")


def is_adapter_name(name: str) -> bool:
    """Whether the parameter ``name`` belongs to a LoRA adapter added by :func:`add_lora`."""
    return ".lora_" in f".{name}"


def add_lora(model: nn.Module, cfg: FakeScoreConfig, seed: int) -> dict[str, torch.Tensor]:
    """Inject the LoRA adapters of ``cfg`` into ``model`` in place (peft) and return their initial
    values by parameter name: ``lora_A`` Kaiming-uniform (peft's default), ``lora_B`` zero — so at
    init the adapted model equals ``model`` exactly. The values are drawn on CPU in float32 from a
    generator seeded by ``(seed, "fake_score_lora")`` in name order, so every process and every
    restart, and a model on the meta device (whose adapters are meta too; fill them with
    :func:`load_sharded`), get the same ones. On a materialised model the adapters are set to them.
    The rest of ``model`` must already be frozen; the adapters require grad and stay float32.

    Raises:
        ConfigError: ``lora_targets`` matches no module of ``model``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    meta = any(p.is_meta for p in model.parameters())
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

    fake = any(is_fake(p) for p in model.parameters())  # FakeTensorMode (memory planning): no values to set
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                        target_modules=list(cfg.lora_targets), lora_dropout=0.0, bias="none")
    try:
        # peft's own init draws from the global RNG (ours replaces it). Under FakeTensorMode peft cannot move
        # fake adapters (Module.to swaps parameters): they are built on the (real) meta device, replaced below.
        outside_fake = unset_fake_temporarily() if fake else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), outside_fake:
            inject_adapter_in_model(config, model, low_cpu_mem_usage=meta or fake)
    except ValueError as e:
        raise ConfigError(f"fake_score.lora_targets {list(cfg.lora_targets)}: {e}") from None
    device = next(p.device for n, p in model.named_parameters() if not is_adapter_name(n))
    gen = torch.Generator().manual_seed(derive_seed(seed, "fake_score_lora"))
    values: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not is_adapter_name(name):
            continue
        value = torch.empty(p.shape, dtype=torch.float32)
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(p.shape[1])                # kaiming_uniform_(a=√5): U(-1/√fan_in, 1/√fan_in)
            value.uniform_(-bound, bound, generator=gen)
        else:
            value.zero_()
        values[name] = value
        p.requires_grad_(True)
        if meta:
            p.data = p.data.to(torch.float32)
        elif fake:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf,
                    nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device=device)))
        else:
            p.data = value.clone().to(device)
    if not values:
        raise ConfigError(f"fake_score.lora_targets {list(cfg.lora_targets)} match no module of the teacher")
    source = getattr(model, WEIGHTS_ATTR, None)
    if meta and source is not None:
        source.values.update(values)
    return values


def set_adapters(model: nn.Module, on: bool) -> None:
    """Switch the LoRA adapters of ``model`` on or off. Only peft's per-layer switch is flipped:
    ``requires_grad`` of the adapters is left alone (peft's ``enable_adapters`` would toggle it,
    which FSDP's sharded parameters must not see mid-step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m._disable_adapters = not on
