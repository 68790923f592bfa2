"""`python -m adadiff_export profile DIR`: per-segment latency and the cost of exiting after each layer."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..export.profile import ENGINES

def add_parser(sub) -> None:
    """Register `profile`."""
    p = sub.add_parser(
        "profile", help="per-segment latency and the cost of exiting after each layer",
        description="Time every segment of an engines folder through OpenVINO (CPU, f32) and onnxruntime at "
                    "batch 1 and max_batch (trtexec per plan where TensorRT exists), and print the cumulative "
                    "cost of exiting after each layer: the cost model behind every speed claim.")
    p.add_argument("folder", type=Path, help="engines folder")
    p.add_argument("--engine", choices=["all", *ENGINES], default="all", help="which CPU engine(s) to time")
    p.add_argument("--batch", type=int, action="append", help="batch size to time (repeatable; default 1 and max_batch)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per segment (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: the engine's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(a: argparse.Namespace) -> int:
    from ..export.manifest import load
    from ..export.profile import format_table, profile_folder

    engines = ENGINES if a.engine == "all" else (a.engine,)
    result = profile_folder(a.folder, engines, a.batch, a.warmup, a.iters, a.threads)
    depth = load(a.folder, check=False).depth
    print(format_table(result, depth))
    if a.json is not None:
        a.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0
