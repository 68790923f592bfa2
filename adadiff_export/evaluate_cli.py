"""`python -m adadiff_export evaluate`: class accuracy, FD and mean layers at full depth and with early exit."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from .sample_cli import add_exit_arguments, exit_policy


def _thresholds(text: Optional[str]) -> List[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated numbers, got {text!r}") from None


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
    p.add_argument("--classifier", type=Path, default=None, help="classifier file (default: the shipped one)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler call")
    p.set_defaults(func=_cmd_evaluate)


def _row(name: str, p, depth: int) -> str:
    saved = 100.0 * (1 - p.mean_layers / depth)
    return (f"{name:>12}  {p.mean_layers:6.2f}  {saved:6.1f}%  {100 * p.accuracy:7.2f}%  {p.fd:9.4f}  "
            f"{p.seconds:7.1f}")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .generate import default_threshold, evaluate
    from .metrics import FD_NOTE, load_classifier

    if a.n < 2:
        raise ValueError(f"--n must be >= 2 (FD needs a covariance), got {a.n}")
    loaded = ckpt.load(a.checkpoint)
    clf = load_classifier(a.classifier)
    policy = exit_policy(a, default_threshold(loaded))
    sweep = _thresholds(a.sweep)
    thresholds = sweep + ([policy.threshold] if policy.threshold not in sweep else [])
    full, points = evaluate(loaded, clf, a.n, thresholds, policy, a.sampler, a.steps, a.guidance, a.seed, a.batch_size)
    depth = loaded.model.config.depth
    exit_point = points[thresholds.index(policy.threshold)]
    print(f"{a.n} samples per setting, {a.sampler}, policy {policy.kind} ({policy.granularity}); {FD_NOTE}")
    print(f"{'threshold':>12}  {'layers':>6}  {'saved':>7}  {'accuracy':>8}  {'FD':>9}  {'seconds':>7}")
    print(_row("full", full, depth))
    for p in sorted(points, key=lambda q: q.threshold):
        print(_row(f"{p.threshold:g}", p, depth))
    if a.json:
        rec = {"full": full.as_dict(with_threshold=False), "exit": exit_point.as_dict(),
               "policy": policy.kind, "granularity": policy.granularity, "n": a.n, "sampler": a.sampler,
               "fd_space": "shipped Fashion-MNIST classifier features (not Inception FID)"}
        if sweep:
            rec["sweep"] = [p.as_dict() for p in sorted(points, key=lambda q: q.threshold)]
        print(json.dumps(rec))
    return 0
