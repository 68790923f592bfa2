"""pyproject.toml: what `pip install .` declares, against what the package imports and what adadiff_rt links.

The packaging itself (a fresh venv holding only torch, then `pip install .`) takes minutes and the network;
these checks catch the ways it breaks quietly: an import whose distribution nobody declared, torch declared
(pip would then replace a user's CUDA torch), the build's openvino pin drifting from the run time's, a
subpackage or the shipped weights left out of the wheel.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adadiff_export"
# Imported by the package but not dependencies: the package itself, its compiled module, and TensorRT, which
# only a GPU machine has (export/tensorrt_build.py imports it where present).
NOT_DEPENDENCIES = {"adadiff_export", "adadiff_rt", "tensorrt"}
# Imported only by adadiff_export/serve/ (imported lazily, in the serving venv): module -> its distribution in the
# `serve` extra, which `pip install '.[serve]'` brings (scripts/setup.sh installs it into the serving venv).
SERVE_ONLY = {"pytriton": "nvidia-pytriton", "tritonclient": "tritonclient"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string ('Pillow>=10' -> 'pillow')."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pin(requirements, name: str) -> str:
    pins = [r for r in requirements if _name(r) == name]
    assert len(pins) == 1 and "==" in pins[0], f"{name} must be pinned exactly once with ==, got {pins}"
    return pins[0].split("==", 1)[1].strip()


def _imported_top_level_modules(paths=None) -> set:
    found = set()
    for path in paths or PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - NOT_DEPENDENCIES


def test_openvino_is_pinned_alike_for_the_build_and_at_run_time():
    doc = _pyproject()
    build = _pin(doc["build-system"]["requires"], "openvino")
    assert build == _pin(doc["project"]["dependencies"], "openvino")
    try:
        installed = importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("openvino is not installed here")
    # adadiff_rt links against the SDK of the wheel it was built with: the installed one must be that version
    assert installed == build, f"openvino {installed} is installed, pyproject.toml pins {build}"


def test_every_imported_distribution_is_declared_and_torch_is_not():
    declared = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert "torch" not in declared, "declaring torch lets pip replace a user's CUDA torch"
    by_module = importlib.metadata.packages_distributions()
    missing = {}
    for module in _imported_top_level_modules() - set(SERVE_ONLY):
        dists = {d.lower().replace("_", "-") for d in by_module.get(module, [module])}
        if module != "torch" and not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"


def test_the_wheel_holds_every_subpackage_and_the_shipped_weights():
    from setuptools import find_packages

    cfg = _pyproject()["tool"]["setuptools"]
    packages = set(find_packages(str(ROOT), include=cfg["packages"]["find"]["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages == on_disk
    patterns = cfg["package-data"]["adadiff_export"]
    shipped = {p.name for pattern in patterns for p in PACKAGE.glob(pattern)}
    assert {"fashion_small.pt", "fashion_classifier.pt"} <= shipped


def test_serving_imports_stay_in_serve_and_are_in_the_serve_extra():
    outside = [p for p in PACKAGE.rglob("*.py") if "serve" not in p.relative_to(PACKAGE).parts[:1]]
    assert not _imported_top_level_modules(outside) & set(SERVE_ONLY), "only adadiff_export/serve/ may import them"
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(SERVE_ONLY.values()) <= {_name(r) for r in extras["serve"]}
    from adadiff_export.serve.server import PYTRITON_VERSION

    assert _pin(extras["serve"], "nvidia-pytriton") == PYTRITON_VERSION  # whose proxy model serve/server.py patches
    assert "tritonclient" in {_name(r) for r in extras["test"]}  # tests/test_serve.py is its client
