"""`python -m adadiff_export calibrate DIR`: sweep exit thresholds, store the curve, pick a default."""
from __future__ import annotations

import argparse
from pathlib import Path

def add_parser(sub) -> None:
    """Register `calibrate`."""
    p = sub.add_parser(
        "calibrate", help="sweep exit thresholds, store the curve, pick the default threshold",
        description="Sweep uncertainty thresholds on a held-out batch with the PyTorch reference early exit "
                    "(mean layers, prediction mse against full depth, FD of sampled images when the classifier "
                    "is available), store the curve in the engines folder's manifest and pick the default "
                    "threshold for a layer budget (--target-layers) or a quality budget (--max-mse).")
    p.add_argument("folder", type=Path, help="engines folder")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the checkpoint the folder was built from (default: the path recorded at build time)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-layers", type=float, default=None,
                        help="layer budget: mean depth at most this fraction of the layers (e.g. 0.6)")
    target.add_argument("--max-mse", type=float, default=None,
                        help="quality budget: prediction mse against full depth at most this")
    p.add_argument("--thresholds", type=float, nargs="+", default=None, help="thresholds to sweep (default: a grid)")
    p.add_argument("--batch", type=int, default=128, help="held-out batch size")
    p.add_argument("--fd-points", type=int, default=3,
                   help="thresholds that also get an FD (spread over the curve, plus the chosen one; 0: no FD)")
    p.add_argument("--fd-samples", type=int, default=100, help="images sampled per FD point")
    p.add_argument("--fd-steps", type=int, default=10, help="dpm++ steps for the FD samples")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from ..export.calibrate import calibrate_folder

    calibrate_folder(a.folder, checkpoint=a.checkpoint, thresholds=a.thresholds, target_layers=a.target_layers,
                     max_mse=a.max_mse, batch=a.batch, fd_points=a.fd_points, fd_samples=a.fd_samples, fd_steps=a.fd_steps)
    return 0
