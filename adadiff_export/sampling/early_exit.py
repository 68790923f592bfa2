"""The reference early exit (the oracle every runtime is tested against).

Semantics, which adadiff_rt reproduces exactly:

- Layers are numbered 1..N. After layer i < N the policy computes a per-sample score s_i:
  * `uem`: s_i = u_i, the mean of layer i's uncertainty map (0 = certain);
  * `saturation`: s_i = ||h_i - h_{i-1}|| / ||h_{i-1}|| over all tokens (h_0 is the stem output);
  * `static`: no score; every sample exits after layer `layer`.
- A counter per sample (granularity `sample`) or one for the batch (granularity `batch`, the
  authors' rule, where the batch score is the mean of s_i over the samples still running) counts
  consecutive layers with s_i < threshold, and resets to 0 otherwise. When it reaches `patience`
  the sample (or the whole batch) exits at layer i. Layer N always exits.
- An exiting sample's prediction is head(h_i). With granularity `sample`, exited samples leave
  the working batch (hidden state, skip rows and time embedding compacted away), so later layers
  run only on the samples still running. Threshold 0 never exits early (u > 0 and change >= 0).
- Only what is needed is computed: no head at layers nobody exits at, no UEM for `static` and
  `saturation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
from torch import Tensor

from ..model.uvit import UViT

POLICIES = ("uem", "static", "saturation")
GRANULARITIES = ("sample", "batch")


@dataclass(frozen=True)
class ExitPolicy:
    """How a denoiser call decides where to stop."""

    kind: str = "uem"
    threshold: float = 0.1
    patience: int = 1
    layer: int = 0  # static: the (1-based) layer every sample exits after; 0 = full depth
    granularity: str = "sample"

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.kind!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.kind == "uem" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.layer < 0:
            raise ValueError(f"static layer must be >= 0, got {self.layer}")


FULL_DEPTH = ExitPolicy(kind="static", layer=0)


@dataclass
class ExitResult:
    eps: Tensor         # [B, C, H, W] prediction of each sample at its exit layer
    exit_layer: Tensor  # [B] int64, 1-based layer each sample exited at
    u: Tensor           # [B, N] mean uncertainty per layer (NaN where not computed)


def _scores(model: UViT, policy: ExitPolicy, i: int, h: Tensor, h_prev: Tensor, temb: Tensor,
            u_out: Tensor, active: Tensor) -> Optional[Tensor]:
    """Per-sample score of layer i (0-based) for the running samples; records u when computed."""
    if policy.kind == "uem":
        u = model.uncertainty(i, h, temb).mean(dim=(1, 2, 3))
        u_out[active, i] = u
        return u
    if policy.kind == "saturation":
        diff = (h - h_prev).flatten(1).norm(dim=1)
        return diff / h_prev.flatten(1).norm(dim=1).clamp_min(1e-12)
    return None


@torch.no_grad()
def early_exit(model: UViT, x: Tensor, t: Tensor, y: Optional[Tensor], policy: ExitPolicy) -> ExitResult:
    """One denoiser call with early exit; see the module docstring for the exact rule."""
    n_layers = model.depth
    b = x.shape[0]
    h, temb = model.stem(x, t, y)
    eps = torch.empty_like(x)
    exit_layer = torch.full((b,), n_layers, dtype=torch.int64)
    u_out = torch.full((b, n_layers), float("nan"), dtype=x.dtype)
    active = torch.arange(b)
    count = torch.zeros(b, dtype=torch.int64)
    saved: List[Tensor] = []
    k = model.config.num_in_blocks
    static_layer = policy.layer if policy.kind == "static" and policy.layer > 0 else n_layers
    for i in range(n_layers):
        src = model.skip_source(i)
        h_prev = h
        h = model.layer(i, h, saved[src] if src is not None else None)
        if i < k:
            saved.append(h)
        if i == n_layers - 1:
            exits = torch.ones(h.shape[0], dtype=torch.bool)
        elif policy.kind == "static":
            exits = torch.full((h.shape[0],), i + 1 >= static_layer, dtype=torch.bool)
        else:
            s = _scores(model, policy, i, h, h_prev, temb, u_out, active)
            if policy.granularity == "batch":
                below = (s.mean() < policy.threshold).expand(h.shape[0])
            else:
                below = s < policy.threshold
            count = torch.where(below, count + 1, torch.zeros_like(count))
            exits = count >= policy.patience
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


@dataclass
class EarlyExitDenoiser:
    """A sampler-compatible denoiser `(x, t, y) -> eps` that records each call's exit layers."""

    model: UViT
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    history: List[Tensor] = field(default_factory=list)  # one [B] tensor of exit layers per call

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        r = early_exit(self.model, x, t, y, self.policy)
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
