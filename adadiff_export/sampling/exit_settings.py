"""Exit parameters that depend on the step's time: the `schedule` and `uem-time` policies' table.

Why time: what an early exit costs the finished image depends on the step far more than on the
sample (docs/ARCHITECTURE.md, "Exit policies"). A table splits t into bins; bin k covers
t_bounds[k-1] > t >= t_bounds[k] (bounds descend, so bin 0 holds the noisiest steps) and holds:

- `schedule`: one exit layer per bin (min_layers == max_layers, no thresholds);
- `uem-time`: a row may exit from min_layers[k] on, at the first layer whose uncertainty u is
  below thresholds[k], and has exited after max_layers[k] at the latest.

The JSON form is the manifest's (docs/MANIFEST.md, `exit.schedule` and `exit.uem_time`); adadiff_rt
reads the same dicts. This module needs no torch: the manifest and the runtime's callers use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

MAX_BINS = 1024  # adadiff_rt's kMaxTableBins


@dataclass(frozen=True)
class TimeTable:
    """Per-bin exit layers (and thresholds for uem-time) over t; see the module docstring."""

    t_bounds: Tuple[float, ...]
    min_layers: Tuple[int, ...]
    max_layers: Tuple[int, ...]
    thresholds: Tuple[float, ...] = ()

    @classmethod
    def schedule(cls, t_bounds: Sequence[float], layers: Sequence[int]) -> "TimeTable":
        """A schedule: every row with time in bin k exits after layers[k]."""
        layers = tuple(int(v) for v in layers)
        return cls(tuple(float(b) for b in t_bounds), layers, layers)

    @property
    def bins(self) -> int:
        return len(self.min_layers)

    @property
    def is_schedule(self) -> bool:
        return not self.thresholds

    def bin_of(self, t: float) -> int:
        """The bin of time t: how many bounds lie above it (float32 t compared as a double, as adadiff_rt does)."""
        return sum(1 for b in self.t_bounds if float(t) < b)

    def layer_of(self, t: float) -> int:
        """A schedule's exit layer at time t."""
        return self.min_layers[self.bin_of(t)]

    def check(self, depth: int, where: str = "time table") -> "TimeTable":
        """Raise ValueError naming `where` unless the table is well formed for `depth` layers; returns self."""
        k = self.bins
        if not 1 <= k <= MAX_BINS:
            raise ValueError(f"{where}: needs 1..{MAX_BINS} bins, got {k}")
        if len(self.t_bounds) != k - 1:
            raise ValueError(f"{where}: t_bounds must hold one value fewer than the bins ({k - 1}), got {len(self.t_bounds)}")
        if len(self.max_layers) != k:
            raise ValueError(f"{where}: max_layers must hold one value per bin ({k}), got {len(self.max_layers)}")
        for j, b in enumerate(self.t_bounds):
            if not (math.isfinite(b) and 0.0 < b < 1.0):
                raise ValueError(f"{where}: t_bounds must lie in (0, 1), got {b}")
            if j and not b < self.t_bounds[j - 1]:
                raise ValueError(f"{where}: t_bounds must strictly decrease (bin 0 is the noisiest), got {list(self.t_bounds)}")
        for i, (lo, hi) in enumerate(zip(self.min_layers, self.max_layers)):
            if not 1 <= lo <= hi <= depth:
                raise ValueError(f"{where}: bin {i}: layers must satisfy 1 <= min <= max <= {depth}, got {lo}..{hi}")
        if self.thresholds:
            if len(self.thresholds) != k:
                raise ValueError(f"{where}: thresholds must hold one value per bin ({k}), got {len(self.thresholds)}")
            bad = [v for v in self.thresholds if not 0.0 <= v <= 1.0]
            if bad:
                raise ValueError(f"{where}: thresholds must lie in [0, 1], got {bad[0]}")
        return self

    def mean_layers(self, times: Sequence[float]) -> float:
        """A schedule's mean exit layer over the given step times."""
        return sum(self.layer_of(t) for t in times) / max(1, len(times))

    def to_dict(self) -> Dict[str, Any]:
        """The manifest's JSON form: {t_bounds, layers} or {t_bounds, min_layers, max_layers, thresholds}."""
        if self.is_schedule:
            return {"t_bounds": list(self.t_bounds), "layers": list(self.min_layers)}
        return {"t_bounds": list(self.t_bounds), "min_layers": list(self.min_layers),
                "max_layers": list(self.max_layers), "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "time table") -> "TimeTable":
        """Inverse of `to_dict`; a missing or mistyped key is a ValueError naming `where`."""
        try:
            bounds = tuple(float(v) for v in d["t_bounds"])
            if "thresholds" in d:
                return cls(bounds, tuple(int(v) for v in d["min_layers"]), tuple(int(v) for v in d["max_layers"]),
                           tuple(float(v) for v in d["thresholds"]))
            return cls.schedule(bounds, d["layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed table ({type(e).__name__}: {e})") from None


def step_bounds(times: Sequence[float], steps_per_bin: int) -> Tuple[float, ...]:
    """Bounds that group a sampler's step times (descending) into bins of `steps_per_bin` steps.

    Each bound sits halfway between the last step of one bin and the first of the next, so every
    step of the grid falls in its own bin however t is rounded.
    """
    if steps_per_bin < 1:
        raise ValueError(f"steps per bin must be >= 1, got {steps_per_bin}")
    starts = range(steps_per_bin, len(times), steps_per_bin)
    return tuple(0.5 * (float(times[s - 1]) + float(times[s])) for s in starts)


POLICIES = ("uem", "uem-time", "schedule", "static", "saturation", "uem-authors")
GRANULARITIES = ("sample", "batch")
DEFAULT_THRESHOLD = 0.1  # a checkpoint or manifest that stores none (random or unfinished weights)
DEFAULT_GUIDANCE = 2.0


@dataclass(frozen=True)
class ExitDefaults:
    """The exit settings a call that gives none uses: the manifest's `exit` and a checkpoint's `defaults`.

    `layer` is the static policy's exit layer (0 = full depth); `schedule` and `uem_time` are the
    calibrated tables of those policies (None when not calibrated).
    """

    policy: str = "uem"
    threshold: float = DEFAULT_THRESHOLD
    patience: int = 1
    granularity: str = "sample"
    guidance: float = DEFAULT_GUIDANCE
    layer: int = 0
    schedule: Optional[TimeTable] = None
    uem_time: Optional[TimeTable] = None

    def check(self, depth: int, where: str = "exit") -> "ExitDefaults":
        """Raise ValueError naming `where` unless every field is usable for a model of `depth` layers."""
        if self.policy not in POLICIES:
            raise ValueError(f"{where}.policy: unknown policy {self.policy!r} (one of {', '.join(POLICIES)})")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{where}.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"{where}.threshold must be a finite number >= 0, got {self.threshold}")
        if self.patience < 1:
            raise ValueError(f"{where}.patience must be >= 1, got {self.patience}")
        if not 0 <= self.layer <= depth:
            raise ValueError(f"{where}.layer must be in 0..{depth} (0 = full depth), got {self.layer}")
        for name, table, schedule in (("schedule", self.schedule, True), ("uem_time", self.uem_time, False)):
            if table is not None:
                table.check(depth, f"{where}.{name}")
                if table.is_schedule != schedule:
                    raise ValueError(f"{where}.{name} is not a {'schedule' if schedule else 'uem-time table'}")
        if self.policy == "schedule" and self.schedule is None:
            raise ValueError(f"{where}.policy is 'schedule' but {where}.schedule is absent")
        if self.policy == "uem-time" and self.uem_time is None:
            raise ValueError(f"{where}.policy is 'uem-time' but {where}.uem_time is absent")
        return self

    def table_for(self, policy: str) -> Optional[TimeTable]:
        """The stored table of a table policy (None for the others)."""
        return {"schedule": self.schedule, "uem-time": self.uem_time}.get(policy)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in ("policy", "threshold", "patience", "granularity", "guidance", "layer")}
        d["schedule"] = self.schedule.to_dict() if self.schedule is not None else None
        d["uem_time"] = self.uem_time.to_dict() if self.uem_time is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "exit") -> "ExitDefaults":
        """Inverse of `to_dict`; absent keys (older manifests and checkpoints) take the defaults."""
        unknown = set(d) - {"policy", "threshold", "patience", "granularity", "guidance", "layer", "schedule",
                            "uem_time"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        base = cls()
        tables = {k: TimeTable.from_dict(d[k], f"{where}.{k}") if d.get(k) is not None else None
                  for k in ("schedule", "uem_time")}
        try:
            return cls(policy=str(d.get("policy", base.policy)), threshold=float(d.get("threshold", base.threshold)),
                       patience=int(d.get("patience", base.patience)),
                       granularity=str(d.get("granularity", base.granularity)),
                       guidance=float(d.get("guidance", base.guidance)), layer=int(d.get("layer", base.layer)),
                       **tables)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed exit settings ({e})") from None
