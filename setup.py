"""Build the `adadiff_rt` C++ module for the `adadiff` package (metadata and dependencies: pyproject.toml).

setup.py drives CMake (the pybind11 cmake_example pattern). `pip install .` builds in an isolated
environment holding the build requirements of pyproject.toml, the pinned openvino wheel among them
(the OpenVINO engine is found through that wheel's own CMake config). Environment knobs:
  CMAKE_ARGS           extra CMake arguments, e.g. "-DADADIFF_SANITIZE=ON -DADADIFF_TENSORRT=OFF"
  ADADIFF_SANITIZE=1   shorthand for -DADADIFF_SANITIZE=ON (ASan + UBSan build)
  ADADIFF_BUILD_JOBS   parallel compile jobs (default: the CPU count)
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CMAKE_MIN = (3, 18)  # cmake_minimum_required of CMakeLists.txt


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


def _openvino_cmake_dir() -> str | None:
    spec = importlib.util.find_spec("openvino")
    if spec is None or not spec.submodule_search_locations:
        return None
    cmake_dir = Path(list(spec.submodule_search_locations)[0]) / "cmake"
    return str(cmake_dir) if (cmake_dir / "OpenVINOConfig.cmake").exists() else None


def _pybind11_cmake_dir() -> str | None:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_cmake_dir()


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        assert isinstance(ext, CMakeExtension)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = "Debug" if self.debug else os.environ.get("CMAKE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        if (pb := _pybind11_cmake_dir()):
            args.append(f"-Dpybind11_DIR={pb}")
        if (ov := _openvino_cmake_dir()):
            args.append(f"-DOpenVINO_DIR={ov}")
        if os.environ.get("ADADIFF_SANITIZE", "").lower() in ("1", "on", "true", "yes"):
            args.append("-DADADIFF_SANITIZE=ON")
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        if not any(a.startswith("-G") for a in args) and _has("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("ADADIFF_BUILD_JOBS") or str(os.cpu_count() or 2)
        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.source_dir, *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


def _has(tool: str) -> bool:
    return shutil.which(tool) is not None


def cmake_build_requires() -> List[str]:
    """[] when the system's CMake is recent enough, else the `cmake` wheel (setuptools hands this list to pip
    as extra build requirements, so a machine without CMake still builds)."""
    exe = shutil.which("cmake")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"(\d+)\.(\d+)", out)
        if m and (int(m.group(1)), int(m.group(2))) >= CMAKE_MIN:
            return []
    return [f"cmake>={CMAKE_MIN[0]}.{CMAKE_MIN[1]}"]


setup(
    ext_modules=[CMakeExtension("adadiff_rt", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    setup_requires=cmake_build_requires(),
)
