"""`python -m adadiff_export calibrate TARGET`: fit the exit policies to a budget and store them."""
from __future__ import annotations

import argparse
from pathlib import Path

from .build import add_budget_arguments, budget_options


def add_parser(sub) -> None:
    """Register `calibrate`."""
    p = sub.add_parser(
        "calibrate", help="fit the exit policies (schedule, uem-time, uem) to a budget and store the best as default",
        description="Fit the exit policies to a layer budget (--target-layers) or a quality budget (--max-shift) on "
                    "held-out samples: each candidate is a whole sampling run, scored by how far the finished "
                    "samples' features move from full depth (mean shift; the quality classifier's features for "
                    "28x28 grayscale models, a frequency descriptor otherwise). Stores the schedule, the uem-time "
                    "table, the uem threshold and the best policy as the default: in an engines folder's "
                    "manifest.json, or in a checkpoint's defaults. Minutes of CPU: a progress line per run.")
    p.add_argument("target", nargs="?", type=Path, default=None,
                   help="an engines folder (its manifest is rewritten) or a checkpoint .pt file (its defaults are "
                        "rewritten, or written to --out); default: the engines/ folder")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="engines folder: the checkpoint it was built from (default: the path recorded at build time)")
    p.add_argument("--out", type=Path, default=None, help="checkpoint target: write the calibrated copy here")
    p.add_argument("--policies", default="schedule,uem-time,uem",
                   help="comma-separated policies to fit (schedule, uem-time, uem, saturation)")
    p.add_argument("--default", default=None, choices=("schedule", "uem-time", "uem", "saturation"),
                   help="the policy stored as the default (one of --policies); without it, the one whose finished "
                        "samples moved least on the calibration set. Use it when a larger evaluation (`tradeoff`) "
                        "ranks the policies otherwise than 128 calibration samples can")
    add_budget_arguments(p)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from ..export.calibrate import calibrate_checkpoint, calibrate_folder

    kw = budget_options(a)
    kw["policies"] = _policies(a.policies)
    if a.default is not None and a.default not in kw["policies"]:
        raise ValueError(f"--default {a.default} is not among --policies {a.policies}")
    kw["default"] = a.default
    target = a.target if a.target is not None else Path("engines")
    if target.is_dir():
        if a.out is not None:
            raise ValueError("--out is for a checkpoint target; an engines folder is rewritten in place")
        calibrate_folder(target, checkpoint=a.checkpoint, log=_log, **kw)
    elif target.suffix == ".pt" or target.is_file():
        if a.checkpoint is not None:
            raise ValueError("--checkpoint is for an engines folder target; a checkpoint target is itself")
        calibrate_checkpoint(target, a.out, log=_log, **kw)
    else:
        raise FileNotFoundError(f"{target} is neither an engines folder nor a checkpoint file")
    return 0


def _policies(text: str) -> tuple:
    known = ("schedule", "uem-time", "uem", "saturation")
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in known]
    if bad or "schedule" not in names:
        raise ValueError(f"--policies takes {', '.join(known)} (schedule is always fitted: uem-time starts from it), "
                         f"got {text!r}")
    return names


def _log(message: str) -> None:
    print(message, flush=True)
