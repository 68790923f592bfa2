"""`python -m adadiff_export evaluate`: class accuracy, FD and mean layers at full depth and with early exit."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .sample import add_exit_arguments, check_run_arguments, exit_policy, run_guidance, say_detected


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
                    "that classifier's feature space, NOT Inception FID. Models of another image shape need a "
                    "classifier trained on their data (`classifier --data`, then --classifier); unconditional "
                    "models get FD only. Both are checked before any sampling.")
    add_exit_arguments(p)
    p.add_argument("--n", type=int, default=1000, help="samples per setting")
    p.add_argument("--sweep", default=None, metavar="T1,T2,...",
                   help="also measure these thresholds and print the trade-off curve (threshold, layers, accuracy, FD)")
    p.add_argument("--layers", default=None, metavar="L1,L2,...",
                   help="also measure static exit after each of these layers (every sample stops there), the "
                        "baseline a learned exit has to beat")
    p.add_argument("--classifier", type=Path, default=None,
                   help="classifier file (default: the shipped 28x28 grayscale Fashion-MNIST one; train one for other "
                        "data with `python -m adadiff_export classifier --data ...`)")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler call")
    p.set_defaults(func=_cmd_evaluate)


def _row(name: str, p, depth: int) -> str:
    saved = 100.0 * (1 - p.mean_layers / depth)
    acc = "n/a" if p.accuracy != p.accuracy else f"{100 * p.accuracy:7.2f}%"
    return (f"{name:>14}  {p.mean_layers:6.2f}  {saved:6.1f}%  {acc:>8}  {p.fd:9.4f}  "
            f"{p.seconds:7.1f}")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from ..model import checkpoint as ckpt
    from ..quality.metrics import fd_note, load_classifier, measurable
    from ..sampling.generate import THRESHOLD_POLICIES, evaluate, exit_defaults

    if a.n < 2:
        raise ValueError(f"--n must be >= 2 (FD needs a covariance), got {a.n}")
    check_run_arguments(a)
    loaded = ckpt.load(a.checkpoint)
    say_detected(loaded)
    clf = load_classifier(a.classifier)
    c = loaded.model.config
    no_accuracy = measurable(clf, c.img_size, c.in_chans, c.num_classes)  # before any sampling
    if no_accuracy:
        print(f"accuracy n/a: {no_accuracy}")
    guidance = run_guidance(a.guidance, exit_defaults(loaded).guidance, c.num_classes)
    policy = exit_policy(a, exit_defaults(loaded))
    sweep = _numbers(a.sweep, "--sweep")
    layers = _numbers(a.layers, "--layers", int)
    depth = loaded.model.config.depth
    bad = [k for k in layers if not 1 <= k <= depth]
    if bad:
        raise ValueError(f"--layers must lie in 1..{depth} (this model's depth), got {bad}")
    from dataclasses import replace

    from ..sampling.early_exit import ExitPolicy

    if sweep and policy.kind not in THRESHOLD_POLICIES:
        raise ValueError(f"--sweep varies the threshold of --policy {', '.join(THRESHOLD_POLICIES)}, not {policy.kind}")
    policies = [policy] + [replace(policy, threshold=t) for t in sweep if t != policy.threshold]
    policies += [ExitPolicy("static", layer=k) for k in layers]
    full, points = evaluate(loaded, clf, a.n, policies, a.sampler, a.steps, guidance, a.seed, a.batch_size,
                            final_x0=a.final_x0, accuracy=no_accuracy is None)
    print(f"{a.n} samples per setting, {a.sampler}; {fd_note(clf)}")
    print(f"{'policy':>14}  {'layers':>6}  {'saved':>7}  {'accuracy':>8}  {'FD':>9}  {'seconds':>7}")
    for p in [full] + points:
        print(_row(p.name, p, depth))
    if a.json:
        rec = {"full": full.as_dict(), "exit": points[0].as_dict(), "granularity": policy.granularity, "n": a.n,
               "sampler": a.sampler, "fd_space": f"features of classifier {clf.path.name} (not Inception FID)"}
        if sweep:
            swept = [p for p in points if p.policy.kind == policy.kind]
            rec["sweep"] = [p.as_dict() for p in sorted(swept, key=lambda q: q.policy.threshold)]
        if layers:
            rec["static"] = [p.as_dict() for p in points[len(points) - len(layers):]]
        print(json.dumps(rec))
    return 0
