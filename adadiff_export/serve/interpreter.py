"""Which Python serves: PyTriton's backend stub must load this interpreter's own libpython.

Triton's Python backend runs each model instance in `triton_python_backend_stub`, a binary that PyTriton ships
per Python minor version and that links `libpython3.X.so` from the system's library path. The stub then runs
with the interpreter's standard library; when that is another patch release than the libpython it loaded (a
separately built Python, such as pyenv's 3.11.7 beside Debian's 3.11.2), it fails at start, e.g. with
`'_thread.RLock' object has no attribute '_recursion_count'`. So serving runs in a venv made from the system's
own python3 (`scripts/setup.sh` makes it: `serve_venv()`), and `serve` / `loadtest` started from another Python
run themselves again there (`reexec`).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

from ..errors import UserError

VENV_VARIABLE = "ADADIFF_SERVE_VENV"
REEXEC_VARIABLE = "ADADIFF_SERVE_REEXEC"   # set in the re-executed process, so that it never re-executes again


class ServingPythonError(UserError):
    """No Python here can host the server (or run the load test's client)."""


def serve_venv() -> Path:
    """The serving venv: $ADADIFF_SERVE_VENV, else ~/.cache/adadiff/serve-venv (where scripts/setup.sh puts it)."""
    return Path(os.environ.get(VENV_VARIABLE) or Path.home() / ".cache" / "adadiff" / "serve-venv")


def venv_python() -> Optional[Path]:
    """The serving venv's interpreter, or None when the venv does not exist."""
    python = serve_venv() / "bin" / "python"
    return python if python.is_file() else None


def stub_libpython(stub: Path) -> Optional[Path]:
    """The libpython the dynamic loader gives `stub` (from `ldd`), or None when that cannot be told."""
    if shutil.which("ldd") is None:
        return None
    out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, check=False).stdout
    m = re.search(r"libpython[\d.]+\.so[\d.]*\s*=>\s*(\S+)", out)
    return Path(m.group(1)) if m and m.group(1) != "not" else None


def pytriton_problem() -> Optional[str]:
    """None when PyTriton can serve from this interpreter, else why it cannot."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return f"nvidia-pytriton is not installed in this Python ({sys.executable})"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = Path(spec.origin).parent / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        return f"nvidia-pytriton has no backend stub for Python {version}"
    lib = stub_libpython(stub)
    own = sysconfig.get_config_var("LIBDIR")
    if lib is not None and own and lib.resolve().parent != Path(own).resolve():
        return (f"PyTriton's backend stub would load {lib}, not this Python's own libpython ({sys.version.split()[0]}, "
                f"{own}): their standard libraries differ and the stub fails at start")
    return None


def source_root() -> Optional[Path]:
    """The folder holding this adadiff_export when it runs from a source tree (not from an installed package)."""
    root = Path(__file__).resolve().parents[2]
    return None if root.name in ("site-packages", "dist-packages") else root


def reexec(argv: List[str], why: str) -> None:
    """Run `python -m adadiff_export ARGV` again in the serving venv (replacing this process, so that signals
    sent to it reach the server). The same adadiff_export runs there: a source tree's is put first on PYTHONPATH.
    Raises ServingPythonError (saying what to do) when the venv is missing or this already is the re-executed process."""
    python = venv_python()
    if os.environ.get(REEXEC_VARIABLE) == "1" or python is None:
        hint = ("it is missing: run `bash scripts/setup.sh` (or make a venv from the system's python3 and "
                f"`pip install '.[serve]'` into it), or point {VENV_VARIABLE} at one" if python is None else
                "it cannot serve either")
        raise ServingPythonError(f"{why}; serving runs in the venv {serve_venv()}, and {hint}")
    env = dict(os.environ, **{REEXEC_VARIABLE: "1"})
    root = source_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    print(f"{why}: running in {python}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(str(python), [str(python), "-m", "adadiff_export", *argv], env)
