"""Finished samples of the calibration set under a per-step exit layer, with a replayed prefix.

Calibration compares exit policies by what they do to finished samples, so every candidate costs
a sampling run. Two things keep that affordable: the whole calibration set is one batch, and a
run that differs from an earlier one only from step `start` on replays the earlier run's noise
predictions for the steps before it (the samplers are deterministic, so the prefix is the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..model.checkpoint import Loaded
from ..sampling.early_exit import ExitPolicy, early_exit, per_layer_uncertainty
from ..sampling.generate import noise_and_labels
from ..sampling.samplers import Denoiser, guided, sample, time_grid

CALIBRATION_SEED = 1  # `evaluate` and `bench` draw from seed 0: calibration never sees their samples


@dataclass(frozen=True)
class CalibrationSet:
    """The held-out noise and labels calibration samples from, and how they are sampled."""

    noise: Tensor
    labels: Optional[Tensor]
    guidance: float
    sampler: str = "dpm++"
    steps: int = 50
    final_x0: bool = True  # the samplers' last step (samplers.py); calibrate as the policies will be sampled

    @classmethod
    def draw(cls, loaded: Loaded, n: int, guidance: float, sampler: str = "dpm++", steps: int = 50,
             seed: int = CALIBRATION_SEED, final_x0: bool = True) -> "CalibrationSet":
        c = loaded.model.config
        noise, labels = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, n, seed)
        return cls(noise, labels, guidance if labels is not None else 1.0, sampler, steps, final_x0)

    def head(self, n: int) -> "CalibrationSet":
        """The first n samples (for cheap runs that need only a mean exit layer)."""
        return replace(self, noise=self.noise[:n], labels=None if self.labels is None else self.labels[:n])

    def times(self, loaded: Loaded) -> List[float]:
        """The time of each sampling step (the grid without its end point)."""
        spacing = "uniform" if self.sampler == "euler" else "logsnr"
        return time_grid(loaded.schedule, self.steps, spacing).tolist()[:-1]


@dataclass
class Run:
    """One sampling run's finished images and each step's noise predictions (row level, for replay)."""

    images: Tensor
    eps: List[Tensor] = field(default_factory=list)
    layers: List[Tensor] = field(default_factory=list)  # [B_rows] exit layers per step
    u: List[Tensor] = field(default_factory=list)       # [B_rows, N] per step, when recorded

    @property
    def mean_layers(self) -> float:
        """Mean exit layer over the steps this run computed (replayed steps have no record)."""
        return float(torch.cat(self.layers).double().mean()) if self.layers else float("nan")


Step = Union[int, ExitPolicy]  # a static exit layer, or any policy


class StepRunner:
    """Samples the calibration set with `plan[n]` at step n: a static exit layer or any ExitPolicy."""

    def __init__(self, loaded: Loaded, cset: CalibrationSet) -> None:
        self.loaded = loaded
        self.cset = cset
        self.runs = 0  # sampling runs so far (for progress reports)

    @torch.no_grad()
    def run(self, plan: Sequence[Step], replay: Optional[Run] = None, start: int = 0,
            record_u: bool = False) -> Run:
        """Finished images for the per-step plan; steps before `start` replay `replay`'s predictions."""
        if len(plan) != self.cset.steps:
            raise ValueError(f"need one exit layer or policy per step ({self.cset.steps}), got {len(plan)}")
        if start and (replay is None or len(replay.eps) < start):
            raise ValueError("replaying a prefix needs a run that recorded it")
        model = self.loaded.model
        out = Run(images=torch.empty(0))
        step = [0]

        def denoise(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
            n = step[0]
            step[0] += 1
            if n < start:
                eps = replay.eps[n]
            else:
                step_plan = plan[n]
                policy = step_plan if isinstance(step_plan, ExitPolicy) else ExitPolicy("static", layer=int(step_plan))
                r = early_exit(model, x, t, y, policy)
                eps = r.eps
                out.layers.append(r.exit_layer)
            if record_u:
                out.u.append(per_layer_uncertainty(model, x, t, y))
            out.eps.append(eps)
            return eps

        c = model.config
        fn: Denoiser = denoise if self.cset.labels is None else guided(denoise, self.cset.guidance, c.num_classes)
        out.images = sample(self.cset.sampler, fn, self.cset.noise.clone(), self.loaded.schedule, self.cset.steps,
                            y=self.cset.labels, final_x0=self.cset.final_x0)
        self.runs += 1
        return out
