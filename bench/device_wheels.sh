#!/usr/bin/env bash
# Downloads the Python packages the lent GPU machine lacks (no network there) into .whl/ at the repository
# root, for its Python 3.12: the CUTLASS headers (nvidia-cutlass, read by setup.py) and diffusers (the Wan
# model; it also needs importlib_metadata). Run it here, where pip can reach the index; then carry .whl with the device command (docs/design.md §4.6).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "nvidia-cutlass==${CUTLASS_VERSION:-4.2.0.0}" "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata
ls -la .whl
