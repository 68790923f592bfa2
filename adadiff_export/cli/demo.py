"""`python -m adadiff_export demo`: the whole toolchain on the shipped checkpoint in a few minutes."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register `demo`."""
    p = sub.add_parser(
        "demo", help="build, verify, sample with adadiff_rt, print speed and quality, write the pictures",
        description="The toolchain end to end on the shipped checkpoint: build the engines (unless a valid build "
                    "is already there), verify them, sample with adadiff_rt at full depth and at the default "
                    "threshold, compare with PyTorch and OpenVINO on the full graph, and write the paper's "
                    "figures as PNGs. Takes a few minutes on a laptop-class CPU.")
    p.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint (default: the shipped one)")
    p.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder (built when missing or stale)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the pictures")
    p.add_argument("--n", type=int, default=128, help="images per setting for FD and accuracy")
    p.add_argument("--threads", type=int, default=0, help="threads for every engine (0: each engine's default)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a: argparse.Namespace) -> int:
    from ..bench.demo import DemoConfig, run_demo

    if a.n < 2:
        raise ValueError(f"--n must be at least 2 (FD needs a covariance), got {a.n}")
    run_demo(DemoConfig(checkpoint=a.checkpoint, engines=a.engines, out=a.out, n=a.n, threads=a.threads))
    return 0
