"""Fit exit policies to a layer budget on finished samples: the schedule, uem-time, and matched thresholds.

The schedule search, in four measured steps (every J is `features.mean_shift` of the calibration
set's finished samples against full depth):

1. the reference: full depth, and the base: static exit after round(budget) layers;
2. per-bin sensitivity: bin k alone drops to a shallow layer, every other step stays at the
   base; s_k is how much J rises;
3. candidates: layers_k = budget + c * z_k (z: standardized log sensitivity) for a few contrasts
   c, rounded so the layer budget is met exactly; c = 0 is the base;
4. the candidate with the lowest J wins.

Why not a per-bin optimum: a finished sample's feature shift is not the sum of per-bin shifts
(errors of neighbouring bins add up or cancel), and at a few hundred samples the shift of one
bin is close to the estimate's noise. Ranking bins by sensitivity is robust to both; the contrast
is then chosen by whole runs, where interactions are measured, not modelled.

uem-time starts from the fitted schedule: in each bin a row may exit from layers_k - delta on,
once u < tau_k, and exits after layers_k + delta at the latest; tau_k is matched so that the bin
keeps its layer count on the calibration trajectories. The paper's `uem` and `saturation` get
one threshold each, matched to the budget by bisection on whole runs (`match_threshold`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..sampling.exit_settings import TimeTable
from .features import FeatureFn, mean_shift
from .runs import Run, StepRunner

CONTRASTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
UEM_WIDTHS = (1, 2)  # uem-time: rows may leave this many layers before or after the schedule's layer


@dataclass
class Candidate:
    """One evaluated per-step exit plan."""

    name: str
    layers: Tuple[int, ...]  # per bin
    j: float                 # mean shift against full depth (lower is better)
    mean_layers: float


@dataclass
class ScheduleFit:
    budget: float
    schedule: TimeTable
    j: float
    candidates: List[Candidate] = field(default_factory=list)
    sensitivity: Tuple[float, ...] = ()


def bins_of(steps: int, bins: int) -> List[range]:
    """Consecutive step ranges, as even as possible (the first ones get the extra steps)."""
    bins = max(1, min(bins, steps))
    sizes = [steps // bins + (1 if i < steps % bins else 0) for i in range(bins)]
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


def per_step(layers: Sequence[int], bins: Sequence[range]) -> List[int]:
    """Per-bin layers spread over the steps."""
    return [int(layers[k]) for k, r in enumerate(bins) for _ in r]


def weighted_mean(layers: Sequence[float], bins: Sequence[range]) -> float:
    return float(sum(layers[k] * len(r) for k, r in enumerate(bins)) / sum(len(r) for r in bins))


def with_contrast(budget: float, z: np.ndarray, c: float, bins: Sequence[range], depth: int,
                  lowest: int = 1) -> Tuple[int, ...]:
    """budget + c * z per bin, rounded and clipped to lowest..depth, then nudged (the most sensitive bins
    first when adding, the least first when removing) until the steps' mean is the budget to a step."""
    sizes = np.array([len(r) for r in bins])
    total = int(round(budget * sizes.sum()))
    layers = np.clip(np.round(budget + c * z), lowest, depth).astype(int)
    order = np.argsort(-z, kind="stable")
    for _ in range(depth * len(bins)):
        have = int((layers * sizes).sum())
        if abs(have - total) * 2 <= sizes.min():
            break
        step = 1 if have < total else -1
        pool = order if step > 0 else order[::-1]
        for k in pool:
            if lowest <= layers[k] + step <= depth:
                layers[k] += step
                break
        else:
            break
    return tuple(int(v) for v in layers)


class Searcher:
    """Runs and scores candidates on one calibration set; `j_of` is cached per per-step plan."""

    def __init__(self, runner: StepRunner, features: FeatureFn, progress: Callable[[str], None]) -> None:
        self.runner = runner
        self.features = features
        self.progress = progress
        self.depth = runner.loaded.model.depth
        steps = runner.cset.steps
        self.full = runner.run([self.depth] * steps)
        self.ref = features(self.full.images)
        self._seen: Dict[Tuple[int, ...], float] = {}

    def j_of(self, plan: Sequence[int], replay: Optional[Run] = None, start: int = 0) -> float:
        key = tuple(plan)
        if key not in self._seen:
            run = self.runner.run(plan, replay, start)
            self._seen[key] = mean_shift(self.features(run.images), self.ref)
            self.progress(f"mean {np.mean(plan):.2f} layers: J {self._seen[key]:.3g}")
        return self._seen[key]

    def fit_schedule(self, budget: float, bins: Sequence[range], times: Sequence[float]) -> ScheduleFit:
        """The schedule for `budget` mean layers (see the module docstring)."""
        depth, steps = self.depth, self.runner.cset.steps
        if not 1.0 <= budget <= depth:
            raise ValueError(f"layer budget must lie in 1..{depth}, got {budget:g}")
        base_layer = int(min(depth, max(1, round(budget))))
        base_plan = [base_layer] * steps
        base = self.runner.run(base_plan)
        j_base = mean_shift(self.features(base.images), self.ref)
        self._seen[tuple(base_plan)] = j_base
        shallow = max(1, min(base_layer - 1, 2))
        sens = []
        for k, r in enumerate(bins):
            plan = list(base_plan)
            for n in r:
                plan[n] = shallow
            sens.append(max(self.j_of(plan, base, r.start) - j_base, 0.0) if shallow < base_layer else 0.0)
        s = np.asarray(sens)
        floor = max(float(s.max()) * 1e-3, 1e-12)
        logs = np.log(s + floor)
        z = (logs - logs.mean()) / (logs.std() if logs.std() > 0 else 1.0)
        candidates = []
        for c in CONTRASTS:
            layers = with_contrast(budget, z, c, bins, depth)
            plan = per_step(layers, bins)
            candidates.append(Candidate(f"contrast {c:g}", layers, self.j_of(plan), weighted_mean(layers, bins)))
        best = min(candidates, key=lambda cd: (cd.j, cd.mean_layers))
        table = TimeTable.schedule(bin_bounds(times, bins), best.layers)
        return ScheduleFit(budget, table, best.j, candidates, tuple(float(v) for v in s))


def bin_bounds(times: Sequence[float], bins: Sequence[range]) -> Tuple[float, ...]:
    """Halfway between the last step of a bin and the first of the next."""
    return tuple(0.5 * (float(times[r.start - 1]) + float(times[r.start])) for r in bins[1:])


def rule_layers(u: Tensor, m: int, hi: int, tau: float) -> Tensor:
    """uem-time's exit layer per row: the first layer in m..hi-1 with u < tau, else hi. u: [rows, N]."""
    exits = torch.full((u.shape[0],), hi, dtype=torch.int64)
    for layer in range(hi - 1, m - 1, -1):
        exits = torch.where(u[:, layer - 1] < tau, torch.full_like(exits, layer), exits)
    return exits


def match_tau(u_steps: Sequence[Tensor], m: int, hi: int, target: float, iters: int = 20) -> float:
    """The threshold whose mean exit layer over these steps' rows is closest to `target`."""
    if m >= hi:
        return 0.0
    u = torch.cat(list(u_steps))
    return match_threshold(lambda tau: float(rule_layers(u, m, hi, tau).double().mean()), target, iters)


def uem_time_table(schedule: TimeTable, u_steps: Sequence[Tensor], bins: Sequence[range], depth: int,
                   width: int) -> TimeTable:
    """A uem-time table around `schedule`: per bin, layers L-width..L+width, tau keeping the bin's mean at L."""
    lows, highs, taus = [], [], []
    for k, r in enumerate(bins):
        layer = schedule.min_layers[k]
        m, hi = max(1, layer - width), min(depth, layer + width)
        lows.append(m)
        highs.append(hi)
        taus.append(round(match_tau([u_steps[n] for n in r], m, hi, float(layer)), 6))
    return TimeTable(schedule.t_bounds, tuple(lows), tuple(highs), tuple(taus))


def match_threshold(mean_layers: Callable[[float], float], target_layers: float, iters: int = 14) -> float:
    """The threshold at which a policy exits after `target_layers` layers on average, by bisection.

    `mean_layers(threshold)` runs the policy and returns its mean exit layer; it must fall as the threshold rises
    (threshold 0 runs every layer). Saturation has to be matched on its own sampling trajectories: its scores
    along a full-depth trajectory say little about the states an early-exit trajectory reaches.
    """
    seen: Dict[float, float] = {}

    def layers(th: float) -> float:
        if th not in seen:
            seen[th] = mean_layers(th)
        return seen[th]

    lo, hi = 0.0, 1.0
    while layers(hi) > target_layers and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if layers(mid) > target_layers:
            lo = mid
        else:
            hi = mid
    return min(seen, key=lambda th: (abs(seen[th] - target_layers), th))

