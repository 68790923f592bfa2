"""`python -m adadiff_export verify DIR`: is this engines folder intact and does it compute the model?"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register `verify`."""
    p = sub.add_parser(
        "verify", help="check an engines folder: manifest, checksums, ONNX files, parity",
        description="Check an engines folder written by `build`: manifest schema and version, plain file names "
                    "inside the folder, sha256 of every file (a changed or truncated file is named), the ONNX "
                    "checker, and a parity re-run through onnxruntime (against PyTorch too when the source "
                    "checkpoint is at hand). Exit status 0 when everything holds, 2 otherwise.")
    p.add_argument("folder", type=Path, help="engines folder (e.g. engines/)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the checkpoint the folder was built from (default: the path recorded at build time)")
    p.add_argument("--no-parity", action="store_true", help="skip the onnxruntime parity re-run")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(a: argparse.Namespace) -> int:
    from ..export.verify import verify

    verify(a.folder, a.checkpoint, parity=not a.no_parity)
    print(f"{a.folder}: OK")
    return 0
