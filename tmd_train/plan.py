"""The memory planner: per-rank peak GPU memory of one training iteration, without a GPU and without weights.

    python -m tmd_train.plan --config configs/stage2_wan2.1_1.3b.yaml --world-size 8 [--gpu-memory 80]
        [--latent 21x60x104] [--teacher-preset wan2.1-t2v-1.3b] [key=value ...] [--json out.json]

It builds the configured stage's real method object (the same class, models, FSDP2 sharding, optimizers and
EMA as ``python -m tmd_train.stage1`` / ``stage2``) on fake tensors (``FakeTensorMode``: shapes, dtypes and
devices, no storage) under a fake process group of ``--world-size`` ranks (collectives do nothing), creates the
optimizer states as a first step would, then runs one complete iteration through the method's own
``train_step`` (stage 1: forward with the FD pass, backward, update; stage 2: a generator iteration — generator
sample with the flow-head roll-out, DMD and GAN terms and their update — followed by the fake-score and
discriminator updates) on a synthetic batch at the configured latent size and batch, measured with a reduced
``torch.distributed._tools.mem_tracker.MemTracker``: every tensor storage rank 0 holds, by category, at the
moment the total peaks. docs/design.md §7.7 explains the method and its limits.

The plan runs on fake CPU tensors with the GPU's precision (``mixed_precision: auto`` is bf16 autocast, run as
CPU autocast): the autograd engine needs a CUDA driver even for fake CUDA tensors. Data-dependent choices
resolve to the worst case: every row of a batch takes the optional passes (the FD pass, the conditional CFG
rows), and every guarded update is taken. The teacher folder need not exist: its ``config.json`` is used when
it does, else a built-in preset (``--teacher-preset`` or the folder name). Other paths of the config
(``data``, ``init_student``, ``kd_pairs``) are not read.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ConfigError, MissingFileError, UserError, run_main

GIB = 1024 ** 3

#: The transformer configs of the released Wan2.1 text-to-video models (diffusers ``WanTransformer3DModel``).
PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": {
        "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
        "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
        "added_kv_proj_dim": None, "rope_max_seq_len": 1024},
    "wan2.1-t2v-14b": {
        "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
        "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
        "added_kv_proj_dim": None, "rope_max_seq_len": 1024},
}
#: The latent of 81 frames at 480×832 (Wan2.1's VAE: 4× in time, 8× in space), the paper's training size.
DEFAULT_LATENT = (21, 60, 104)
#: Prompt tokens (UMT5, padded to 512 as Wan's pipeline does).
DEFAULT_TEXT_LEN = 512

#: Report rows: (label, the MemTracker categories summed into it).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parameters", ("Parameter",)),
    ("all-gathered weights", ("Gathered",)),
    ("buffers", ("Buffer",)),
    ("gradients", ("Gradient",)),
    ("optimizer state", ("Optstate",)),
    ("EMA", ("EMA",)),
    ("inputs", ("Other",)),
    ("activations", ("Activation",)),
    ("temporaries", ("Temp",)),
)


# ---------------------------------------------------------------------------- the architecture
def preset_for(teacher: str) -> str | None:
    """The preset a teacher folder name implies (``...14B...`` / ``...1.3B...``), or None."""
    name = teacher.lower().replace("_", "-")
    if "14b" in name:
        return "wan2.1-t2v-14b"
    if "1.3b" in name or "1-3b" in name:
        return "wan2.1-t2v-1.3b"
    return None


def resolve_teacher(teacher: str | Mapping | None, preset: str | None) -> tuple[dict[str, Any], str]:
    """``(architecture, where it came from)``: ``preset`` when given, else the folder's ``config.json`` when
    it exists, else the preset the folder name implies (a config mapping is used as it is).

    Raises:
        ConfigError: an unknown preset, or a teacher folder that neither exists nor names a preset."""
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--teacher-preset {preset!r} is not one of {', '.join(PRESETS)}")
        return dict(PRESETS[preset]), f"preset {preset}"
    if isinstance(teacher, Mapping):
        return dict(teacher), "the config's teacher mapping"
    if teacher is None:
        raise ConfigError("teacher is required (a Wan2.1 folder, a config mapping, or --teacher-preset)")
    folder = Path(teacher)
    for candidate in (folder / "transformer" / "config.json", folder / "config.json"):
        if candidate.is_file():
            from diffusers import WanTransformer3DModel
            cfg = {k: v for k, v in WanTransformer3DModel.load_config(str(candidate.parent)).items()
                   if not k.startswith("_")}
            return cfg, str(candidate)
    implied = preset_for(str(teacher))
    if implied is None:
        raise ConfigError(f"teacher {teacher}: no config.json there and the name implies no preset; "
                          f"pass --teacher-preset ({', '.join(PRESETS)})")
    return dict(PRESETS[implied]), f"preset {implied} (from the teacher name; the folder does not exist here)"


def parse_latent(text: str) -> tuple[int, int, int]:
    """``"21x60x104"`` -> ``(21, 60, 104)`` (latent frames, height, width)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"--latent must be FxHxW with positive integers (e.g. 21x60x104), got {text!r}")
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------------------- synthetic data
class PlanSource:
    """Zero latents and text embeddings of fixed shapes: the data the planned iteration reads."""

    def __init__(self, num_samples: int, channels: int, latent: Sequence[int], text_len: int, text_dim: int) -> None:
        self.num_samples = num_samples
        self.shape = (channels, *latent)
        self.text_len, self.text_dim = text_len, text_dim

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latents": torch.zeros(self.shape), "text_emb": torch.zeros(self.text_len, self.text_dim),
                "text_mask": torch.ones(self.text_len, dtype=torch.bool)}

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.text_len, self.text_dim), torch.ones(self.text_len, dtype=torch.bool)


# ---------------------------------------------------------------------------- fake-mode helpers
class WorstCase(TorchDispatchMode):
    """Resolves data-dependent results of fake tensors to the largest case: a boolean selection selects
    every element (``nonzero``, boolean indexing, ``masked_select``); a tensor read as a Python number is 1,
    a flag ``True`` (every loss and norm finite, every "all" check passes) except the result of ``any``,
    which is ``False`` (every "is any element out of range" check passes)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        from torch.distributed.tensor import DTensor
        kwargs = kwargs or {}
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:
            x = args[0]
            if x.dtype == torch.bool:
                return not getattr(x, "_plan_any", False)
            return 1.0 if x.is_floating_point() else 1
        if func is aten.nonzero.default:
            return _all_indices(args[0])
        if func is aten.masked_select.default:
            x, mask = torch.broadcast_tensors(args[0], args[1])
            return x.reshape(-1).clone()
        if func in (aten.index.Tensor, aten._unsafe_index.Tensor) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            indices: list[torch.Tensor | None] = []
            for i in args[1]:
                if i is not None and i.dtype == torch.bool:
                    indices.extend(_all_indices(i).unbind(1))
                else:
                    indices.append(i)
            return func(args[0], indices)
        out = func(*args, **kwargs)
        if func.overloadpacket is aten.any and isinstance(out, torch.Tensor):
            out._plan_any = True  # "is any element bad?" finds none
        return out


def _all_indices(mask: torch.Tensor) -> torch.Tensor:
    """``nonzero`` of an all-true ``mask``: ``[numel, dim]`` long indices."""
    grids = torch.meshgrid(*[torch.arange(n, device=mask.device) for n in mask.shape], indexing="ij")
    if not grids:
        return torch.zeros(1, 0, dtype=torch.long, device=mask.device)
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def _plan_tracker_class() -> type:
    """:class:`PlanTracker`, defined on first use (the tracker module is imported lazily)."""
    global PlanTracker
    if PlanTracker is not None:
        return PlanTracker
    from copy import deepcopy
    from enum import Enum

    from torch.distributed._tools import mem_tracker

    MemTracker, total_key = mem_tracker.MemTracker, mem_tracker._TOTAL_KEY

    members = {"PARAM": "Parameter", "BUFFER": "Buffer", "GRAD": "Gradient", "ACT": "Activation",
               "TEMP": "Temp", "OPT": "Optstate", "OTH": "Other", "GATHERED": "Gathered", "EMA": "EMA"}
    ref = Enum("PlanRefType", members, type=mem_tracker._RefType)  # type: ignore[misc]

    class _PlanTracker(MemTracker):
        """``MemTracker`` reduced to what the planner needs, so that it is fast and allows a module to run
        several times per iteration (the frozen teacher does): the per-device peak and its categories — those
        of ``MemTracker`` plus ``GATHERED`` (FSDP's all-gathered weights, which it counts as activations) and
        ``EMA`` — without per-module statistics. Activation-checkpoint recomputation in backward still counts
        as activations; FSDP2's sharded gradients count as gradients once reduce-scattered."""

        REF = ref

        def __init__(self) -> None:
            super().__init__()
            self._ref_class = ref
            self._seen: set[int] = set()

        def track(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
            """Count ``tensors`` (created before tracking) as ``kind`` (a member name of ``REF``)."""
            for t in tensors:
                self._update_and_maybe_create_winfos(t, ref[kind])

        def _track_parameters(self, module: nn.Module) -> None:
            """Parameters (their gradients, through hooks on the trainable ones) and buffers of ``module``."""
            def grad_hook(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, ref.GRAD)
            for p in module.parameters():
                self._update_and_maybe_create_winfos(p, ref.PARAM)
                if p.grad is not None:
                    self._update_and_maybe_create_winfos(p.grad, ref.GRAD)
                if p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(grad_hook),
                        p.register_post_accumulate_grad_hook(lambda q: grad_hook(q.grad)))
            for b in module.buffers():
                self._update_and_maybe_create_winfos(b, ref.BUFFER)

        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[total_key]:
                    self._peak_mem[dev] = dev_snap[total_key]
                    self._peak_mem_snap[dev] = deepcopy(dev_snap)

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            if id(module) not in self._seen:
                self._seen.add(id(module))
                self._track_parameters(module)
            elif self._mod_tracker.is_bw and self._ac_mod is None:  # recomputation of a checkpointed region
                self._ac_mod = weakref.ref(module)
                self._in_ac = True

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
                self._ac_mod = None
                self._in_ac = False

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            return None

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            return None

        def __enter__(self) -> _PlanTracker:
            FSDPParamGroup = fsdp_param_group_class()
            original = FSDPParamGroup.post_backward
            tracker = self

            def post_backward(group: Any, *args: Any, **kwargs: Any) -> Any:
                out = original(group, *args, **kwargs)
                for fp in group.fsdp_params:
                    grad = fp.sharded_param.grad
                    if grad is not None:
                        tracker._update_and_maybe_create_winfos(grad, ref.GRAD)
                return out
            original_wait = FSDPParamGroup.wait_for_unshard

            def wait_for_unshard(group: Any, *args: Any, **kwargs: Any) -> Any:
                out = original_wait(group, *args, **kwargs)
                tracker.track(_gathered_tensors_of(group), "GATHERED")
                return out
            self._fsdp_patches = [mock.patch.object(FSDPParamGroup, "post_backward", post_backward),
                                  mock.patch.object(FSDPParamGroup, "wait_for_unshard", wait_for_unshard)]
            for p in self._fsdp_patches:
                p.start()
            return super().__enter__()

        def __exit__(self, *args: Any) -> None:
            super().__exit__(*args)
            for p in self._fsdp_patches:
                p.stop()

    PlanTracker = _PlanTracker
    return PlanTracker


#: The FSDP2 internals the planner hooks (torch 2.11 – 2.14 have them): ``FSDPParamGroup`` methods and the
#: attributes of its ``FSDPParam`` entries.
FSDP_GROUP_METHODS = ("post_backward", "wait_for_unshard")


def fsdp_param_group_class() -> type:
    """``FSDPParamGroup`` of this torch's FSDP2, checked for the methods the planner wraps; a
    :class:`~tmd_train.errors.UserError` naming the torch version when they moved (the planner reads FSDP2
    internals: sharded gradients after the reduce-scatter, all-gathered parameters)."""
    where = "torch.distributed.fsdp._fully_shard._fsdp_param_group"
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    except ImportError as e:
        raise UserError(f"the memory planner hooks FSDP2 internals ({where}.FSDPParamGroup) that torch "
                        f"{torch.__version__} does not have ({e}); it was written for torch 2.11 – 2.14") from None
    missing = [m for m in FSDP_GROUP_METHODS if not callable(getattr(FSDPParamGroup, m, None))]
    if missing:
        raise UserError(f"the memory planner hooks FSDPParamGroup.{', .'.join(missing)}, which torch "
                        f"{torch.__version__} does not have; it was written for torch 2.11 – 2.14")
    return FSDPParamGroup


#: The planner's memory tracker class (see :func:`_plan_tracker_class`).
PlanTracker: Any = None


# ---------------------------------------------------------------------------- the environment
@contextlib.contextmanager
def planning_environment(world_size: int, autocast_dtype: torch.dtype | None,
                         fake_mode: Any | None = None) -> Iterator[None]:
    """What the method sees while it is planned: a CPU run context as rank 0 of ``world_size`` (a fake
    process group and a device mesh built before any fake tensor exists) with ``autocast_dtype`` (the
    GPU's bf16 autocast runs as CPU autocast), every guarded update taken, and — under ``fake_mode`` —
    modules that can move fake parameters (``nn.Module.to`` swaps them, which the fake mode's weak
    memo of converted tensors would otherwise refuse)."""
    from torch.distributed.device_mesh import init_device_mesh

    from .engine import context as context_mod
    from .engine import optim as optim_mod

    device = torch.device("cpu")
    own_group = False
    patches: list[Any] = []
    if world_size > 1:
        if dist.is_initialized():
            raise UserError("the planner needs its own (fake) process group; it cannot run inside a distributed job")
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        own_group = True
        mesh = init_device_mesh(device.type, (world_size,))  # before any fake tensor: inside, it fails
    else:
        mesh = None

    def create(cfg: Any) -> Any:
        return context_mod.RunContext(device=device, rank=0, world=world_size, is_main=True,
                                      autocast_dtype=autocast_dtype, mesh=mesh)
    patches.append(mock.patch.object(context_mod.RunContext, "create", staticmethod(create)))
    patches.append(mock.patch.object(optim_mod, "all_finite", lambda *values: True))
    if fake_mode is not None:
        swap = torch.utils.swap_tensors

        def swap_fake(t1: torch.Tensor, t2: torch.Tensor) -> None:
            fake_mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
            if weakref.getweakrefcount(t1) or weakref.getweakrefcount(t2):
                with torch.no_grad():  # what nn.Module.to does to an ordinary tensor
                    t1.data = t2.data
                return
            swap(t1, t2)
        patches.append(mock.patch("torch.utils.swap_tensors", swap_fake))
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield
    finally:
        if own_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """One planned iteration.

    Attributes:
        method, world_size, batch_size, grad_accum_steps, latent, text_len, precision: what was planned.
        teacher: where the architecture came from.
        categories: bytes per report row (:data:`CATEGORIES`) at the moment of the peak.
        peak: the per-rank peak in bytes (the sum of ``categories``).
        seconds: wall time of the planning.
        iteration: what the measured iteration ran.
    """

    method: str
    world_size: int
    batch_size: int
    grad_accum_steps: int
    latent: tuple[int, int, int]
    text_len: int
    precision: str
    teacher: str
    iteration: str
    categories: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    seconds: float = 0.0

    def gib(self) -> dict[str, float]:
        """The categories and ``peak`` in GiB."""
        out = {k: v / GIB for k, v in self.categories.items()}
        out["peak"] = self.peak / GIB
        return out

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.peak <= gpu_memory_gib * GIB

    def to_json(self, gpu_memory_gib: float | None = None) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latent"] = list(self.latent)
        out["gib"] = {k: round(v, 3) for k, v in self.gib().items()}
        if gpu_memory_gib is not None:
            out["gpu_memory_gib"] = gpu_memory_gib
            out["fits"] = self.fits(gpu_memory_gib)
        return out

    def report(self, gpu_memory_gib: float) -> str:
        """The printed table."""
        lines = [f"{self.method}: {self.world_size} rank(s), per-rank batch {self.batch_size}"
                 f" × {self.grad_accum_steps} accumulation step(s), latent {'x'.join(map(str, self.latent))},"
                 f" text {self.text_len}, {self.precision}; teacher: {self.teacher}",
                 f"iteration: {self.iteration}",
                 "per-rank memory at the peak (GiB):"]
        for name, value in self.gib().items():
            if name == "peak":
                continue
            lines.append(f"  {name:<22}{value:10.2f}")
        lines.append(f"  {'peak':<22}{self.peak / GIB:10.2f}")
        verdict = "fits" if self.fits(gpu_memory_gib) else "does NOT fit"
        lines.append(f"{verdict} in {gpu_memory_gib:g} GiB per GPU "
                     f"({'headroom' if self.fits(gpu_memory_gib) else 'short by'} "
                     f"{abs(gpu_memory_gib - self.peak / GIB):.2f} GiB); planned in {self.seconds:.1f} s")
        return "\n".join(lines)


def load_plan_config(config: str | Path | None, overrides: Sequence[str]) -> Any:
    """The training config of ``config`` + ``overrides``, typed by its ``method``'s config class."""
    from .engine.config import load_config, parse_overrides, yaml_load
    from .methods import METHODS

    method = parse_overrides([o for o in overrides if o.partition("=")[0].strip() == "method"]).get("method")
    if method is None and config is not None:
        path = Path(config)
        if not path.is_file():
            raise MissingFileError(f"config file not found: {path} (check the --config path)")
        loaded = yaml_load(path.read_text(encoding="utf-8")) or {}
        method = loaded.get("method") if isinstance(loaded, Mapping) else None
    if method not in METHODS:
        raise ConfigError(f"method must be one of {tuple(METHODS)} (in the config or as method=...), got {method!r}")
    return load_config(METHODS[method].config_cls, config, overrides)


def _modules_and_optimizers(method: Any) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    modules = [v for v in vars(method).values() if isinstance(v, nn.Module)]
    modules += [v for v in getattr(method, "roots", {}).values() if isinstance(v, nn.Module)]
    optimizers = [v for v in vars(method).values() if isinstance(v, torch.optim.Optimizer)]
    optimizers += list(getattr(method, "optimizers", {}).values())
    return modules, optimizers


def _gathered_tensors_of(group: Any) -> list[torch.Tensor]:
    """The unsharded (all-gathered) parameter storages of the FSDP2 parameter group ``group``."""
    out: list[torch.Tensor] = []
    for fp in group.fsdp_params:
        for name in ("_unsharded_param", "all_gather_outputs"):
            value = getattr(fp, name, None)
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif isinstance(value, (list, tuple)):
                out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


def _create_optimizer_states(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Create the optimizers' states as their first step does (a step on zero gradients, then the
    gradients are dropped): the measured iteration then runs as every later one does."""
    for opt in optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _iteration_steps(method: Any) -> tuple[int, str]:
    """The step planned (stage 2: the first generator iteration) and what it runs."""
    cfg = method.cfg
    every = getattr(cfg, "generator_every", None)
    if every is None:
        fd = "with the FD pass" if getattr(cfg.objective, "variant", "") != "tm" and method.name != "tm" else ""
        return 1, f"stage 1 ({method.name}): forward {fd}, backward, update".replace("  ", " ")
    kd = getattr(cfg, "kd_steps", 0)
    what = ("stage 2 ({}): generator update (sample{}, DMD{}), then fake-score{} update".format(
        method.name, " with the flow-head roll-out" if method.name == "tmd" else "",
        " + GAN" if method.disc is not None else "", " and discriminator" if method.disc is not None else ""))
    return kd + every, what


def estimate(cfg: Any, world_size: int, *, latent: Sequence[int], text_len: int = DEFAULT_TEXT_LEN,
             gpu: bool = True, fake: bool = True, teacher_note: str = "", progress: bool = False) -> Plan:
    """Plan (``fake=True``) or measure (``fake=False``: real tensors; the collectives of the fake process
    group do nothing) the per-rank memory of the iteration of ``cfg``'s method — whose ``teacher`` must be
    an architecture mapping — as rank 0 of ``world_size``. ``gpu``: the precision of a GPU run
    (``mixed_precision: auto`` is bf16 autocast); else that of a CPU run. ``progress``: say on stderr what
    it is doing (a fake run of Wan-sized models takes minutes).

    The optimizer states are created first (as by an earlier step), so the iteration runs as every later one.
    With gradient accumulation, two micro-batches are run (``grad_accum_steps`` capped at 2): from the second
    on, each runs on the same memory (the accumulated gradients exist), so the peak is that of any longer run.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .methods import build_method

    if not isinstance(cfg.teacher, Mapping):
        raise ConfigError("estimate needs cfg.teacher as an architecture mapping (see resolve_teacher)")
    amp = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and gpu)
    autocast_dtype = torch.bfloat16 if amp else None
    accum = getattr(cfg, "grad_accum_steps", 1)
    if accum > 2:
        cfg = dataclasses.replace(cfg, grad_accum_steps=2)
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(planning_environment(world_size, autocast_dtype, fake_mode))
        if fake_mode is not None:
            stack.enter_context(fake_mode)
            stack.enter_context(WorstCase())
        arch = cfg.teacher
        source = PlanSource(world_size * cfg.batch_size * min(accum, 2), arch["in_channels"], latent, text_len,
                            arch["text_dim"])
        say = (lambda text: print(f"[plan {time.perf_counter() - t0:6.1f} s] {text}", file=sys.stderr,
                                  flush=True)) if progress else (lambda text: None)
        say(f"building {cfg.method} ({'fake' if fake else 'real'} tensors, {world_size} rank(s))")
        method = build_method(cfg, source=source, negative=source.negative())
        measured, what = _iteration_steps(method)
        modules, optimizers = _modules_and_optimizers(method)
        _create_optimizer_states(optimizers)
        batch = next(iter(method.batches(measured)))
        tracker = _plan_tracker_class()()
        tracker.track_external(*modules, *optimizers)
        ema = getattr(method, "ema", None)
        if ema is not None:
            tracker.track(list(ema.shadow.values()), "EMA")
        tracker.track(_tensors(batch) + [method.negative_text], "OTH")
        say(f"running the iteration: {what}")
        with tracker:
            method.train_step(measured, batch)
        say("done")
        snap = tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    categories = {label: sum(int(snap.get(k, 0)) for k in keys) for label, keys in CATEGORIES}
    return Plan(method=method.name, world_size=world_size, batch_size=cfg.batch_size, grad_accum_steps=accum,
                latent=tuple(latent), text_len=text_len, precision="bf16 autocast" if amp else "float32",
                teacher=teacher_note, iteration=what, categories=categories, peak=sum(categories.values()),
                seconds=time.perf_counter() - t0)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tmd_train.plan",
        description="Per-rank peak GPU memory of one training iteration of a stage-1/stage-2 config, planned "
                    "on fake tensors under a fake process group (no GPU, no weights).")
    p.add_argument("--config", help="a stage-1 or stage-2 YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (as for the stages)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs) the run uses")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU to check the peak against")
    p.add_argument("--latent", default=None,
                   help=f"latent FxHxW (default: synthetic_latent_size for data=synthetic, else "
                        f"{'x'.join(map(str, DEFAULT_LATENT))}, 81 frames at 480x832)")
    p.add_argument("--text-len", type=int, default=DEFAULT_TEXT_LEN, help="prompt tokens (default 512)")
    p.add_argument("--teacher-preset", choices=sorted(PRESETS), default=None,
                   help="the teacher architecture (default: the folder's config.json, else implied by its name)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    if not args.gpu_memory > 0 or not math.isfinite(args.gpu_memory):
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    if args.text_len < 1:
        raise ConfigError(f"--text-len must be >= 1, got {args.text_len}")
    cfg = load_plan_config(args.config, args.overrides)
    arch, note = resolve_teacher(cfg.teacher, args.teacher_preset)
    if args.latent is not None:
        latent = parse_latent(args.latent)
    elif cfg.data == "synthetic":
        latent = tuple(cfg.synthetic_latent_size)
    else:
        latent = DEFAULT_LATENT
    changes: dict[str, Any] = {"teacher": arch, "data": "synthetic"}
    for key, value in (("init_student", None), ("kd_steps", 0), ("kd_pairs", None), ("sample_every", 0)):
        if hasattr(cfg, key):
            changes[key] = value
    cfg = dataclasses.replace(cfg, **changes)
    plan = estimate(cfg, args.world_size, latent=latent, text_len=args.text_len, teacher_note=note, progress=True)
    print(plan.report(args.gpu_memory))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan.to_json(args.gpu_memory), indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
