"""Exit calibration on finished samples: for each layer budget, a schedule, a uem-time table and the
thresholds of the paper's uem and of saturation, each scored the same way (docs/ARCHITECTURE.md,
"Exit calibration"; the method is in calibration/search.py).

The result is what `calibrate` stores (in a manifest's `exit` or a checkpoint's `defaults`) and
what the trade-off benchmark evaluates on its own, larger sample set.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

from ..model.checkpoint import Loaded
from ..sampling.early_exit import ExitPolicy
from ..sampling.exit_settings import ExitDefaults
from .features import feature_fn, mean_shift
from .runs import CalibrationSet, StepRunner
from .search import UEM_WIDTHS, ScheduleFit, Searcher, bins_of, match_threshold, uem_time_table

DEFAULT_SAMPLES = 128
DEFAULT_BINS = 10
FITTABLE = ("schedule", "uem-time", "uem", "saturation")  # the policies calibrate_exits can fit
MATCH_SAMPLES = 32  # matching a threshold to a budget needs only mean exit layers: a smaller set


@dataclass
class PolicyFit:
    """One policy fitted to a budget, scored on the calibration set."""

    policy: ExitPolicy
    mean_layers: float
    j: float  # mean shift of the finished samples' features against full depth (lower is better)


@dataclass
class BudgetFit:
    """Everything fitted for one layer budget (mean layers per step)."""

    budget: float
    schedule: ScheduleFit
    fits: Dict[str, PolicyFit] = field(default_factory=dict)  # policy kind -> fit

    @property
    def best(self) -> PolicyFit:
        """The fit with the lowest J among the policies that meet the budget (to half a layer)."""
        ok = [f for f in self.fits.values() if f.mean_layers <= self.budget + 0.5]
        return min(ok or self.fits.values(), key=lambda f: (f.j, f.mean_layers))


@dataclass
class CalibrationReport:
    budgets: List[BudgetFit]
    samples: int
    features: str
    runs: int
    final_x0: bool = True  # how the calibration runs ended (the samplers' last step)

    def defaults(self, base: ExitDefaults, budget: Optional[float] = None, default: Optional[str] = None) -> ExitDefaults:
        """`base` with the fitted tables of `budget` (default: the first) and a default policy: `default` if given
        (e.g. chosen on a larger evaluation than the calibration set), else the one with the lowest J."""
        fit = self.budgets[0] if budget is None else min(self.budgets, key=lambda b: abs(b.budget - budget))
        if default is not None and default not in fit.fits:
            raise ValueError(f"default policy {default!r} was not fitted; fitted: {', '.join(fit.fits)}")
        best = fit.fits[default].policy if default is not None else fit.best.policy
        uem_time = fit.fits.get("uem-time")
        return replace(base, policy=best.kind, schedule=fit.schedule.schedule,
                       uem_time=uem_time.policy.table if uem_time is not None else base.uem_time,
                       threshold=fit.fits["uem"].policy.threshold if "uem" in fit.fits else base.threshold,
                       layer=best.layer if best.kind == "static" else base.layer)


def calibrate_exits(loaded: Loaded, budgets: Sequence[float], samples: int = DEFAULT_SAMPLES,
                    guidance: float = 2.0, sampler: str = "dpm++", steps: int = 50, bins: int = DEFAULT_BINS,
                    policies: Sequence[str] = ("schedule", "uem-time", "uem"), final_x0: bool = True,
                    progress: Callable[[str], None] = lambda s: None) -> CalibrationReport:
    """Fit every requested policy to every budget (mean exit layers per step) on `samples` held-out samples."""
    depth = loaded.model.depth
    for b in budgets:
        if not 1.0 <= b <= depth:
            raise ValueError(f"layer budget must lie in 1..{depth} mean layers, got {b:g}")
    if samples < 2:
        raise ValueError(f"calibration needs at least 2 samples, got {samples}")
    c = loaded.model.config
    cset = CalibrationSet.draw(loaded, samples, guidance, sampler, steps, final_x0=final_x0)
    runner = StepRunner(loaded, cset)
    feats, feats_name = feature_fn(c.img_size, c.in_chans)
    searcher = Searcher(runner, feats, progress)
    matcher = StepRunner(loaded, cset.head(min(samples, MATCH_SAMPLES)))
    step_bins = bins_of(steps, bins)
    times = cset.times(loaded)
    out = []
    for budget in budgets:
        progress(f"budget {budget:g} layers: schedule")
        fit = BudgetFit(budget, searcher.fit_schedule(budget, step_bins, times))
        sched = ExitPolicy("schedule", table=fit.schedule.schedule)
        fit.fits["schedule"] = PolicyFit(sched, _schedule_layers(fit.schedule), fit.schedule.j)
        if "uem-time" in policies:
            fit.fits["uem-time"] = _fit_uem_time(searcher, fit.schedule, step_bins, progress)
        for kind in ("uem", "saturation"):
            if kind in policies:
                fit.fits[kind] = _fit_threshold(searcher, matcher, kind, budget, progress)
        out.append(fit)
    return CalibrationReport(out, samples, feats_name, runner.runs + matcher.runs, final_x0)


def _schedule_layers(fit: ScheduleFit) -> float:
    return next(c.mean_layers for c in fit.candidates if c.layers == tuple(fit.schedule.min_layers))


def _score(searcher: Searcher, policy: ExitPolicy, record_u: bool = False):
    run = searcher.runner.run([policy] * searcher.runner.cset.steps, record_u=record_u)
    return run, mean_shift(searcher.features(run.images), searcher.ref)


def _fit_uem_time(searcher: Searcher, schedule: ScheduleFit, step_bins, progress) -> PolicyFit:
    """uem-time tables around the schedule, one per width, u recorded along the schedule's own trajectory."""
    depth = searcher.depth
    traced, _ = _score(searcher, ExitPolicy("schedule", table=schedule.schedule), record_u=True)
    best: Optional[PolicyFit] = None
    for width in UEM_WIDTHS:
        table = uem_time_table(schedule.schedule, traced.u, step_bins, depth, width)
        policy = ExitPolicy("uem-time", table=table)
        run, j = _score(searcher, policy)
        progress(f"uem-time width {width}: {run.mean_layers:.2f} layers, J {j:.3g}")
        if best is None or j < best.j:
            best = PolicyFit(policy, run.mean_layers, j)
    return best


def _fit_threshold(searcher: Searcher, matcher: StepRunner, kind: str, budget: float, progress) -> PolicyFit:
    """The paper's uem (or saturation) at the threshold whose own trajectories meet the budget (matched on a
    subset of the calibration set), then scored on the whole set."""
    def layers_at(th: float) -> float:
        run = matcher.run([ExitPolicy(kind, threshold=min(th, 1.0) if kind == "uem" else th)] * matcher.cset.steps)
        return run.mean_layers

    th = match_threshold(layers_at, budget, iters=8)
    policy = ExitPolicy(kind, threshold=round(min(th, 1.0) if kind == "uem" else th, 6))
    run, j = _score(searcher, policy)
    progress(f"{kind} threshold {policy.threshold:g}: {run.mean_layers:.2f} layers, J {j:.3g}")
    return PolicyFit(policy, run.mean_layers, j)


def format_report(report: CalibrationReport, depth: int) -> str:
    """The fitted policies per budget as a table."""
    lines = [f"calibrated on {report.samples} held-out samples, {report.runs} sampling runs; J = mean shift of "
             f"{report.features} against full depth (lower is better)",
             f"{'budget':>7} {'policy':>10} {'layers':>7} {'saved':>6} {'J':>10}  parameters"]
    for b in report.budgets:
        for kind, f in b.fits.items():
            mark = " *" if f is b.best else ""
            lines.append(f"{b.budget:7.2f} {kind:>10} {f.mean_layers:7.2f} {100 * (1 - f.mean_layers / depth):5.1f}% "
                         f"{f.j:10.3g}  {_params(f.policy)}{mark}")
    lines.append("* the lowest J at that budget: the default unless --default names another")
    return "\n".join(lines)


def _params(p: ExitPolicy) -> str:
    if p.kind == "schedule":
        return "layers by bin " + ",".join(str(v) for v in p.table.min_layers)
    if p.kind == "uem-time":
        t = p.table
        return "bins " + " ".join(f"{lo}-{hi}@{tau:.3g}" for lo, hi, tau in zip(t.min_layers, t.max_layers, t.thresholds))
    return f"threshold {p.threshold:g}"

