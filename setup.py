"""Build of `tmd_ext._C`: the C++ ops always, the CUDA/CUTLASS ops when the CUDA build of torch
and a CUDA toolkit are present (no GPU needed).

setup.py owns the build; the source list comes from `csrc/sources.py`, which CMakeLists.txt
reads too. Environment knobs:

* ``TORCH_CUDA_ARCH_LIST`` — archs to compile for. Unset: the visible GPUs' archs (9.0 becomes
  9.0a, so the CUTLASS WGMMA kernels are built), or ``9.0a`` when no GPU is visible.
* ``CUDA_HOME`` — the toolkit folder holding ``bin/nvcc`` and ``lib64/libcudart*``; found
  automatically when unset.
* ``TMD_FORCE_CPU=1`` — build the C++ ops only, even with the CUDA build of torch.
* ``MAX_JOBS`` — parallel compile jobs (ninja).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
from sources import cpp_sources, cuda_home, cuda_sources  # noqa: E402


def _default_arch_list() -> str:
    import torch

    if torch.cuda.is_available():
        archs = set()
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.add(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else ""))
        return ";".join(sorted(archs))
    return "9.0a"


def _cutlass_include() -> str | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return inc if os.path.isfile(os.path.join(inc, "cutlass", "version.h")) else None


def _cutlass_version(inc: str) -> str:
    vals = {}
    with open(os.path.join(inc, "cutlass", "version.h")) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "#define" and parts[1] in (
                "CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"
            ):
                vals[parts[1]] = parts[2]
    return ".".join(vals.get(k, "0") for k in ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH"))


def _configure():
    import torch

    want_cuda = torch.version.cuda is not None and os.environ.get("TMD_FORCE_CPU", "0") != "1"
    home = cuda_home() if want_cuda else None
    if want_cuda and home is None:
        print("tmd_ext: torch is a CUDA build but no CUDA toolkit (bin/nvcc + lib64/libcudart) was "
              "found; set CUDA_HOME. Building the CPU ops only.", file=sys.stderr)
    use_cuda = want_cuda and home is not None
    if use_cuda:
        os.environ["CUDA_HOME"] = home  # before cpp_extension reads it
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list()
    return use_cuda, home


USE_CUDA, CUDA_HOME = _configure()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

TORCH_VERSION = torch.__version__
ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if USE_CUDA else ""
CUTLASS_INC = _cutlass_include()
CUTLASS_VERSION = _cutlass_version(CUTLASS_INC) if CUTLASS_INC else ""
if USE_CUDA and CUTLASS_INC is None:
    sys.exit("tmd_ext: the CUDA build needs the CUTLASS headers: pip install --no-deps nvidia-cutlass")

sources = cpp_sources() + (cuda_sources() if USE_CUDA else [])
macros = [
    ("TMD_TORCH_VERSION", f'"{TORCH_VERSION}"'),
    ("TMD_CUDA_ARCHS", f'"{ARCHS}"'),
    ("TMD_CUTLASS_VERSION", f'"{CUTLASS_VERSION}"'),
]
include_dirs = [str(ROOT / "csrc")]
cxx_flags = ["-O3", "-std=c++20"]
ext_kwargs = {}
if USE_CUDA:
    macros.append(("TMD_WITH_CUDA", "1"))
    include_dirs.append(CUTLASS_INC)
    include_dirs.append(os.path.join(os.path.dirname(CUTLASS_INC), "tools", "util", "include"))
    nvcc_flags = ["-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr",
                  "--expt-extended-lambda", "-lineinfo", "-Xcompiler=-fno-strict-aliasing"]
    # cu13 wheels keep cusparse.h & co. here; the toolkit may not ship them.
    nv_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if os.path.isdir(nv_inc):
        nvcc_flags += ["-isystem", os.path.realpath(nv_inc)]
        cxx_flags += ["-isystem", os.path.realpath(nv_inc)]
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    Ext = CUDAExtension
else:
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
    Ext = CppExtension

print(f"tmd_ext: building {'CUDA + CPU' if USE_CUDA else 'CPU-only'} ops"
      + (f" for TORCH_CUDA_ARCH_LIST={ARCHS} with CUDA_HOME={CUDA_HOME}" if USE_CUDA else "")
      + f" against torch {TORCH_VERSION}; {len(sources)} sources", file=sys.stderr)

# The torch version the library is built against, checked by `import tmd_ext` before loading it.
(ROOT / "tmd_ext" / "_build_meta.py").write_text(
    "# Written by setup.py at build time.\n"
    f"TORCH_VERSION = {TORCH_VERSION!r}\nCUDA_COMPILED = {USE_CUDA!r}\nCUDA_ARCHS = {ARCHS!r}\n"
)

setup(
    ext_modules=[Ext("tmd_ext._C", sources, include_dirs=include_dirs, define_macros=macros,
                     **ext_kwargs)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
