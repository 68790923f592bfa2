"""Quality measures: class accuracy, FD, prediction error, and the per-layer error of Figure 1.

FD here is the Frechet distance between Gaussians fitted to the features of the project's own
small Fashion-MNIST classifier (`adadiff_export.quality.classifier`). It is NOT Inception FID: compare
FD values only with other FD values measured with the same shipped classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..model.checkpoint import SHIPPED_CLASSIFIER, CheckpointError, read_weights_only
from ..model.uvit import UViT
from .classifier import FORMAT, VERSION, ClassifierConfig, FashionClassifier, predict_in_batches

FD_NOTE = "FD is measured in the shipped Fashion-MNIST classifier's feature space (not Inception FID)"


@dataclass
class GaussianStats:
    """Mean [F] and covariance [F, F] of a feature set (float64)."""

    mean: Tensor
    cov: Tensor
    n: int = 0


@dataclass
class LoadedClassifier:
    model: FashionClassifier
    test_stats: GaussianStats
    test_accuracy: float
    path: Path


def load_classifier(path: Optional[Path] = None) -> LoadedClassifier:
    """Load the quality-measure classifier (the shipped one when `path` is None), weights only."""
    path = Path(path) if path is not None else SHIPPED_CLASSIFIER
    raw = read_weights_only(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"{path} is not an adadiff classifier ({FORMAT!r} version {VERSION})")
    try:
        model = FashionClassifier(ClassifierConfig(**raw["config"]))
        model.load_state_dict(raw["weights"], strict=True)
        feats = raw["test_features"]
        stats = GaussianStats(feats["mean"].double(), feats["cov"].double(), int(feats["n"]))
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"classifier {path} is damaged or does not match its config: {str(e).splitlines()[0]}") from None
    return LoadedClassifier(model.eval(), stats, float(raw.get("test_accuracy", float("nan"))), path)


def fd_note(clf: LoadedClassifier) -> str:
    """What FD means with this classifier (FD_NOTE for the shipped one)."""
    if clf.path == SHIPPED_CLASSIFIER:
        return FD_NOTE
    return f"FD is measured in the feature space of classifier {clf.path.name} (not Inception FID)"


def measurable(clf: LoadedClassifier, img_size: int, in_chans: int, num_classes: int) -> Optional[str]:
    """Check, before any sampling, that `clf` can measure a model's images; returns None when class accuracy
    is measurable too, else why not (FD still is). Images of another shape raise CheckpointError saying how
    to train a classifier for them."""
    c = clf.model.config
    if (c.img_size, c.in_chans) != (img_size, in_chans):
        raise CheckpointError(
            f"classifier {clf.path.name} measures {c.img_size}x{c.img_size}x{c.in_chans} images, the model makes "
            f"{img_size}x{img_size}x{in_chans}: train one on your data (`python -m adadiff_export classifier "
            "--data images.npz|folder/ --out clf.pt`, labelled) and pass --classifier clf.pt")
    if num_classes == 0:
        return "the model is unconditional: no classes to check; FD only"
    if c.num_classes != num_classes:
        return (f"the model has {num_classes} classes, classifier {clf.path.name} {c.num_classes}: accuracy "
                "needs the same classes; FD only")
    return None


def gaussian_stats(feats: Tensor) -> GaussianStats:
    """Fit a Gaussian to features [N, F] (N >= 2)."""
    f = feats.detach().double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, F], got shape {tuple(f.shape)}")
    return GaussianStats(f.mean(dim=0), torch.cov(f.T), int(f.shape[0]))


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), via scipy's sqrtm (float64)."""
    import warnings

    from scipy import linalg

    mu1, mu2 = a.mean.numpy(), b.mean.numpy()
    c1, c2 = a.cov.numpy(), b.cov.numpy()
    with warnings.catch_warnings():
        # ReLU features can have dead units (singular covariance); the offset below handles it.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(c1 @ c2)
        if not np.isfinite(covmean).all():
            offset = np.eye(c1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((c1 + offset) @ (c2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] and [M, F]."""
    return frechet_distance_from_stats(gaussian_stats(feats_a), gaussian_stats(feats_b))


@torch.no_grad()
def classifier_features(clf: LoadedClassifier, images: Tensor) -> Tensor:
    """Penultimate-layer features [N, F] of images in [-1, 1]."""
    return predict_in_batches(clf.model.features, images.float())


def fd_to_test_set(clf: LoadedClassifier, images: Tensor) -> float:
    """FD of `images` to the real Fashion-MNIST test set, in the classifier's feature space (not Inception FID)."""
    return frechet_distance_from_stats(gaussian_stats(classifier_features(clf, images)), clf.test_stats)


@torch.no_grad()
def class_accuracy(clf: LoadedClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of class-conditional samples the classifier assigns to the class they were drawn for."""
    pred = predict_in_batches(clf.model, images.float()).argmax(dim=1)
    return float((pred == labels).float().mean())


def prediction_mse(a: Tensor, b: Tensor) -> float:
    """Mean squared error between two predictions (e.g. early-exit eps against full-depth eps)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(((a.double() - b.double()) ** 2).mean())


@torch.no_grad()
def per_layer_error(model: UViT, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
    """[N] mean squared error of each layer's prediction eps_i = g(h_i) against the final layer's eps_N.

    The paper's Figure 1: how far an exit after layer i is from the full-depth prediction. The last
    entry is 0 by definition.
    """
    eps = model.forward_all_layers(x, t, y).eps_layers
    return torch.tensor([prediction_mse(e, eps[-1]) for e in eps], dtype=torch.float64)
