"""The noise schedule: the continuous VP SDE with a linear beta(t) (score_sde, U-ViT's pixel models).

x_t = alpha(t) x_0 + sigma(t) eps, with log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2,
sigma(t) = sqrt(1 - alpha(t)^2), t in [t_eps, 1].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Union

import torch
from torch import Tensor

Time = Union[float, Tensor]


@dataclass(frozen=True)
class VPSchedule:
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_eps: float = 1e-3

    def beta(self, t: Time) -> Time:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Time) -> Time:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Time) -> Time:
        la = self.log_alpha(t)
        return torch.exp(la) if isinstance(la, Tensor) else math.exp(la)

    def sigma(self, t: Time) -> Time:
        a = self.alpha(t)
        return torch.sqrt(1 - a * a) if isinstance(a, Tensor) else math.sqrt(1 - a * a)

    def lambda_(self, t: Time) -> Time:
        """Half log-SNR, log(alpha / sigma)."""
        a, s = self.alpha(t), self.sigma(t)
        return torch.log(a / s) if isinstance(a, Tensor) else math.log(a / s)

    def t_of_lambda(self, lam: float) -> float:
        """Inverse of `lambda_` (closed form for the linear VP schedule)."""
        log_alpha = -0.5 * math.log1p(math.exp(-2.0 * lam))
        b0, b1 = self.beta_min, self.beta_max
        # solve 0.25 (b1-b0) t^2 + 0.5 b0 t + log_alpha = 0 for t >= 0
        if b1 == b0:
            return -2.0 * log_alpha / b0
        return (-b0 + math.sqrt(b0 * b0 - 4.0 * (b1 - b0) * log_alpha)) / (b1 - b0)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self.alpha(t).view(-1, *([1] * (x0.dim() - 1)))
        s = self.sigma(t).view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + s * noise

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "vp_linear", **asdict(self)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VPSchedule":
        d = dict(d)
        kind = d.pop("type", "vp_linear")
        if kind != "vp_linear":
            raise ValueError(f"unknown noise schedule {kind!r}")
        return cls(**d)
