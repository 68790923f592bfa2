"""`python -m adadiff_export calibrate DIR`: sweep exit thresholds, store the curve, pick a default.

On a held-out batch (noised Fashion-MNIST *test* images at uniform random times for a 28x28x1
model, random images otherwise) the PyTorch reference early exit runs at each threshold:
mean exit layer, and the prediction error against full depth (mse of eps). When the metrics
module and its classifier are available, FD of images sampled at each threshold to the real test
set (in the shipped classifier's feature space, not Inception FID) completes each point.

`mean_layers` is measured on that held-out batch (times uniform in [t_eps, 1], the training
distribution); along a sampling trajectory the mix of times differs, so a sampler's mean depth at
the same threshold can differ too (`evaluate`/`bench` measure that).

FD costs a sampling run per point, so only a few points get one (`fd_points`, spread over the
curve, always including the chosen threshold); the others store `fd: null`.

The default threshold is picked for a target: `target_layers` (mean depth at most this fraction of
the layers; the lowest-error point that fits) or `max_mse` (the shallowest point whose error stays
under it). The curve and the pick are written into the folder's manifest (`calibration`,
`exit.threshold`); the engine files are untouched, so their checksums still hold.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from .manifest import CalibrationPoint, Manifest, load, write

BASE_THRESHOLDS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass
class Calibration:
    points: List[CalibrationPoint]
    threshold: float           # the chosen default
    reason: str                # how it was chosen
    fd_note: str = ""


def threshold_grid(u: np.ndarray, extra: Sequence[float] = BASE_THRESHOLDS) -> List[float]:
    """The paper's range plus deciles of the observed uncertainties, so any model gets a useful curve."""
    finite = u[np.isfinite(u)]
    qs = np.quantile(finite, np.linspace(0.1, 0.9, 9)) if finite.size else []
    return sorted({round(float(v), 4) for v in list(extra) + list(qs) if 0.0 <= v <= 1.0})


def pick(points: Sequence[CalibrationPoint], depth: int, target_layers: Optional[float],
         max_mse: Optional[float], current: float) -> tuple:
    """(threshold, reason) for the target; without a target the current default stays."""
    if target_layers is not None and max_mse is not None:
        raise ValueError("give either --target-layers or --max-mse, not both")
    if target_layers is not None:
        if not 0.0 < target_layers <= 1.0:
            raise ValueError(f"--target-layers is a fraction of the layers in (0, 1], got {target_layers}")
        budget = target_layers * depth
        fits = [p for p in points if p.mean_layers <= budget + 1e-9]
        if not fits:
            best = min(points, key=lambda p: (p.mean_layers, p.mse))
            return best.threshold, (f"no threshold reaches {budget:.2f} mean layers; the shallowest point "
                                    f"({best.mean_layers:.2f} layers) was chosen")
        best = min(fits, key=lambda p: (p.mse, p.threshold))
        return best.threshold, f"lowest error within {budget:.2f} mean layers ({target_layers:g} of {depth})"
    if max_mse is not None:
        if max_mse < 0:
            raise ValueError(f"--max-mse must be >= 0, got {max_mse}")
        fits = [p for p in points if p.mse <= max_mse]
        best = min(fits, key=lambda p: (p.mean_layers, -p.threshold))  # threshold 0 (mse 0) always fits
        return best.threshold, f"fewest mean layers with prediction mse <= {max_mse:g}"
    return current, "no target given; the default threshold is unchanged"


def _fd_fn(loaded):
    """A function threshold -> FD, or (None, why) when FD cannot be measured here."""
    c = loaded.model.config
    if (c.img_size, c.in_chans) != (28, 1):
        return None, "FD skipped: the classifier measures 28x28 grayscale images only"
    try:
        from ..quality import metrics
        from ..sampling.generate import generate
        clf = metrics.load_classifier()
    except ImportError as e:
        return None, f"FD skipped: the metrics module is not available ({e})"
    except Exception as e:  # a missing or damaged classifier file
        return None, f"FD skipped: {str(e).splitlines()[0]}"
    return (clf, metrics, generate), ""


def sweep(loaded, manifest: Manifest, thresholds: Optional[Sequence[float]] = None, batch: int = 128,
          seed: int = 1234) -> List[CalibrationPoint]:
    """Mean exit layer and prediction mse against full depth at each threshold, on one held-out batch."""
    from tqdm import tqdm

    from ..sampling.early_exit import ExitPolicy, early_exit
    from .parity import real_inputs

    model = loaded.model
    x, t, y = real_inputs(model, loaded.schedule, batch, seed)
    probe = early_exit(model, x, t, y, ExitPolicy(kind="uem", threshold=0.0))
    grid = list(thresholds) if thresholds else threshold_grid(probe.u[:, :-1].numpy())
    points: List[CalibrationPoint] = []
    for thr in tqdm(grid, desc="calibrate", unit="threshold", leave=False):
        r = early_exit(model, x, t, y, _policy(manifest, thr))
        mse = float(((r.eps.double() - probe.eps.double()) ** 2).mean())
        points.append(CalibrationPoint(float(thr), round(float(r.exit_layer.float().mean()), 4), float(f"{mse:.6g}")))
    return points


def _policy(manifest: Manifest, threshold: float):
    from ..sampling.early_exit import ExitPolicy

    return ExitPolicy(kind="uem", threshold=float(threshold), patience=manifest.exit.patience,
                      granularity=manifest.exit.granularity)


def fd_indices(points: Sequence[CalibrationPoint], chosen: float, count: int) -> List[int]:
    """Which points get an FD: `count` spread evenly over the curve, always full depth and the chosen one."""
    if count <= 0 or not points:
        return []
    spread = np.linspace(0, len(points) - 1, num=min(count, len(points))).round().astype(int)
    chosen_i = min(range(len(points)), key=lambda i: abs(points[i].threshold - chosen))
    return sorted({int(i) for i in spread} | {chosen_i})


def add_fd(loaded, manifest: Manifest, points: List[CalibrationPoint], indices: Sequence[int], samples: int,
           steps: int, seed: int = 1234) -> str:
    """Fill `fd` of the chosen points in place (images sampled at that threshold); returns a note."""
    from tqdm import tqdm

    if not indices:
        return "FD skipped: --fd-points 0"
    if samples < 2:
        raise ValueError(f"--fd-samples must be >= 2 to fit a Gaussian, got {samples}")
    got, why = _fd_fn(loaded)
    if got is None:
        return why
    clf, metrics, generate = got
    for i in tqdm(indices, desc="FD", unit="threshold", leave=False):
        images = generate(loaded, samples, _policy(manifest, points[i].threshold), sampler="dpm++", steps=steps,
                          seed=seed, progress=False).images
        points[i] = replace(points[i], fd=round(metrics.fd_to_test_set(clf, images), 4))
    return (f"FD at {len(indices)} thresholds: {samples} images each, dpm++ {steps} steps, to the Fashion-MNIST "
            "test set in the shipped classifier's feature space (not Inception FID)")


def calibrate_folder(folder: Path, loaded=None, checkpoint: Optional[Path] = None,
                     thresholds: Optional[Sequence[float]] = None, target_layers: Optional[float] = None,
                     max_mse: Optional[float] = None, batch: int = 128, fd_points: int = 3, fd_samples: int = 100,
                     fd_steps: int = 10, log: Callable[[str], None] = print) -> Calibration:
    """Sweep, pick, and rewrite `folder/manifest.json` with the curve and the chosen default threshold."""
    folder = Path(folder)
    manifest = load(folder, check=True)
    if loaded is None:
        from ..model.checkpoint import load as load_checkpoint
        from .verify import source_checkpoint

        ckpt = source_checkpoint(manifest, checkpoint)
        if ckpt is None:
            raise FileNotFoundError("the checkpoint this folder was built from is not at hand; pass --checkpoint")
        loaded = load_checkpoint(ckpt)
    points = sweep(loaded, manifest, thresholds, batch)
    threshold, reason = pick(points, manifest.depth, target_layers, max_mse, manifest.exit.threshold)
    note = add_fd(loaded, manifest, points, fd_indices(points, threshold, fd_points), fd_samples, fd_steps)
    manifest.calibration = points
    manifest.exit = replace(manifest.exit, threshold=float(threshold))
    write(manifest, folder)
    log(format_curve(points, manifest.depth))
    if note:
        log(note)
    log(f"default threshold {threshold:g}: {reason}")
    return Calibration(points, float(threshold), reason, note)


def format_curve(points: Sequence[CalibrationPoint], depth: int) -> str:
    lines = [f"{'threshold':>10s} {'mean layers':>12s} {'of ' + str(depth):>7s} {'mse vs full':>12s} {'FD':>9s}"]
    for p in points:
        fd = f"{p.fd:9.3f}" if p.fd is not None else f"{'-':>9s}"
        lines.append(f"{p.threshold:>10.4g} {p.mean_layers:>12.2f} {p.mean_layers / depth:>7.2f} {p.mse:>12.3e} {fd}")
    return "\n".join(lines)
