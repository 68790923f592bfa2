"""`calibrate`: fit the exit policies to a layer or quality budget and store them where they are used.

The fitting itself is `calibration.calibrate_exits` (finished samples, scored against full depth).
This module decides the budget and writes the result: into an engines folder's manifest
(`exit` and `calibration`; the engine files are untouched, so their checksums still hold) or into
a checkpoint's `defaults` (what `sample` and `evaluate` use, and what `build` copies into a new
folder's manifest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..calibration.calibrate import DEFAULT_BINS, DEFAULT_SAMPLES, CalibrationReport, calibrate_exits, format_report
from ..model.checkpoint import Loaded
from ..sampling.generate import exit_defaults
from .manifest import CalibrationPoint, load, write

DEFAULT_TARGET = 0.5  # a fraction of the layers: half the depth when no budget is given
POLICIES = ("schedule", "uem-time", "uem")


def budget_layers(depth: int, target_layers: float) -> float:
    """The mean-layers budget of `--target-layers` (a fraction of the depth in (0, 1])."""
    if not 0.0 < target_layers <= 1.0:
        raise ValueError(f"--target-layers is a fraction of the layers in (0, 1], got {target_layers}")
    return max(1.0, round(target_layers * depth, 2))


def fit(loaded: Loaded, target_layers: Optional[float] = None, max_shift: Optional[float] = None,
        samples: int = DEFAULT_SAMPLES, bins: int = DEFAULT_BINS, policies: Sequence[str] = POLICIES,
        guidance: Optional[float] = None, final_x0: bool = True,
        log: Callable[[str], None] = print) -> CalibrationReport:
    """Fit for a layer budget, or find the smallest budget whose best policy keeps J <= `max_shift`."""
    if target_layers is not None and max_shift is not None:
        raise ValueError("give either --target-layers or --max-shift, not both")
    depth = loaded.model.depth
    w = exit_defaults(loaded).guidance if guidance is None else guidance
    kw = dict(samples=samples, guidance=w, bins=bins, policies=policies, final_x0=final_x0, progress=log)
    if max_shift is None:
        budget = budget_layers(depth, DEFAULT_TARGET if target_layers is None else target_layers)
        return calibrate_exits(loaded, [budget], **kw)
    if max_shift < 0:
        raise ValueError(f"--max-shift must be >= 0, got {max_shift}")
    lo, hi, best = 1.0, float(depth), None
    while hi - lo > 0.5:
        mid = round(0.5 * (lo + hi), 1)
        report = calibrate_exits(loaded, [mid], **kw)
        if report.budgets[0].best.j <= max_shift:
            hi, best = mid, report
        else:
            lo = mid
    return best if best is not None else calibrate_exits(loaded, [float(depth)], **kw)


def curve(report: CalibrationReport) -> List[CalibrationPoint]:
    """The manifest's `calibration` entries: every fitted policy at every budget."""
    return [CalibrationPoint(policy=kind, budget=b.budget, mean_layers=round(f.mean_layers, 4), shift=float(f"{f.j:.6g}"),
                             threshold=f.policy.threshold if kind in ("uem", "saturation") else None,
                             final_x0=report.final_x0)
            for b in report.budgets for kind, f in b.fits.items()]


def calibrate_folder(folder: Path, loaded: Optional[Loaded] = None, checkpoint: Optional[Path] = None,
                     log: Callable[[str], None] = print, default: Optional[str] = None, **kw) -> CalibrationReport:
    """Fit and rewrite `folder/manifest.json`: the fitted tables, the best policy (or `default`) as the default,
    the curve."""
    folder = Path(folder)
    manifest = load(folder, check=True)
    if loaded is None:
        from ..model.checkpoint import load as load_checkpoint
        from .verify import source_checkpoint

        ckpt = source_checkpoint(manifest, checkpoint)
        if ckpt is None:
            raise FileNotFoundError("the checkpoint this folder was built from is not at hand; pass --checkpoint")
        loaded = load_checkpoint(ckpt)
    report = fit(loaded, guidance=manifest.exit.guidance if loaded.model.config.num_classes else 1.0, log=log, **kw)
    manifest.exit = report.defaults(manifest.exit, default=default)
    manifest.calibration = curve(report)
    write(manifest, folder)
    log(format_report(report, manifest.depth))
    log(f"default policy: {manifest.exit.policy} (stored in {folder / 'manifest.json'})")
    return report


def calibrate_checkpoint(path: Optional[Path], out: Optional[Path] = None, log: Callable[[str], None] = print,
                         default: Optional[str] = None, **kw) -> CalibrationReport:
    """Fit and store the result in a checkpoint's `defaults` (at `out`, or in place); `default` names the
    default policy instead of the lowest J."""
    from ..model.checkpoint import SHIPPED_CHECKPOINT, load as load_checkpoint, read_raw, write_atomic

    path = Path(path) if path is not None else SHIPPED_CHECKPOINT
    target = Path(out) if out is not None else path
    if target.suffix != ".pt":
        raise ValueError(f"--out must name a .pt file, got {target}")
    loaded = load_checkpoint(path)
    report = fit(loaded, log=log, **kw)
    raw = read_raw(path)
    raw["defaults"] = report.defaults(exit_defaults(loaded), default=default).to_dict()
    provenance = dict(raw.get("provenance") or {})
    provenance["calibration"] = {"samples": report.samples, "features": report.features, "runs": report.runs,
                                 "budgets": [b.budget for b in report.budgets],
                                 "default": default or "lowest J", "final_x0": report.final_x0}
    raw["provenance"] = provenance
    write_atomic(raw, target)
    log(format_report(report, loaded.model.depth))
    log(f"default policy: {raw['defaults']['policy']} (stored in {target})")
    return report

