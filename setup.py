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

``ccache`` (or ``sccache``) on ``PATH`` is used as the launcher of both the C++ compiler and nvcc
(torch's ninja build does that; ``TORCH_NO_COMPILER_WRAPPER=1`` turns it off). The metadata-only
commands (``egg_info``, ``dist_info``, ``sdist``) need no torch, so that a build frontend can ask
for the build requirements (build_backend/tmd_build_backend.py) before torch is installed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
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


# Commands that only read or pack the sources; any of BUILD_COMMANDS with them needs the extension.
METADATA_COMMANDS = {"egg_info", "dist_info", "sdist", "check"}
BUILD_COMMANDS = {"build", "build_ext", "build_py", "bdist_wheel", "bdist", "bdist_egg", "install", "develop",
                  "editable_wheel"}


def _metadata_only(args: list[str]) -> bool:
    return bool(set(args) & METADATA_COMMANDS) and not set(args) & BUILD_COMMANDS


def _extension_setup() -> dict:
    """setup() arguments of the `tmd_ext._C` build; writes tmd_ext/_build_meta.py."""
    use_cuda, home = _configure()

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    torch_version = torch.__version__
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else ""
    cutlass_inc = _cutlass_include()
    cutlass_version = _cutlass_version(cutlass_inc) if cutlass_inc else ""
    if use_cuda and cutlass_inc is None:
        sys.exit("tmd_ext: the CUDA build needs the CUTLASS headers: pip install --no-deps nvidia-cutlass==4.2.0.0 "
                 "(plain `pip install .` brings them into its build environment), or TMD_FORCE_CPU=1 for the CPU "
                 "ops only")

    sources = cpp_sources() + (cuda_sources() if use_cuda else [])
    macros = [
        ("TMD_TORCH_VERSION", f'"{torch_version}"'),
        ("TMD_CUDA_ARCHS", f'"{archs}"'),
        ("TMD_CUTLASS_VERSION", f'"{cutlass_version}"'),
    ]
    include_dirs = [str(ROOT / "csrc")]
    cxx_flags = ["-O3", "-std=c++20"]
    ext_kwargs = {}
    if use_cuda:
        macros.append(("TMD_WITH_CUDA", "1"))
        # The CUTLASS sm_90a (WGMMA) kernels are compiled in exactly when 9.0a is among the archs — the
        # rule of tmd_ext.build_info()["cutlass_sm90"]; nvcc's host pass cannot tell sm_90 from sm_90a.
        if "9.0a" in [a.removesuffix("+PTX") for a in archs.replace(",", ";").replace(" ", ";").split(";")]:
            macros.append(("TMD_CUTLASS_SM90", "1"))
        include_dirs.append(cutlass_inc)
        include_dirs.append(os.path.join(os.path.dirname(cutlass_inc), "tools", "util", "include"))
        nvcc_flags = ["-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr",
                      "--expt-extended-lambda", "-lineinfo", "-Xcompiler=-fno-strict-aliasing"]
        # cu13 wheels keep cusparse.h & co. here; the toolkit may not ship them.
        nv_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        if os.path.isdir(nv_inc):
            nvcc_flags += ["-isystem", os.path.realpath(nv_inc)]
            cxx_flags += ["-isystem", os.path.realpath(nv_inc)]
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext = CUDAExtension
    else:
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = CppExtension

    launcher = None if os.environ.get("TORCH_NO_COMPILER_WRAPPER") else next(
        (w for w in ("ccache", "sccache") if shutil.which(w)), None)
    print(f"tmd_ext: building {'CUDA + CPU' if use_cuda else 'CPU-only'} ops"
          + (f" for TORCH_CUDA_ARCH_LIST={archs} with CUDA_HOME={home}" if use_cuda else "")
          + f" against torch {torch_version}; {len(sources)} sources, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}"
          + (f", compiler launcher {launcher}" if launcher else ""), file=sys.stderr)

    # The torch version the library is built against, checked by `import tmd_ext` before loading it.
    (ROOT / "tmd_ext" / "_build_meta.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch_version!r}\nCUDA_COMPILED = {use_cuda!r}\nCUDA_ARCHS = {archs!r}\n"
    )
    return {
        "ext_modules": [ext("tmd_ext._C", sources, include_dirs=include_dirs, define_macros=macros, **ext_kwargs)],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


from setuptools import setup  # noqa: E402

# Metadata and the source distribution need no torch and build no extension.
setup(**({} if _metadata_only(sys.argv[1:]) else _extension_setup()))
