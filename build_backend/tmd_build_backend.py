"""PEP 517 build backend of `tmd`: setuptools' backend plus build requirements that depend on the
environment the package is installed into (docs/design.md §3.8).

With pip's default build isolation the extension is compiled in a throwaway environment that holds only
the build requirements. A C++ extension must be compiled against exactly the torch it will be loaded
into, so the wheel and editable hooks ask for ``torch==<the version installed in the target
environment>``; they ask for the CUTLASS headers (the ``nvidia-cutlass`` wheel) only when the build
will compile the CUDA ops. Every other hook is setuptools' own.

The target environment is the interpreter that runs the hooks (pip runs them with its own
``sys.executable``); pip hides that interpreter's packages from the hooks through ``PYTHONPATH`` (a
``sitecustomize`` that drops the site-packages) and ``PYTHONNOUSERSITE``, so a subprocess without those
variables sees the packages the user installed.

Environment knobs (besides those of setup.py): ``TMD_BUILD_TORCH`` — the torch requirement to build
against (e.g. ``torch==2.14.1``), instead of the one found installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook not overridden below is setuptools')

ROOT = Path(__file__).resolve().parent.parent

TORCH_FALLBACK = "torch>=2.11"
# The CUTLASS release the CUDA kernels are written and tested against; only its headers are used.
CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"
# What pip's build isolation sets to hide the target environment's packages from the hooks.
ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE")

# Run by the target interpreter: the installed torch's distribution version (the version pip resolves,
# which keeps a local label such as +cpu) and its CUDA version, without importing torch.
_PROBE = r"""
import importlib.metadata, importlib.util, json, os
out = {"version": None, "cuda": None}
try:
    out["version"] = importlib.metadata.version("torch")
except importlib.metadata.PackageNotFoundError:
    pass
spec = importlib.util.find_spec("torch") if out["version"] else None
if spec is not None and spec.submodule_search_locations:
    scope = {}
    try:
        with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
            exec(f.read(), scope)
        out["cuda"] = scope.get("cuda")
    except (OSError, SyntaxError, ImportError):
        pass
print(json.dumps(out))
"""


def _note(msg: str) -> None:
    print(f"tmd build: {msg}", file=sys.stderr, flush=True)


def target_torch(executable: str | None = None) -> dict:
    """``{"version": str | None, "cuda": str | None}`` of the torch installed for ``executable``
    (default: the interpreter running the hook), seen without pip's isolation variables."""
    env = {k: v for k, v in os.environ.items() if k not in ISOLATION_VARS}
    try:
        proc = subprocess.run([executable or sys.executable, "-c", _PROBE], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"version": None, "cuda": None}
    return {"version": info.get("version"), "cuda": info.get("cuda")}


def _cuda_home() -> str | None:
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        from sources import cuda_home
    finally:
        sys.path.pop(0)
    return cuda_home()


def extra_requirements() -> list[str]:
    """The build requirements that depend on the environment: torch, and the CUTLASS headers when the
    CUDA ops will be compiled (a CUDA build of torch, a toolkit found, ``TMD_FORCE_CPU`` not 1)."""
    force = os.environ.get("TMD_BUILD_TORCH", "").strip()
    if force:
        torch_req, torch_cuda = force, "unknown"
        _note(f"building against {torch_req} (TMD_BUILD_TORCH)")
    else:
        found = target_torch()
        if found["version"]:
            torch_req, torch_cuda = f"torch=={found['version']}", found["cuda"]
            _note(f"building against {torch_req}, the torch installed for {sys.executable}"
                  f" ({'CUDA ' + torch_cuda if torch_cuda else 'CPU-only'} build)")
        else:
            torch_req, torch_cuda = TORCH_FALLBACK, "unknown"
            _note(f"no torch is installed for {sys.executable}; building against {TORCH_FALLBACK} (whatever pip "
                  "picks). Install torch first (or set TMD_BUILD_TORCH=torch==X.Y.Z), so that the extension is "
                  "compiled against the torch it will run with")
    reqs = [torch_req]
    if os.environ.get("TMD_FORCE_CPU", "0") == "1" or torch_cuda is None:
        return reqs  # CPU ops only: no CUTLASS
    if _cuda_home() is None:
        _note("no CUDA toolkit (bin/nvcc + lib64/libcudart) found: the CPU ops only will be built; set CUDA_HOME "
              "to build the CUDA ops, or install a prebuilt wheel")
        return reqs
    return reqs + [CUTLASS_REQUIREMENT]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + extra_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + extra_requirements()
