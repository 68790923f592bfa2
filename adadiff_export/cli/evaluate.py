"""`python -m adadiff_export evaluate`: class accuracy, FD and mean layers at full depth and with early exit."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .sample import add_exit_arguments, check_run_arguments, exit_policy


def _numbers(text: Optional[str], flag: str, kind=float) -> list:
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None


def add_parser(sub) -> None:
    """Register `evaluate`."""
    p = sub.add_parser(
        "evaluate", help="class accuracy, FD and mean layers at full depth and at an exit threshold",
        description="Generate N class-conditional samples at full depth and with early exit (same noise and "
                    "labels), and report the class accuracy given by the shipped Fashion-MNIST classifier, "
                    "FD to the real test set and the mean number of layers. FD is the Frechet distance in "
                    "that classifier's feature space, NOT Inception FID.")
    add_exit_arguments(p)
    p.add_argument("--n", type=int, default=1000, help="samples per setting")
    p.add_argument("--sweep", default=None, metavar="T1,T2,...",
                   help="also measure these thresholds and print the trade-off curve (threshold, layers, accuracy, FD)")
    p.add_argument("--layers", default=None, metavar="L1,L2,...",
                   help="also measure static exit after each of these layers (every sample stops there), the "
                        "baseline a learned exit has to beat")
    p.add_argument("--classifier", type=Path, default=None, help="classifier file (default: the shipped one)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler call")
    p.set_defaults(func=_cmd_evaluate)


def _row(name: str, p, depth: int) -> str:
    saved = 100.0 * (1 - p.mean_layers / depth)
    return (f"{name:>12}  {p.mean_layers:6.2f}  {saved:6.1f}%  {100 * p.accuracy:7.2f}%  {p.fd:9.4f}  "
            f"{p.seconds:7.1f}")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from ..model import checkpoint as ckpt
    from ..quality.metrics import FD_NOTE, load_classifier
    from ..sampling.generate import default_threshold, evaluate

    if a.n < 2:
        raise ValueError(f"--n must be >= 2 (FD needs a covariance), got {a.n}")
    check_run_arguments(a)
    loaded = ckpt.load(a.checkpoint)
    clf = load_classifier(a.classifier)
    policy = exit_policy(a, default_threshold(loaded))
    sweep = _numbers(a.sweep, "--sweep")
    layers = _numbers(a.layers, "--layers", int)
    depth = loaded.model.config.depth
    bad = [k for k in layers if not 1 <= k <= depth]
    if bad:
        raise ValueError(f"--layers must lie in 1..{depth} (this model's depth), got {bad}")
    thresholds = sweep + ([policy.threshold] if policy.threshold not in sweep else [])
    full, points = evaluate(loaded, clf, a.n, thresholds, policy, a.sampler, a.steps, a.guidance, a.seed, a.batch_size,
                            layers=layers)
    by_threshold = sorted((p for p in points if p.layer is None), key=lambda q: q.threshold)
    static = [p for p in points if p.layer is not None]
    exit_point = points[thresholds.index(policy.threshold)]
    print(f"{a.n} samples per setting, {a.sampler}, policy {policy.kind} ({policy.granularity}); {FD_NOTE}")
    print(f"{'threshold':>12}  {'layers':>6}  {'saved':>7}  {'accuracy':>8}  {'FD':>9}  {'seconds':>7}")
    print(_row("full", full, depth))
    for p in by_threshold:
        print(_row(f"{p.threshold:g}", p, depth))
    for p in static:
        print(_row(f"static L{p.layer}", p, depth))
    if a.json:
        rec = {"full": full.as_dict(with_threshold=False), "exit": exit_point.as_dict(),
               "policy": policy.kind, "granularity": policy.granularity, "n": a.n, "sampler": a.sampler,
               "fd_space": "shipped Fashion-MNIST classifier features (not Inception FID)"}
        if sweep:
            rec["sweep"] = [p.as_dict() for p in by_threshold]
        if static:
            rec["static"] = [p.as_dict() for p in static]
        print(json.dumps(rec))
    return 0
