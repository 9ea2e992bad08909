"""The attention backend option: which kernel diffusers' attention dispatcher runs in every Wan attention
layer (docs/design.md §8.4).

diffusers routes the attention of ``WanTransformer3DModel`` through ``diffusers.models.attention_dispatch``;
``ModelMixin.set_attention_backend(name)`` picks the kernel for every attention processor of a model. This
module names the backends the project supports, checks that the chosen one can run (its package is installed,
a CUDA device for the GPU-only kernels) and applies it to a model — a ``WanTransformer3DModel``, a
:class:`~tmd_train.models.TMDStudent` (its transformer) or any module holding diffusers models:

* ``native`` (the default): PyTorch's ``scaled_dot_product_attention``, which itself picks flash / memory-
  efficient / math kernels; runs everywhere.
* ``flash``: flash-attn 2 (``pip install .[flash]``; it compiles from source against the installed torch
  and CUDA toolkit, which takes a long time; see the README).
* ``_flash_3``: flash-attn 3 (Hopper), built from flash-attn's ``hopper/`` folder.
* ``flash_hub``: flash-attn 2 from a pre-built kernel of the Hugging Face Hub (needs the ``kernels`` package
  and network access on first use).
* ``sage``: SageAttention (``pip install sageattention``).

Importing this module imports nothing heavy; diffusers is imported when a backend is checked or applied.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError

#: Backends accepted by the ``attention_backend`` option, and how to install each one's package.
ATTENTION_BACKENDS: dict[str, str] = {
    "native": "nothing (PyTorch's scaled_dot_product_attention)",
    "flash": "pip install '.[flash]' (flash-attn 2; builds from source)",
    "_flash_3": "flash-attn 3, built from the hopper/ folder of the flash-attn repository",
    "flash_hub": "pip install kernels (a pre-built flash-attn kernel from the Hugging Face Hub)",
    "sage": "pip install sageattention",
}
DEFAULT_BACKEND = "native"
#: Backends whose kernels run on CUDA only.
CUDA_ONLY = frozenset({"flash", "_flash_3", "flash_hub", "sage"})


def _installed(name: str) -> bool:
    """Whether the package behind backend ``name`` can be imported (diffusers' own availability checks)."""
    from diffusers import utils

    return {"flash": utils.is_flash_attn_available, "_flash_3": utils.is_flash_attn_3_available,
            "flash_hub": utils.is_kernels_available, "sage": utils.is_sageattention_available}[name]()


def check_attention_backend(name: str, *, key: str = "attention_backend", device: object | None = None) -> str:
    """``name`` if it is a supported backend whose package is installed (and, for a CUDA-only kernel, if
    ``device`` is a CUDA device or None); otherwise a :class:`~tmd_train.errors.ConfigError` naming ``key``
    and saying how to install the package."""
    from ..errors import named

    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"{named(key, name)}: unknown attention backend; choose one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    if name == DEFAULT_BACKEND:
        return name
    if not _installed(name):
        raise ConfigError(f"{named(key, name)}: the backend's package is not installed; install it with: "
                          f"{ATTENTION_BACKENDS[name]}, or use {named(key, DEFAULT_BACKEND)}")
    if device is not None and str(device).split(":")[0] != "cuda":
        raise ConfigError(f"{named(key, name)} runs on CUDA only, but the model is on {device}; use "
                          f"{named(key, DEFAULT_BACKEND)} there")
    return name


def diffusers_models(module: nn.Module) -> list[nn.Module]:
    """The outermost diffusers ``ModelMixin`` modules inside ``module`` (``module`` itself if it is one)."""
    from diffusers import ModelMixin

    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if isinstance(m, ModelMixin):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return found


def set_attention_backend(module: nn.Module, name: str, *, key: str = "attention_backend",
                          device: object | None = None) -> nn.Module:
    """Run every diffusers attention layer inside ``module`` with backend ``name`` (checked first by
    :func:`check_attention_backend` against ``device``, by default the device of ``module``'s parameters: pass
    the device the model will run on when it is built elsewhere). Returns ``module``."""
    if device is None:
        param = next(module.parameters(), None)
        device = None if param is None or param.device.type == "meta" else param.device
    check_attention_backend(name, key=key, device=device)
    models = diffusers_models(module)
    if not models:
        raise ValueError(f"{type(module).__name__} holds no diffusers model to set the attention backend of")
    from ..errors import named

    for m in models:  # "native" is set explicitly: it also resets diffusers' process-wide active backend
        try:
            m.set_attention_backend(name)
        except RuntimeError as e:  # diffusers' own requirement check: e.g. a package too old
            raise ConfigError(f"{named(key, name)}: the backend cannot be used here ({e}); install it with: "
                              f"{ATTENTION_BACKENDS[name]}, or use {named(key, DEFAULT_BACKEND)}") from None
    return module


def attention_backend_of(module: nn.Module) -> str:
    """The backend the attention processors inside ``module`` use (``native`` when none is set); a
    ValueError if they disagree."""
    from diffusers.models.attention import AttentionModuleMixin

    names = set()
    for m in module.modules():
        if isinstance(m, AttentionModuleMixin) and hasattr(m.processor, "_attention_backend"):
            backend = m.processor._attention_backend
            names.add(DEFAULT_BACKEND if backend is None else getattr(backend, "value", str(backend)))
    if len(names) > 1:
        raise ValueError(f"the attention layers use different backends: {sorted(names)}")
    return names.pop() if names else DEFAULT_BACKEND
