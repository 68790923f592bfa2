"""`python -m adadiff_export build`: the command-line face of `export.build.build_engines`."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--calibrate", action="store_true", help="also sweep exit thresholds and store the curve "
                   "(see `calibrate --help` for the target flags)")
    p.add_argument("--target-layers", type=float, default=None,
                   help="with --calibrate: pick the threshold whose mean depth is at most this fraction of the layers")
    p.add_argument("--max-mse", type=float, default=None,
                   help="with --calibrate: pick the lowest-depth threshold whose prediction mse stays under this")
    p.set_defaults(func=_cmd_build)


def _cmd_build(a: argparse.Namespace) -> int:
    from ..export.build import build_engines

    cal = {}
    if a.target_layers is not None or a.max_mse is not None:
        if not a.calibrate:
            raise ValueError("--target-layers / --max-mse need --calibrate")
        cal = {"target_layers": a.target_layers, "max_mse": a.max_mse}
    build_engines(a.checkpoint, a.out, max_batch=a.max_batch, precision=a.precision, tensorrt=a.tensorrt,
                  force=a.force, uncertainty_map=a.uncertainty_map, calibrate=a.calibrate,
                  opt_batch=a.opt_batch, calibrate_options=cal)
    return 0
