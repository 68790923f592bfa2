"""`python -m adadiff_export tradeoff`: every exit policy at the same layer budgets, fitted on held-out samples
and measured on 1,000 others, with adadiff_rt's wall time; a table and two pictures."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .sample import add_final_x0_argument, final_x0_flag


def add_parser(sub) -> None:
    """Register `tradeoff`."""
    from ..bench.tradeoff import DEFAULT_SAVED
    from ..calibration.calibrate import DEFAULT_SAMPLES

    p = sub.add_parser(
        "tradeoff", help="every exit policy at equal layer budgets: accuracy, FD, layers, adadiff_rt time; table + PNGs",
        description="For each layer budget, fit the schedule, uem-time, the paper's uem and saturation on held-out "
                    "samples (calibrate's method), then measure every policy, static exit around the budgets and "
                    "full depth on the same evaluation samples: class accuracy, FD (the shipped classifier's "
                    "features, not Inception FID), mean layers and the wall time of a 50-step adadiff_rt run. "
                    "Writes tradeoff.md, tradeoff.json, tradeoff_layers.png and tradeoff_time.png. An hour or "
                    "more at the defaults on a 2-core CPU.")
    p.add_argument("checkpoint", nargs="?", type=Path, default=None, help="checkpoint (default: the shipped one)")
    p.add_argument("--saved", default=",".join(f"{s:g}" for s in DEFAULT_SAVED),
                   help="budgets as fractions of the layers saved (default %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="evaluation samples per policy (default 1000)")
    p.add_argument("--cal-samples", type=int, default=DEFAULT_SAMPLES, help="calibration samples per run")
    p.add_argument("--engines", type=Path, default=Path("engines"),
                   help="engines folder for the adadiff_rt timings (built when missing or stale)")
    p.add_argument("--no-time", action="store_true", help="skip the adadiff_rt timings (no engines needed)")
    p.add_argument("--time-batch", type=int, default=8, help="images per timed 50-step run (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per policy (median)")
    p.add_argument("--threads", type=int, default=0, help="OpenVINO threads for the timings (0: its default)")
    p.add_argument("--classifier", type=Path, default=None, help="quality classifier (default: the shipped one)")
    p.add_argument("--out", type=Path, default=Path("tradeoff_out"), help="folder for the table, JSON and PNGs")
    add_final_x0_argument(p, "calibration, evaluation and timing: ", default=None)
    p.add_argument("--retime", action="store_true",
                   help="only time again the rows of OUT/tradeoff.json (same policies and last sampler step, fitted "
                        "and measured before), "
                        "e.g. on a quieter machine, and rewrite the table and pictures")
    p.set_defaults(func=_cmd_tradeoff)


def _cmd_tradeoff(a: argparse.Namespace) -> int:
    from ..bench.contenders import ensure_engines
    from ..bench.tradeoff import budgets_of, load, markdown, retime, run_tradeoff, write
    from ..model import checkpoint as ckpt
    from ..quality.metrics import load_classifier

    try:
        saved = [float(v) for v in a.saved.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--saved takes comma-separated fractions, got {a.saved!r}") from None
    if a.n < 2 or a.cal_samples < 2:
        raise ValueError("--n and --cal-samples must be at least 2 (FD and calibration need a spread)")
    if a.time_batch < 1 or a.repeats < 1:
        raise ValueError("--time-batch and --repeats must be at least 1")
    if a.retime and a.no_time:
        raise ValueError("--retime times the rows again; it cannot go with --no-time")
    previous = a.out / "tradeoff.json"
    if a.retime and not previous.is_file():
        raise FileNotFoundError(f"--retime needs {previous} from an earlier tradeoff run")
    res = load(previous) if a.retime else None
    if res is not None and a.final_x0 is not None and a.final_x0 != res.final_x0:
        raise ValueError(f"--retime times the runs {previous} holds, which were measured with "
                         f"{final_x0_flag(res.final_x0)}: drop {final_x0_flag(a.final_x0)}, or run without --retime "
                         f"to measure them again")
    final_x0 = True if a.final_x0 is None else a.final_x0
    loaded = ckpt.load(a.checkpoint)
    depth = loaded.model.depth
    budgets_of(depth, saved)  # refuse bad budgets before any work
    clf = None if a.retime else load_classifier(a.classifier)
    a.out.mkdir(parents=True, exist_ok=True)
    engines = None
    if not a.no_time:
        path = a.checkpoint if a.checkpoint is not None else ckpt.SHIPPED_CHECKPOINT
        engines = ensure_engines(Path(path), a.engines, max_batch=a.time_batch, build_max_batch=64)
    if res is not None:
        retime(res, loaded, engines, a.time_batch, a.repeats, a.threads)
    else:
        res = run_tradeoff(loaded, engines, clf, saved, a.n, a.cal_samples, a.time_batch, a.repeats, a.threads,
                           final_x0, log=lambda m: print(m, flush=True))
    command = "python -m adadiff_export " + " ".join(shlex.quote(v) for v in sys.argv[1:])
    paths = write(res, a.out, depth, command)
    print(markdown(res, depth, command))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
