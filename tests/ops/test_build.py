"""The compiled library: what build_info() says, that every op has its kernels, its wrapper,
reference, test and benchmark, the torch-version guard, and that setup.py and CMake share one
source list."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tmd_ext

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "csrc"))
from sources import cpp_sources, cuda_sources  # noqa: E402


def tmd_ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tmd::"))


def test_build_info():
    info = tmd_ext.build_info()
    for key in ("torch_version", "cuda_compiled", "cuda_archs", "cutlass_version", "cutlass_sm90"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert torch.version.cuda is not None
        assert info["cuda_archs"], "a CUDA build must record its TORCH_CUDA_ARCH_LIST"
        assert info["cutlass_version"].count(".") == 2


@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_build_info_names_the_cpu_kernels_in_use(capability):
    """``cpu_kernels`` follows ATEN_CPU_CAPABILITY like torch's own kernels: "default" -> the baseline build,
    "avx2" -> at most AVX2, unset -> the widest the CPU has (and never wider than torch's own choice)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = "import torch, tmd_ext; print(tmd_ext.build_info()['cpu_kernels'], torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ours, torchs = out.stdout.split()
    assert ours in ("baseline", "avx2", "avx512")
    if capability == "default":
        assert ours == "baseline"
    elif capability == "avx2":
        assert ours in ("baseline", "avx2")
    width = {"baseline": 0, "DEFAULT": 0, "avx2": 1, "AVX2": 1, "avx512": 2, "AVX512": 2}
    assert width[ours] <= width.get(torchs, 2), (ours, torchs)


def test_expected_cuda_build():
    """CI sets TMD_EXPECT_CUDA=1 where nvcc exists: the build must then hold CUDA kernels."""
    if os.environ.get("TMD_EXPECT_CUDA") != "1":
        pytest.skip("TMD_EXPECT_CUDA not set")
    assert tmd_ext.build_info()["cuda_compiled"] is True


def test_every_public_op_is_registered():
    ops = tmd_ops()
    for name in tmd_ext.OPS:
        assert f"tmd::{name}" in ops
        assert f"tmd::{name}_backward" in ops
        assert callable(getattr(tmd_ext, name))


@pytest.mark.parametrize("name", tmd_ext.OPS)
def test_every_op_has_wrapper_reference_test_and_bench(name):
    """One name per op: ``tmd_ext/ops/<op>.py``, ``reference.<op>``, ``tests/ops/test_<op>.py``,
    ``bench/bench_<op>.py``."""
    for path in (f"tmd_ext/ops/{name}.py", f"tests/ops/test_{name}.py", f"bench/bench_{name}.py"):
        assert (ROOT / path).is_file(), f"{path} missing"
    assert callable(getattr(tmd_ext.reference, name))
    assert getattr(tmd_ext, name).__module__ == f"tmd_ext.ops.{name}"


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_every_op_has_a_kernel(key):
    """Every schema of the namespace has a CPU kernel, and a CUDA kernel whenever the library was
    compiled with CUDA (so a .cu file silently left out of the build fails here)."""
    if key == "CUDA" and not tmd_ext.build_info()["cuda_compiled"]:
        pytest.skip("CPU-only build")
    ops = tmd_ops()
    assert len(ops) >= 2 * len(tmd_ext.OPS)
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
    assert not missing, f"no {key} kernel for {missing}"


def test_torch_version_mismatch_is_a_clear_import_error():
    code = ("import torch; torch.__version__ = '0.0.1+fake'\n"
            "try:\n    import tmd_ext\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "IMPORTERROR" in out.stdout, out.stdout + out.stderr
    assert "0.0.1+fake" in out.stdout and tmd_ext.build_info()["torch_version"] in out.stdout


def test_one_source_list():
    """csrc/sources.py is the only list: it names every C++/CUDA source under csrc/, and CMakeLists.txt
    takes its sources from it rather than listing files itself."""
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu"))
    assert sorted(cpp_sources() + cuda_sources()) == on_disk
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "csrc/sources.py" in cmake
    assert not any(src in cmake for src in on_disk), "CMakeLists.txt must not list sources itself"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures_from_the_same_list(tmp_path):
    """CMake configures (CPU flavour, fast) and reports the sources it got from csrc/sources.py."""
    out = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DTMD_WITH_CUDA=OFF",
         f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for src in cpp_sources():
        assert src in out.stdout
