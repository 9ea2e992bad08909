"""Packaging: the build backend's environment-dependent requirements (the torch pin seen through pip's build
isolation, CUTLASS only for a CUDA build), the source distribution's contents, the wheel's package files, and
(opt-in, ``TMD_TEST_WHEEL``) a wheel installed into a fresh venv without a CUDA toolkit."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from support.run import ROOT

sys.path.insert(0, str(Path(ROOT) / "build_backend"))
import tmd_build_backend as backend  # noqa: E402

sys.path.pop(0)

TORCH_DIST_VERSION = importlib.metadata.version("torch")
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".whl", "build", "dist", "runs", "__pycache__", "*.egg-info",
                                     "*.so", ".pytest_cache", ".ruff_cache", "_build_meta.py", "*.log")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("TMD_FORCE_CPU", "TMD_BUILD_TORCH"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def fake_target(monkeypatch, version, cuda, toolkit):
    monkeypatch.setattr(backend, "target_torch", lambda executable=None: {"version": version, "cuda": cuda})
    monkeypatch.setattr(backend, "_cuda_home", lambda: "/opt/cuda" if toolkit else None)


@pytest.mark.parametrize(("version", "cuda", "toolkit", "force_cpu", "expected"), [
    ("2.14.1", "13.0", True, None, ["torch==2.14.1", backend.CUTLASS_REQUIREMENT]),  # CUDA build
    ("2.14.1", "13.0", False, None, ["torch==2.14.1"]),  # CUDA torch, no toolkit: CPU ops
    ("2.14.1", "13.0", True, "1", ["torch==2.14.1"]),  # TMD_FORCE_CPU=1
    ("2.13.0+cpu", None, True, None, ["torch==2.13.0+cpu"]),  # CPU torch keeps its local label
    (None, None, True, None, [backend.TORCH_FALLBACK, backend.CUTLASS_REQUIREMENT]),  # no torch: pip's pick
    (None, None, False, None, [backend.TORCH_FALLBACK]),
])
def test_requirements_follow_the_target_environment(clean_env, capsys, version, cuda, toolkit, force_cpu, expected):
    fake_target(clean_env, version, cuda, toolkit)
    if force_cpu:
        clean_env.setenv("TMD_FORCE_CPU", force_cpu)
    assert backend.extra_requirements() == expected
    err = capsys.readouterr().err
    if version is None:
        assert "no torch is installed" in err and "TMD_BUILD_TORCH" in err
    if cuda and not toolkit and not force_cpu:
        assert "no CUDA toolkit" in err and "CPU ops only" in err


def test_explicit_torch_requirement_wins(clean_env):
    fake_target(clean_env, "2.14.1", "13.0", True)
    clean_env.setenv("TMD_BUILD_TORCH", "torch==2.12.0")
    assert backend.extra_requirements() == ["torch==2.12.0", backend.CUTLASS_REQUIREMENT]


def test_wheel_and_editable_hooks_add_the_pins_to_setuptools(clean_env):
    fake_target(clean_env, "2.14.1", None, False)
    clean_env.setattr(backend._setuptools, "get_requires_for_build_wheel", lambda cs=None: ["from-setuptools"])
    clean_env.setattr(backend._setuptools, "get_requires_for_build_editable", lambda cs=None: ["from-setuptools-e"])
    assert backend.get_requires_for_build_wheel() == ["from-setuptools", "torch==2.14.1"]
    assert backend.get_requires_for_build_editable() == ["from-setuptools-e", "torch==2.14.1"]
    assert backend.build_wheel is backend._setuptools.build_wheel  # every other hook is setuptools'
    assert backend.build_sdist is backend._setuptools.build_sdist


def test_probe_sees_the_environment_behind_pips_isolation(tmp_path):
    """pip (build isolation "virtual") runs the hooks with the target interpreter, PYTHONNOUSERSITE=1 and a
    PYTHONPATH whose sitecustomize drops the site-packages; the probe must still find the installed torch."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import site, sys
        hidden = set(site.getsitepackages())
        sys.path[:] = [p for p in sys.path if p not in hidden]
    """))
    env = {"PYTHONPATH": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    assert subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}).returncode == 0  # hidden
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            mp.setenv(k, v)
        found = backend.target_torch(sys.executable)
    finally:
        mp.undo()
    import torch

    assert found == {"version": TORCH_DIST_VERSION, "cuda": torch.version.cuda}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The working tree without build products, plus stale ones that must never be packed."""
    dst = tmp_path_factory.mktemp("src") / "tmd"
    shutil.copytree(ROOT, dst, ignore=COPY_IGNORE)
    (dst / "tmd_ext" / "_build_meta.py").write_text("TORCH_VERSION = 'stale'\n")
    (dst / "tmd_ext" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"stale")
    # A sitecustomize that makes `import torch` fail: metadata and the sdist must not need torch.
    (dst.parent / "notorch").mkdir()
    (dst.parent / "notorch" / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    return dst


def run_hook(src: Path, call: str, *args: str) -> str:
    """Call a hook of the in-tree backend the way a build frontend does, with torch not importable."""
    code = (f"import json, sys; sys.path.insert(0, 'build_backend'); import tmd_build_backend as b; "
            f"print('RESULT=' + json.dumps(b.{call}(*sys.argv[1:])))")
    env = {**os.environ, "PYTHONPATH": str(src.parent / "notorch")}
    env.pop("TMD_FORCE_CPU", None)
    env.pop("TMD_BUILD_TORCH", None)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=src, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")][-1][len("RESULT="):])


def test_get_requires_runs_without_torch_and_pins_the_installed_one(source_copy):
    reqs = run_hook(source_copy, "get_requires_for_build_wheel")
    assert f"torch=={TORCH_DIST_VERSION}" in reqs
    assert not [r for r in reqs if r.startswith("torch") and r != f"torch=={TORCH_DIST_VERSION}"]


def expected_sdist_files(src: Path) -> set[str]:
    """Everything a build and the installed package need, found in the tree (not from MANIFEST.in)."""
    want = {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "MANIFEST.in"}
    for pattern in ("csrc/**/*", "build_backend/*.py", "tmd_ext/**/*.py", "tmd_train/**/*.py",
                    "tmd_train/toy/assets/**/*", "configs/*.yaml", "docs/*.md"):
        want |= {p.relative_to(src).as_posix() for p in src.glob(pattern) if p.is_file()}
    want -= {"tmd_ext/_build_meta.py"} | {w for w in want if w.endswith(".so")}
    return want


def test_sdist_holds_everything_a_build_needs(source_copy, tmp_path):
    name = run_hook(source_copy, "build_sdist", str(tmp_path))
    with tarfile.open(tmp_path / name) as tar:
        top = name.removesuffix(".tar.gz")
        files = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}
    want = expected_sdist_files(source_copy)
    assert {"csrc/sources.py", "build_backend/tmd_build_backend.py",
            "tmd_train/toy/assets/toy_teacher/diffusion_pytorch_model.safetensors",
            "tmd_train/toy/assets/toy_teacher/config.json", "tmd_train/toy/assets/evaluator.safetensors"} <= want
    assert any(w.endswith(".cu") for w in want) and any(w.endswith(".cuh") for w in want)
    missing = sorted(want - files)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in / package-data)"
    assert not [f for f in files if f.endswith(".so") or f.endswith("_build_meta.py")], "build products packed"


def test_wheel_package_files(source_copy, tmp_path):
    """What `build_py` puts into a wheel beside the compiled library: every module, the toy assets and the
    build record; run without compiling (TMD_FORCE_CPU=1 keeps the configure step off nvcc)."""
    env = {**os.environ, "TMD_FORCE_CPU": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                          cwd=source_copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    want = {p.relative_to(source_copy).as_posix() for pat in ("tmd_ext/**/*.py", "tmd_train/**/*.py")
            for p in source_copy.glob(pat)}
    want |= {p.relative_to(source_copy).as_posix() for p in (source_copy / "tmd_train/toy/assets").rglob("*")
             if p.is_file() and p.suffix in (".safetensors", ".json", ".md")}
    assert sorted(want - files) == []
    meta = (tmp_path / "tmd_ext" / "_build_meta.py").read_text()
    import torch

    assert f"TORCH_VERSION = {torch.__version__!r}" in meta and "CUDA_COMPILED = False" in meta
    assert not [f for f in files if f.endswith(".so")]


def _wheel_for_test(tmp_path: Path) -> Path:
    spec = os.environ.get("TMD_TEST_WHEEL", "")
    if spec and spec != "build":
        return Path(spec)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    env = {**os.environ, "TMD_FORCE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "-w", str(tmp_path / "dist"), "--no-deps",
                           "--no-build-isolation"], cwd=src, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return next((tmp_path / "dist").glob("tmd-*.whl"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TMD_TEST_WHEEL"),
                    reason="opt-in: TMD_TEST_WHEEL=<a tmd wheel> or TMD_TEST_WHEEL=build (a CPU-only wheel, minutes)")
def test_wheel_installs_and_imports_without_a_toolkit(tmp_path):
    """The wheel goes into a fresh venv that sees this environment's torch through a .pth file, and imports
    with no nvcc on PATH and no CUDA_HOME: build_info() tells what was compiled."""
    wheel = _wheel_for_test(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    torch_site = Path(importlib.metadata.distribution("torch").locate_file(""))
    (site_dir / "outer_torch.pth").write_text(f"{torch_site}\n")  # after the venv's own packages
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    check = textwrap.dedent("""
        import json, shutil, torch, tmd_ext, tmd_train.toy.assets as assets, pathlib
        assert shutil.which("nvcc") is None
        info = tmd_ext.build_info()
        x = torch.randn(2, 3, 8, dtype=torch.float64)
        s, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
        torch.testing.assert_close(tmd_ext.adaln_modulate(x, s, b), tmd_ext.reference.adaln_modulate(x, s, b))
        folder = pathlib.Path(assets.__file__).parent
        print("RESULT=" + json.dumps({"info": info, "file": tmd_ext.__file__,
                                      "teacher": (folder / "toy_teacher" / "config.json").is_file()}))
    """)
    proc = subprocess.run([str(vpy), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")][-1][len("RESULT="):])
    assert out["file"].startswith(str(venv)) and out["teacher"]
    import torch

    assert out["info"]["torch_version"] == torch.__version__
    archs = os.environ.get("TMD_TEST_WHEEL_ARCHS")  # the TORCH_CUDA_ARCH_LIST the given wheel was built for
    if archs is not None:
        assert out["info"]["cuda_compiled"] and out["info"]["cuda_archs"] == archs
    elif os.environ.get("TMD_TEST_WHEEL") == "build":
        assert not out["info"]["cuda_compiled"] and out["info"]["cuda_archs"] == ""
