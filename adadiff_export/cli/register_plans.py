"""`python -m adadiff_export register-plans DIR`: record trtexec-built TensorRT plans in a folder's manifest."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register `register-plans`."""
    p = sub.add_parser(
        "register-plans", help="add TensorRT plans built by the folder's trtexec.sh to its manifest, after checking them",
        description="Check every <segment>.plan in an engines folder with TensorRT on this GPU (it must load, and its "
                    "I/O tensors, dtypes, shapes and optimization profile must match the manifest: adadiff_rt's own "
                    "check) and record them in manifest.json with their sha256, the TensorRT version and the GPU's "
                    "compute capability. Needs TensorRT and a GPU; refuses otherwise and leaves the manifest as it was.")
    p.add_argument("folder", type=Path, help="engines folder holding the plans (e.g. engines/)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="what the plans compute in (default: the precision trtexec.sh was written for)")
    p.set_defaults(func=_cmd_register)


def _cmd_register(a: argparse.Namespace) -> int:
    from ..export.register_plans import register_plans

    register_plans(a.folder, a.precision)
    return 0
