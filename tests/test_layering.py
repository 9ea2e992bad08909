"""Layering of the packages: the Python side of the ops never imports the method package; the models
import nothing above them (no samplers, objectives or trainers; only the leaf module
``tmd_train.errors``, which imports nothing of the package); the engine never imports a method or
an entry point; methods never import the entry points; and no module imports another module's
private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.run import ROOT

PACKAGE = ROOT / "tmd_train"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``: ``from module import names`` (relative imports
    resolved against the file's package) and ``import module`` (no names)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.append((base, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
    return out


def modules(path: Path) -> set[str]:
    """Every module ``path`` imports, with ``from a import b`` counted as ``a`` and ``a.b``."""
    return {m for module, names in imports(path) for m in (module, *(f"{module}.{n}" for n in names))}


def py_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", py_files(ROOT / "tmd_ext"), ids=ids)
def test_ops_do_not_import_tmd_train(path):
    assert not any(m.split(".")[0] == "tmd_train" for m in modules(path)), path


@pytest.mark.parametrize("path", py_files(PACKAGE / "models"), ids=ids)
def test_models_import_only_downward(path):
    upward = sorted(m for m in modules(path) if m.startswith("tmd_train.")
                    and not m.startswith(("tmd_train.models", "tmd_train.errors")))
    assert not upward, f"{path.name} imports {upward}"


@pytest.mark.parametrize("path", py_files(PACKAGE / "engine"), ids=ids)
def test_engine_does_not_import_methods(path):
    upward = sorted(m for m in modules(path) if m.startswith(("tmd_train.methods", "tmd_train.stage")))
    assert not upward, f"{path.name} imports {upward}"


@pytest.mark.parametrize("path", py_files(PACKAGE / "methods"), ids=ids)
def test_methods_do_not_import_entry_points(path):
    upward = sorted(m for m in modules(path) if m.startswith("tmd_train.stage"))
    assert not upward, f"{path.name} imports {upward}"


def test_no_private_imports():
    """No ``from module import _name`` anywhere in tmd_train or tmd_ext (tmd_ext's own package may load
    its build artefacts ``_C`` and ``_build_meta``)."""
    own_build = {("tmd_ext", "_C"), ("tmd_ext", "_build_meta")}
    bad = [f"{path.relative_to(ROOT)}: from {module} import {name}"
           for path in py_files(PACKAGE) + py_files(ROOT / "tmd_ext") for module, names in imports(path)
           for name in names
           if name.startswith("_") and not name.startswith("__") and (module, name) not in own_build]
    assert not bad, "\n".join(bad)


def test_errors_is_a_leaf():
    assert not any(m.split(".")[0] == "tmd_train" for m in modules(PACKAGE / "errors.py"))


def test_student_has_no_sampler():
    from tmd_train.models import TMDStudent

    assert not hasattr(TMDStudent, "sample")
