"""The reference early exit (the oracle every runtime is tested against).

Semantics, which adadiff_rt reproduces exactly:

- Layers are numbered 1..N. After layer i < N the policy computes a per-sample score s_i:
  * `uem` (the paper's rule) and `uem-time`: s_i = u_i, the mean of layer i's uncertainty map
    (0 = certain);
  * `saturation`: s_i = ||h_i - h_{i-1}|| / ||h_{i-1}|| over all tokens (h_0 is the stem output);
  * `static`: no score; every sample exits after layer `layer`;
  * `schedule`: no score; a sample exits after the layer its time's bin of `table` names
    (`TimeTable`, sampling/exit_settings.py: bins over t, bin 0 the noisiest).
- A counter per sample (granularity `sample`) or one for the batch (granularity `batch`, the
  authors' rule, where the batch score is the mean of s_i over the samples still running) counts
  consecutive layers with s_i < threshold, and resets to 0 otherwise. When it reaches `patience`
  the sample (or the whole batch) exits at layer i. Layer N always exits.
- `uem-authors` is the rule of the AdaDiff authors' code, for their published thresholds (a
  certainty threshold tau is u threshold 1 - tau; `model/convert.py`). One decision for the batch
  on the mean of u_i over its samples ("triggered" when below the threshold). In blocks (layers
  1..k) need a second trigger: the batch exits at the in block where the count of triggered in
  blocks, consecutive or not, reaches 2. From the mid block (layer k + 1) on, the first trigger
  exits. Granularity must be `batch` and patience 1 (the rule has its own). Under classifier-free
  guidance the authors make two calls, so the conditional and unconditional halves decide apart:
  `groups` = 2 splits the rows into two halves by their original index, each with its own mean
  and count.
- `uem-time` takes its threshold, and the layers a sample may exit at, from the bin of the
  sample's t in `table`: below min_layers[k] a layer never counts as below the threshold, the
  threshold is thresholds[k], and a sample still running after max_layers[k] exits there.
  It decides per sample (granularity `sample` only).
- An exiting sample's prediction is head(h_i). With granularity `sample`, exited samples leave
  the working batch (hidden state, skip rows and time embedding compacted away), so later layers
  run only on the samples still running. Threshold 0 never exits early (u > 0 and change >= 0).
- Only what is needed is computed: no head at layers nobody exits at, no UEM for `static` and
  `saturation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..model.uvit import UViT
from .exit_settings import GRANULARITIES, POLICIES, TimeTable

TABLE_POLICIES = ("uem-time", "schedule")
UEM_POLICIES = ("uem", "uem-authors")  # one threshold on the layer's mean uncertainty


@dataclass(frozen=True)
class ExitPolicy:
    """How a denoiser call decides where to stop."""

    kind: str = "uem"
    threshold: float = 0.1
    patience: int = 1
    layer: int = 0  # static: the (1-based) layer every sample exits after; 0 = full depth
    granularity: str = "sample"
    table: Optional[TimeTable] = None  # schedule / uem-time: the exit parameters by time

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.kind!r}")
        if self.kind in TABLE_POLICIES:
            if self.table is None:
                raise ValueError(f"policy {self.kind!r} needs a time table (calibrate one: python -m adadiff_export "
                                 "calibrate)")
            if self.table.is_schedule != (self.kind == "schedule"):
                raise ValueError(f"policy {self.kind!r} takes a " +
                                 ("schedule (one layer per bin)" if self.kind == "schedule" else
                                  "uem-time table (layers and a threshold per bin)"))
            if self.kind == "uem-time" and self.granularity != "sample":
                raise ValueError("policy 'uem-time' decides per sample; granularity 'batch' is the paper's rule "
                                 "(policy 'uem')")
        elif self.table is not None:
            raise ValueError(f"a time table is used by policy 'schedule' or 'uem-time', not {self.kind!r}")

        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.kind == "uem-authors":
            if self.granularity != "batch":
                raise ValueError("policy 'uem-authors' decides for the batch (the authors' rule); use granularity "
                                 "'batch'")
            if self.patience != 1:
                raise ValueError("policy 'uem-authors' has the authors' own patience (two triggers in the in "
                                 "blocks, one from the mid block on); leave patience at 1")
        if self.kind in UEM_POLICIES and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.layer < 0:
            raise ValueError(f"static layer must be >= 0, got {self.layer}")

    def runtime_kwargs(self) -> Dict[str, Any]:
        """The same policy as keyword arguments of adadiff_rt's Runtime.denoise / Runtime.sample."""
        return {"policy": self.kind, "threshold": self.threshold, "patience": self.patience,
                "granularity": self.granularity, "static_layer": self.layer,
                "table": self.table.to_dict() if self.table is not None else None}


FULL_DEPTH = ExitPolicy(kind="static", layer=0)


@dataclass
class ExitResult:
    eps: Tensor         # [B, C, H, W] prediction of each sample at its exit layer
    exit_layer: Tensor  # [B] int64, 1-based layer each sample exited at
    u: Tensor           # [B, N] mean uncertainty per layer (NaN where not computed)


def _scores(model: UViT, policy: ExitPolicy, i: int, h: Tensor, h_prev: Tensor, temb: Tensor,
            u_out: Tensor, active: Tensor) -> Optional[Tensor]:
    """Per-sample score of layer i (0-based) for the running samples; records u when computed."""
    if policy.kind in ("uem", "uem-time", "uem-authors"):
        u = model.uncertainty(i, h, temb).mean(dim=(1, 2, 3))
        u_out[active, i] = u
        return u
    if policy.kind == "saturation":
        diff = (h - h_prev).flatten(1).norm(dim=1)
        return diff / h_prev.flatten(1).norm(dim=1).clamp_min(1e-12)
    return None


@torch.no_grad()
def early_exit(model: UViT, x: Tensor, t: Tensor, y: Optional[Tensor], policy: ExitPolicy,
               groups: int = 1) -> ExitResult:
    """One denoiser call with early exit; see the module docstring for the exact rule.

    `groups`: `uem-authors` decides apart for each of this many equal parts of the rows (2 under
    classifier-free guidance: the authors' two calls); other policies ignore it.
    """
    n_layers = model.depth
    b = x.shape[0]
    if groups < 1 or b % groups:
        raise ValueError(f"groups must divide the batch {b}, got {groups}")
    group = torch.arange(b) // (b // groups)
    h, temb = model.stem(x, t, y)
    eps = torch.empty_like(x)
    exit_layer = torch.full((b,), n_layers, dtype=torch.int64)
    u_out = torch.full((b, n_layers), float("nan"), dtype=x.dtype)
    active = torch.arange(b)
    count = torch.zeros(b, dtype=torch.int64)
    saved: List[Tensor] = []
    k = model.config.num_in_blocks
    static_layer = policy.layer if policy.kind == "static" and policy.layer > 0 else n_layers
    bins = None
    if policy.table is not None:
        bins = _bins(policy.table.check(n_layers, f"policy {policy.kind!r}"), t)
    for i in range(n_layers):
        src = model.skip_source(i)
        h_prev = h
        h = model.layer(i, h, saved[src] if src is not None else None)
        if i < k:
            saved.append(h)
        here = i + 1
        if i == n_layers - 1:
            exits = torch.ones(h.shape[0], dtype=torch.bool)
        elif policy.kind == "static":
            exits = torch.full((h.shape[0],), here >= static_layer, dtype=torch.bool)
        elif policy.kind == "schedule":
            exits = here >= _per_bin(policy.table.min_layers, bins[active])
        else:
            s = _scores(model, policy, i, h, h_prev, temb, u_out, active)
            if policy.kind == "uem-time":
                kb = bins[active]
                below = (here >= _per_bin(policy.table.min_layers, kb)) & (s < _per_bin(policy.table.thresholds, kb, s.dtype))
            elif policy.kind == "uem-authors":
                g = group[active]
                trig = torch.zeros_like(g, dtype=torch.bool)
                for k_ in g.unique():
                    trig[g == k_] = s[g == k_].mean() < policy.threshold
                if here <= k:  # in blocks: the second trigger, consecutive or not
                    count = count + trig.long()
                    exits = count >= 2
                else:          # the mid block and the out blocks: the first trigger
                    exits = trig
            elif policy.granularity == "batch":
                below = (s.mean() < policy.threshold).expand(h.shape[0])
            else:
                below = s < policy.threshold
            if policy.kind != "uem-authors":
                count = torch.where(below, count + 1, torch.zeros_like(count))
                exits = count >= policy.patience
            if policy.kind == "uem-time":
                exits = exits | (here >= _per_bin(policy.table.max_layers, bins[active]))
        if exits.any():
            idx = active[exits]
            eps[idx] = model.head(h[exits])
            exit_layer[idx] = i + 1
            keep = ~exits
            if not keep.any():
                break
            active, h, temb, count = active[keep], h[keep], temb[keep], count[keep]
            saved = [s[keep] for s in saved]
    return ExitResult(eps, exit_layer, u_out)


def _bins(table: TimeTable, t: Tensor) -> Tensor:
    """Each row's bin: how many bounds lie above its t (float32 t compared as a double, as adadiff_rt does)."""
    bounds = torch.tensor(table.t_bounds, dtype=torch.float64)
    return (t.double()[:, None] < bounds[None, :]).sum(dim=1)


def _per_bin(values, bins: Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
    """values[bin] for each row (thresholds as float32, as adadiff_rt stores them)."""
    return torch.tensor(values, dtype=dtype)[bins]


@dataclass
class EarlyExitDenoiser:
    """A sampler-compatible denoiser `(x, t, y) -> eps` that records each call's exit layers."""

    model: UViT
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    history: List[Tensor] = field(default_factory=list)  # one [B] tensor of exit layers per call

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        return self.call_groups(x, t, y, 1)

    def call_groups(self, x: Tensor, t: Tensor, y: Optional[Tensor], groups: int) -> Tensor:
        """A call whose rows are `groups` stacked batches (samplers.guided: the conditional and the
        unconditional half), which `uem-authors` decides on apart, as the authors' two calls do."""
        r = early_exit(self.model, x, t, y, self.policy, groups)
        self.history.append(r.exit_layer)
        return r.eps

    def layers_by_step(self) -> Tensor:
        """[steps, B] exit layers of every call so far (B includes both halves under guidance)."""
        return torch.stack(self.history) if self.history else torch.zeros(0, 0, dtype=torch.int64)

    def mean_layers(self) -> float:
        return float(self.layers_by_step().float().mean()) if self.history else float("nan")

    def with_policy(self, policy: ExitPolicy) -> "EarlyExitDenoiser":
        return replace(self, policy=policy, history=[])


@torch.no_grad()
def per_layer_predictions(model: UViT, x: Tensor, t: Tensor, y: Optional[Tensor]):
    """eps_i and uncertainty maps of every layer (for figures and calibration)."""
    return model.forward_all_layers(x, t, y)


@torch.no_grad()
def per_layer_uncertainty(model: UViT, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
    """[B, N] mean uncertainty u_i of every layer (no heads): what uem rules decide on."""
    h, temb = model.stem(x, t, y)
    us: List[Tensor] = []
    model.run_layers(h, lambda i, hi: us.append(model.uncertainty(i, hi, temb).mean(dim=(1, 2, 3))))
    return torch.stack(us, dim=1)
