"""What calibration compares finished samples by: features whose mean shift tracks FD.

Two exit policies at the same layer budget can leave each finished sample equally far from its
full-depth counterpart and still differ in FD: FD sees the *systematic* part of the change (a
shift of the feature mean: blur, lost texture), hardly the random part. Measured on the shipped
model (500 samples, same noise): a schedule with half the per-sample error of static exit after
layer 6 had the larger FD, and the larger mean shift. So calibration scores a policy by the mean
shift of the finished samples' features against full depth, with the sampling noise of that
estimate removed (`mean_shift`).

Features: the shipped quality classifier's penultimate layer (the space FD is measured in) when
the model makes 28x28 grayscale images; otherwise a per-channel descriptor of brightness,
contrast and power in eight spatial-frequency bands, which sees blur and leftover noise in any
image.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

FeatureFn = Callable[[Tensor], Tensor]
BANDS = 8


def spectral_features(images: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C * (2 + BANDS)]: per channel mean, std and log power in radial frequency bands."""
    x = images.double()
    n, c, h, w = x.shape
    power = torch.fft.rfft2(x - x.mean(dim=(2, 3), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fy ** 2 + fx ** 2) / (0.5 * 2 ** 0.5)  # 0 .. 1 at the corner
    band = torch.clamp((radius * BANDS).long(), max=BANDS - 1)
    per_band = torch.stack([power[..., band == k].sum(-1) for k in range(BANDS)], dim=-1)  # [N, C, BANDS]
    stats = torch.stack([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=-1)
    return torch.cat([stats, torch.log1p(per_band)], dim=-1).reshape(n, -1)


def feature_fn(img_size: int, in_chans: int) -> Tuple[FeatureFn, str]:
    """The features for a model's images, and their name (for reports)."""
    if (img_size, in_chans) == (28, 1):
        from ..quality.metrics import classifier_features, load_classifier

        try:
            clf = load_classifier()
        except Exception:  # a missing or damaged classifier file: fall back to what needs none
            return spectral_features, "spectral descriptor (the quality classifier could not be loaded)"
        return (lambda images: classifier_features(clf, images).double()), "quality classifier features"
    return spectral_features, "spectral descriptor (brightness, contrast, 8 frequency bands per channel)"


def mean_shift(feats: Tensor, ref: Tensor) -> float:
    """||E[f - f_ref]||^2 / tr(Cov f_ref), estimated without the 1/n noise floor of a sample mean.

    feats and ref are paired rows (the same noise and label). The plain ||mean d||^2 is biased up
    by tr(Cov d) / n; that term is subtracted, so the estimate is unbiased (it can dip below 0
    when the true shift is ~0). Dividing by the spread of the reference makes it scale-free.
    """
    if feats.shape != ref.shape or feats.shape[0] < 2:
        raise ValueError(f"need paired features [N >= 2, F], got {tuple(feats.shape)} and {tuple(ref.shape)}")
    d = (feats - ref).double()
    n = d.shape[0]
    shift = float((d.mean(0) ** 2).sum()) - float(d.var(0).sum()) / n
    return shift / max(float(ref.double().var(0).sum()), 1e-12)
