"""AdaDiff's joint loss: L_simple + lambda * L_u + beta * L_UAL (docs/ARCHITECTURE.md, "The model")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from ..model.schedule import VPSchedule
from ..model.uvit import UViT


@dataclass(frozen=True)
class LossConfig:
    kind: str = "joint"       # "joint" or "simple"
    lambda_u: float = 1.0     # weight of the uncertainty regression term
    beta_ual: float = 1.0     # weight of the uncertainty-aware layer-wise term
    # Weight of a plain layer-wise term sum_{i<N} mean((eps_i - eps)^2), not in the paper (0 = the paper's
    # loss). From scratch the UAL term has a fixed point where u_i -> 1 exactly on the pixels an intermediate
    # layer gets wrong, so (1 - u_i) mutes the error it should fix; an unweighted share keeps pushing.
    gamma_layer: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("joint", "simple"):
            raise ValueError(f"loss must be 'joint' or 'simple', got {self.kind!r}")
        if min(self.lambda_u, self.beta_ual, self.gamma_layer) < 0:
            raise ValueError("loss weights must be >= 0")


def joint_loss_terms(eps_layers, u_maps, noise: Tensor) -> Dict[str, Tensor]:
    """The three terms from per-layer predictions eps_i and uncertainty maps u_i.

    L_simple = mean((eps_N - eps)^2)
    L_u      = sum_i mean((u_i - tanh|eps_i - eps|)^2), pseudo label detached
    L_UAL    = sum_{i<N} mean((1 - u_i) * (eps_i - eps)^2)
    L_layer  = sum_{i<N} mean((eps_i - eps)^2)   (LossConfig.gamma_layer; not in the paper)
    """
    n = len(eps_layers)
    simple = torch.mean((eps_layers[-1] - noise) ** 2)
    l_u = noise.new_zeros(())
    l_ual = noise.new_zeros(())
    l_layer = noise.new_zeros(())
    for i in range(n):
        err = eps_layers[i] - noise
        target = torch.tanh(err.abs()).detach()
        l_u = l_u + torch.mean((u_maps[i] - target) ** 2)
        if i < n - 1:
            sq = err ** 2
            l_ual = l_ual + torch.mean((1 - u_maps[i]) * sq)
            l_layer = l_layer + torch.mean(sq)
    return {"simple": simple, "u": l_u, "ual": l_ual, "layer": l_layer}


def diffusion_loss(
    model: torch.nn.Module,
    base: UViT,
    schedule: VPSchedule,
    x0: Tensor,
    y: Optional[Tensor],
    cfg: LossConfig,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """Sample t and noise, run the model, return the loss terms and `total`.

    `model` is what is called (possibly a DDP wrapper around an `AllLayers(base)`
    for the joint loss, or around `base` for the simple one).
    """
    b = x0.shape[0]
    t = torch.rand(b, generator=generator) * (1 - schedule.t_eps) + schedule.t_eps
    noise = torch.randn(x0.shape, generator=generator)
    xt = schedule.add_noise(x0, t, noise)
    if cfg.kind == "simple":
        simple = torch.mean((model(xt, t, y) - noise) ** 2)
        return {"simple": simple, "total": simple}
    out = model(xt, t, y)
    terms = joint_loss_terms(out.eps_layers, out.u_maps, noise)
    terms["total"] = (terms["simple"] + cfg.lambda_u * terms["u"] + cfg.beta_ual * terms["ual"]
                      + cfg.gamma_layer * terms["layer"])
    if cfg.gamma_layer == 0:
        del terms["layer"]  # not part of this loss: keep it off the progress bar and the log
    return terms


class AllLayers(torch.nn.Module):
    """Makes `forward_all_layers` the module's forward, so DDP's hooks see it."""

    def __init__(self, base: UViT) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None):
        return self.base.forward_all_layers(x, t, y)
