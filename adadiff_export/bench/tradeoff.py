"""`python -m adadiff_export tradeoff`: every exit policy at the same layer budgets, on the same samples.

For each budget (a fraction of the layers saved), the policies are fitted on the calibration set
(`calibration.calibrate_exits`, seed 1: the schedule, uem-time, the paper's uem and saturation at
their matched thresholds) and then measured on an evaluation set they never saw (seed 0, the
same noise and labels for every row): class accuracy, FD (the shipped classifier's features, not
Inception FID) and mean layers, beside static exit after each layer around the budgets and full
depth. Each row also gets the wall time of one 50-step adadiff_rt run (OpenVINO f32), timed
round-robin in one process so that the machine's drift hits every row alike.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..calibration.calibrate import DEFAULT_SAMPLES, FITTABLE, calibrate_exits, format_report
from ..model.checkpoint import Loaded
from ..quality.metrics import FD_NOTE, LoadedClassifier
from ..sampling.early_exit import FULL_DEPTH, ExitPolicy
from ..sampling.generate import EvalPoint, evaluate, exit_defaults, noise_and_labels
from .harness import machine, machine_line, rotating_times

DEFAULT_SAVED = (0.4, 0.5, 0.6, 0.7)
KINDS = ("static", "schedule", "uem-time", "uem", "saturation")


@dataclass
class TradeoffRow:
    """One measured policy."""

    name: str
    kind: str
    budget: Optional[float]   # the mean-layers budget it was fitted to (None: static and full depth)
    mean_layers: float
    accuracy: float
    fd: float
    rt_ms: float = float("nan")  # median wall time of one 50-step adadiff_rt run
    params: Dict[str, object] = field(default_factory=dict)


@dataclass
class TradeoffResult:
    rows: List[TradeoffRow]
    machine: Dict[str, object]
    n: int
    time_batch: int
    calibration: str
    final_x0: bool = True  # the samplers' last step, in calibration, evaluation and timing alike


def budgets_of(depth: int, saved: Sequence[float]) -> List[float]:
    """Mean-layers budgets for fractions of the layers saved (0.4 -> 60% of the depth)."""
    bad = [s for s in saved if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"--saved takes fractions of the layers saved in [0, 1), got {bad}")
    return [round((1.0 - s) * depth, 2) for s in saved]


def static_layers_around(budgets: Sequence[float], depth: int) -> List[int]:
    """The static exits on both sides of every budget, for interpolating static exit at that budget."""
    out = set()
    for b in budgets:
        out.update({max(1, int(np.floor(b))), min(depth, int(np.ceil(b)))})
    return sorted(out)


def interpolate_static(rows: Sequence[TradeoffRow], mean_layers: float, key: str = "fd") -> float:
    """Static exit's `key` at a fractional mean layer count, linear between the two measured layers around it."""
    pts = sorted((r.mean_layers, getattr(r, key)) for r in rows if r.kind == "static")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs or not xs[0] <= mean_layers <= xs[-1]:
        return float("nan")
    return float(np.interp(mean_layers, xs, ys))


def _params(p: ExitPolicy) -> Dict[str, object]:
    if p.table is not None:
        return p.table.to_dict()
    if p.kind in ("uem", "saturation"):
        return {"threshold": p.threshold}
    return {"layer": p.layer}


def run_tradeoff(loaded: Loaded, engines: Optional[Path], clf: LoadedClassifier, saved: Sequence[float] = DEFAULT_SAVED,
                 n: int = 1000, cal_samples: int = DEFAULT_SAMPLES, time_batch: int = 8, repeats: int = 3,
                 threads: int = 0, final_x0: bool = True, log: Callable[[str], None] = print) -> TradeoffResult:
    """Fit, evaluate and time every policy at every budget (see the module docstring)."""
    depth = loaded.model.depth
    budgets = budgets_of(depth, saved)
    guidance = exit_defaults(loaded).guidance
    report = calibrate_exits(loaded, budgets, samples=cal_samples, guidance=guidance,
                             policies=FITTABLE, final_x0=final_x0, progress=log)
    log(format_report(report, depth))
    fitted = [(b.budget, f.policy) for b in report.budgets for f in b.fits.values()]
    statics = [ExitPolicy("static", layer=k) for k in static_layers_around(budgets, depth)]
    policies = statics + [p for _, p in fitted]
    full, points = evaluate(loaded, clf, n, policies, guidance=guidance, final_x0=final_x0)
    budget_of = {id(p): b for b, p in fitted}
    rows = [_row(full, None)] + [_row(pt, budget_of.get(id(pt.policy))) for pt in points]
    if engines is not None:
        _time_rows(rows, [FULL_DEPTH] + policies, loaded, engines, guidance, time_batch, repeats, threads, final_x0)
    return TradeoffResult(rows, machine(), n, time_batch, f"{report.samples} held-out samples (seed 1), "
                                                          f"{report.runs} sampling runs, J in {report.features}",
                          final_x0)


def policy_of(row: TradeoffRow) -> ExitPolicy:
    """The policy a row measured, from its kind and params (what tradeoff.json stores)."""
    from ..sampling.exit_settings import TimeTable

    if row.kind == "full":
        return FULL_DEPTH
    if row.kind in ("schedule", "uem-time"):
        return ExitPolicy(row.kind, table=TimeTable.from_dict(row.params))
    if row.kind == "static":
        return ExitPolicy("static", layer=int(row.params["layer"]))
    return ExitPolicy(row.kind, threshold=float(row.params["threshold"]))


def load(path: Path) -> TradeoffResult:
    """A result written by `write` (tradeoff.json)."""
    d = json.loads(Path(path).read_text())
    rows = [TradeoffRow(**{**r, "rt_ms": float("nan") if r.get("rt_ms") is None else r["rt_ms"]}) for r in d["rows"]]
    # Results written before the samplers' final_x0 existed were measured at t_eps.
    return TradeoffResult(rows, d["machine"], int(d["n"]), int(d["time_batch"]), str(d["calibration"]),
                          bool(d.get("final_x0", False)))


def retime(res: TradeoffResult, loaded: Loaded, engines: Path, time_batch: int, repeats: int, threads: int) -> None:
    """Measure the rows' adadiff_rt times again (all round-robin in this process), e.g. on a quieter machine."""
    res.time_batch = time_batch
    res.machine = machine()
    _time_rows(res.rows, [policy_of(r) for r in res.rows], loaded, engines, exit_defaults(loaded).guidance,
               time_batch, repeats, threads, res.final_x0)


def _row(p: EvalPoint, budget: Optional[float]) -> TradeoffRow:
    return TradeoffRow(p.name, "full" if p.policy == FULL_DEPTH else p.policy.kind, budget, p.mean_layers,
                       p.accuracy, p.fd, params=_params(p.policy))


def _time_rows(rows: List[TradeoffRow], policies: Sequence[ExitPolicy], loaded: Loaded, engines: Path,
               guidance: float, batch: int, repeats: int, threads: int, final_x0: bool) -> None:
    """Median wall time of one 50-step adadiff_rt run per row, all rows round-robin in one process."""
    import adadiff_rt

    c = loaded.model.config
    runtime = adadiff_rt.Runtime(str(engines), device="cpu", engine="openvino", precision="fp32", threads=threads)
    noise, labels = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, batch, seed=123)
    y = None if labels is None else labels.numpy()

    def call(p: ExitPolicy) -> Callable[[], object]:
        return lambda: runtime.sample(noise.numpy(), y, sampler="dpm++", steps=50, guidance=guidance,
                                      final_x0=final_x0, **p.runtime_kwargs())

    calls = [call(p) for p in policies]
    for fn in calls:  # warm-up: compiles, and promotes the batch sizes to their static compilations
        for _ in range(2):
            fn()
    times = rotating_times(calls, repeats)
    for r, t in zip(rows, times):
        r.rt_ms = 1e3 * statistics.median(t)


def markdown(res: TradeoffResult, depth: int, command: str) -> str:
    """The table: one block per budget, full depth and interpolated static exit for reference."""
    full = next(r for r in res.rows if r.kind == "full")
    lines = [f"Machine: {machine_line(res.machine)}. Command: `{command}`.",
             f"Evaluation: {res.n} samples (seed 0), DPM-Solver++ 50 steps, "
             f"{'the last step returning its x0 prediction' if res.final_x0 else 'stopping at t_eps'}; "
             f"calibration: {res.calibration}. "
             f"{FD_NOTE}. Time: one 50-step adadiff_rt run of {res.time_batch} images (OpenVINO f32), median, all "
             "rows timed round-robin in one process.", "",
             "| budget | policy | mean layers | saved | class accuracy | FD | FD vs static at these layers | "
             "adadiff_rt 50 steps | speedup |", "|---|---|---|---|---|---|---|---|---|"]

    def line(r: TradeoffRow, budget: str) -> str:
        st = interpolate_static(res.rows, r.mean_layers)
        vs = f"{r.fd / st - 1:+.1%}" if r.kind not in ("static", "full") and np.isfinite(st) else "-"
        ms = f"{r.rt_ms:.0f} ms" if np.isfinite(r.rt_ms) else "-"
        sp = f"{full.rt_ms / r.rt_ms:.2f}x" if np.isfinite(r.rt_ms) and np.isfinite(full.rt_ms) else "-"
        return (f"| {budget} | {r.name} | {r.mean_layers:.2f} | {1 - r.mean_layers / depth:.1%} | "
                f"{r.accuracy:.1%} | {r.fd:.3f} | {vs} | {ms} | {sp} |")

    lines.append(line(full, "-"))
    for r in (r for r in res.rows if r.kind == "static"):
        lines.append(line(r, "-"))
    for b in sorted({r.budget for r in res.rows if r.budget is not None}, reverse=True):
        for kind in KINDS[1:]:
            for r in (r for r in res.rows if r.budget == b and r.kind == kind):
                lines.append(line(r, f"{b:g} ({1 - b / depth:.0%} fewer)"))
    return "\n".join(lines)


def plot(res: TradeoffResult, path_layers: Path, path_time: Path) -> List[Path]:
    """FD against mean layers, and FD against adadiff_rt time, one line per policy."""
    from .figures import _pyplot, _save

    plt = _pyplot()
    style = {"static": ("tab:orange", "s"), "schedule": ("tab:red", "D"), "uem-time": ("tab:purple", "v"),
             "uem": ("tab:blue", "o"), "saturation": ("tab:green", "^")}
    full = next(r for r in res.rows if r.kind == "full")
    out = []
    for path, key, xlabel in ((path_layers, "mean_layers", "mean layers per denoiser call (of %d)" % round(full.mean_layers)),
                              (path_time, "rt_ms", f"adadiff_rt: one 50-step run of {res.time_batch} images (ms)")):
        if key == "rt_ms" and not np.isfinite(full.rt_ms):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for kind, (color, marker) in style.items():
            pts = sorted((r for r in res.rows if r.kind == kind), key=lambda r: getattr(r, key))
            if pts:
                ax.plot([getattr(r, key) for r in pts], [r.fd for r in pts], marker=marker, color=color, label=kind)
        ax.scatter([getattr(full, key)], [full.fd], marker="*", s=160, color="black", zorder=5, label="full depth")
        ax.axhline(full.fd * 1.1, color="gray", ls=":", lw=1, label="full depth FD + 10%")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")  # the paper's uem sits 3-6x above the rest; a linear axis flattens them together
        ax.set_ylabel("FD to the test set (classifier features; lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Exit policies at equal layer budgets, {res.n} samples", fontsize=10)
        out.append(_save(fig, path))
    return out


def write(res: TradeoffResult, out: Path, depth: int, command: str) -> List[Path]:
    """tradeoff.md, tradeoff.json and the two PNGs into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.md").write_text(markdown(res, depth, command) + "\n")
    rows = [{**asdict(r), "rt_ms": r.rt_ms if np.isfinite(r.rt_ms) else None} for r in res.rows]
    (out / "tradeoff.json").write_text(json.dumps({"machine": res.machine, "n": res.n, "time_batch": res.time_batch,
                                                   "calibration": res.calibration, "final_x0": res.final_x0,
                                                   "rows": rows}, indent=1))
    return [out / "tradeoff.md", out / "tradeoff.json", *plot(res, out / "tradeoff_layers.png", out / "tradeoff_time.png")]
