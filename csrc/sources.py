"""The one list of sources of the `tmd_ext._C` extension.

Both `setup.py` (imports this file) and `CMakeLists.txt` (runs it) take their sources from
here, so the two builds cannot drift. Every `.cpp` under `csrc/` is host code built with the
C++ compiler; every `.cu` is device code built with nvcc, only when the CUDA build of torch and a
CUDA toolkit are present. Run as a script it prints the list (``--cuda`` adds the .cu files),
separated by ';' for CMake; ``--cuda-home`` prints the CUDA toolkit folder
(see :func:`cuda_home`).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent


def cpp_sources() -> list[str]:
    """Host sources (always built), sorted, as paths relative to the repository root."""
    return sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.rglob("*.cpp"))


def cuda_sources() -> list[str]:
    """Device sources (built only in a CUDA build), sorted, relative to the repository root."""
    return sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.rglob("*.cu"))


def cuda_home() -> str | None:
    """A toolkit folder with bin/nvcc and lib64/libcudart*, or None. The `nvcc` on PATH may be a
    wrapper script, so its own folder is only one candidate among the usual install places."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, errors="ignore") as f:
                for tok in f.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        cands.append(tok[: -len("/bin/nvcc")])
        except OSError:
            pass
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and glob.glob(
            os.path.join(c, "lib64", "libcudart*")
        ):
            return os.path.realpath(c)
    return None


if __name__ == "__main__":
    if "--cuda-home" in sys.argv:
        print(cuda_home() or "", end="")
        sys.exit(0)
    files = cpp_sources() + (cuda_sources() if "--cuda" in sys.argv else [])
    print(";".join(files), end="")
