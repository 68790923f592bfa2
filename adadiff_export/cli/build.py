"""`python -m adadiff_export build`: the command-line face of `export.build.build_engines`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .sample import add_final_x0_argument


def add_parser(sub) -> None:
    """Register `build`."""
    p = sub.add_parser(
        "build", help="export a checkpoint to per-layer ONNX segments (+ TensorRT plans) and a manifest",
        description="Export a trained AdaDiff checkpoint to an engines folder a runtime loads without Python: "
                    "stem, layer_1..layer_N (each with its uncertainty module), head and full as ONNX "
                    "(batch 1..MAX_BATCH), checked against PyTorch through onnxruntime; TensorRT plans where "
                    "TensorRT and a GPU exist; manifest.json with sha256 of every file. The folder appears "
                    "only when everything succeeded.")
    p.add_argument("checkpoint", nargs="?", type=Path, default=None,
                   help="checkpoint file (default: the shipped Fashion-MNIST model)")
    p.add_argument("-o", "--out", type=Path, default=Path("engines"), help="engines folder to create (default: engines/)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the engines accept (default 64)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT optimizes for (default min(16, max batch))")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="TensorRT plan precision (ONNX files are always fp32)")
    p.add_argument("--tensorrt", choices=["auto", "on", "off"], default="auto",
                   help="auto: build plans when TensorRT and a GPU are present; on: require them; off: never")
    p.add_argument("--force", action="store_true", help="replace an existing engines folder")
    p.add_argument("--uncertainty-map", action="store_true", help="layers also output the uncertainty map u_map")
    p.add_argument("--calibrate", action="store_true",
                   help="also fit the exit policies to a budget and store them as the folder's defaults (minutes; "
                        "see `calibrate --help`); without it the folder takes the checkpoint's stored defaults")
    add_budget_arguments(p, "with --calibrate: ")
    p.set_defaults(func=_cmd_build)


def add_budget_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The budget and effort flags shared by `calibrate` and `build --calibrate`."""
    from ..calibration.calibrate import DEFAULT_BINS, DEFAULT_SAMPLES

    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-layers", type=float, default=None,
                        help=prefix + "layer budget: mean exit layer at most this fraction of the layers (default 0.5)")
    target.add_argument("--max-shift", type=float, default=None,
                        help=prefix + "quality budget: the fewest layers whose finished samples' feature mean shift "
                             "against full depth stays at most this (see docs/ARCHITECTURE.md)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=prefix + f"held-out samples per calibration run (default {DEFAULT_SAMPLES}; more is slower and "
                        "less noisy)")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS,
                   help=prefix + f"time bins of the schedule and uem-time tables (default {DEFAULT_BINS})")
    add_final_x0_argument(p, prefix + "calibration runs: ")


def budget_options(a: argparse.Namespace) -> dict:
    """The keyword arguments of export.calibrate's fit from the budget flags, checked before any work."""
    if a.samples < 2:
        raise ValueError(f"--samples must be >= 2, got {a.samples}")
    if a.bins < 1:
        raise ValueError(f"--bins must be >= 1, got {a.bins}")
    if a.target_layers is not None and not 0.0 < a.target_layers <= 1.0:
        raise ValueError(f"--target-layers is a fraction of the layers in (0, 1], got {a.target_layers}")
    if a.max_shift is not None and a.max_shift < 0:
        raise ValueError(f"--max-shift must be >= 0, got {a.max_shift}")
    return {"target_layers": a.target_layers, "max_shift": a.max_shift, "samples": a.samples, "bins": a.bins,
            "final_x0": a.final_x0}


def _cmd_build(a: argparse.Namespace) -> int:
    from ..export.build import build_engines

    cal = budget_options(a)
    if not a.calibrate and (a.target_layers is not None or a.max_shift is not None):
        raise ValueError("--target-layers / --max-shift need --calibrate")
    build_engines(a.checkpoint, a.out, max_batch=a.max_batch, precision=a.precision, tensorrt=a.tensorrt,
                  force=a.force, uncertainty_map=a.uncertainty_map, calibrate=a.calibrate,
                  opt_batch=a.opt_batch, calibrate_options=cal)
    return 0
