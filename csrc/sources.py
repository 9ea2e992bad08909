"""The one list of sources of the `tmd_ext._C` extension.

Both `setup.py` (imports this file) and `CMakeLists.txt` (runs it) take their sources from
here, so the two builds cannot drift. Every `.cpp` under `csrc/` is host code built with the
C++ compiler; every `.cu` is device code built with nvcc, only when the CUDA build of torch and a
CUDA toolkit are present. Run as a script it prints the list (``--cuda`` adds the .cu files),
separated by ';' for CMake.
"""
from __future__ import annotations

import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent


def cpp_sources() -> list[str]:
    """Host sources (always built), sorted, as paths relative to the repository root."""
    return sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.rglob("*.cpp"))


def cuda_sources() -> list[str]:
    """Device sources (built only in a CUDA build), sorted, relative to the repository root."""
    return sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.rglob("*.cu"))


if __name__ == "__main__":
    files = cpp_sources() + (cuda_sources() if "--cuda" in sys.argv else [])
    print(";".join(files), end="")
