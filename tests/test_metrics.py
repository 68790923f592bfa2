"""Quality measures: FD against closed forms, the shipped classifier on real data, per-layer error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adadiff_export.data import DataError, load_fashion_mnist
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.quality.classifier import ClassifierConfig, FashionClassifier, feature_stats, save_classifier
from adadiff_export.quality.metrics import (GaussianStats, class_accuracy, fd_to_test_set, frechet_distance,
                                    frechet_distance_from_stats, load_classifier, per_layer_error,
                                    prediction_mse)


def test_fd_closed_form_for_diagonal_gaussians():
    # FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 when both covariances are diagonal (variances s^2).
    a = GaussianStats(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.diag(torch.tensor([1.0, 4.0, 9.0])).double())
    b = GaussianStats(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), torch.diag(torch.tensor([4.0, 4.0, 1.0])).double())
    expect = (1 + 0 + 4) + ((1 - 2) ** 2 + 0 + (3 - 1) ** 2)
    assert frechet_distance_from_stats(a, b) == pytest.approx(expect, abs=1e-9)
    assert frechet_distance_from_stats(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_samples_and_degenerate_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    b = torch.randn(20000, 4, generator=g) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(4 * 1 + 4 * 1, rel=0.03)
    dead = torch.zeros(100, 4)
    dead[:, 0] = torch.randn(100, generator=g)  # three dead units: singular covariance
    assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_prediction_mse():
    assert prediction_mse(torch.zeros(2, 3), torch.full((2, 3), 2.0)) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        prediction_mse(torch.zeros(2), torch.zeros(3))


def test_per_layer_error_is_the_distance_to_the_last_layer(model):
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c.in_chans, c.img_size, c.img_size, generator=g)
    t, y = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])
    err = per_layer_error(model, x, t, y)
    with torch.no_grad():
        eps = model.forward_all_layers(x, t, y).eps_layers
    assert err.shape == (model.depth,) and float(err[-1]) == 0.0
    assert float(err[0]) == pytest.approx(float(((eps[0] - eps[-1]) ** 2).mean()), rel=1e-6)


def test_classifier_file_round_trip_and_refusals(tmp_path: Path):
    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(width=8, feature_dim=16)).eval()
    images = torch.rand(40, 1, 28, 28) * 2 - 1
    path = tmp_path / "clf.pt"
    save_classifier(clf, path, 0.5, feature_stats(clf, images), {"command": "test"})
    loaded = load_classifier(path)
    assert loaded.test_accuracy == 0.5 and loaded.test_stats.n == 40
    with torch.no_grad():
        assert torch.equal(loaded.model(images), clf(images))
    assert fd_to_test_set(loaded, images) == pytest.approx(0.0, abs=1e-6)
    foreign = tmp_path / "foreign.pt"
    ckpt.save({"config": {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not an adadiff classifier"):
        load_classifier(foreign)
    raw = torch.load(path, weights_only=True)
    raw["config"]["width"] = 4
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        load_classifier(tmp_path / "mismatch.pt")


def test_shipped_classifier_on_real_test_images():
    try:
        test = load_fashion_mnist("test")
    except DataError as e:
        pytest.skip(str(e))
    clf = load_classifier()
    assert clf.test_accuracy >= 0.88
    idx = torch.arange(0, 10000, 10)
    assert class_accuracy(clf, test.images[idx], test.labels[idx]) >= 0.87
    real = fd_to_test_set(clf, test.images[idx])
    blurred = fd_to_test_set(clf, torch.nn.functional.avg_pool2d(test.images[idx], 3, 1, 1))
    noise = fd_to_test_set(clf, torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real < 1.0 < 10 * real < blurred < noise  # FD orders real < degraded < noise


def test_colour_models_get_a_classifier_of_their_own_checked_before_sampling(tmp_path, capsys):
    """evaluate on 32x32-style colour data (here 8x8x3): the shipped 28x28 grayscale classifier is refused before
    any sampling, `classifier --data` trains one for the data, and an unconditional model gets FD only."""
    import json

    import numpy as np

    from adadiff_export.cli import main
    from authors_format import authors_state_dict

    rng = np.random.default_rng(0)
    data = tmp_path / "colour.npz"
    np.savez(data, images=rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8), labels=np.arange(60) % 3)
    clf_path = tmp_path / "clf.pt"
    assert main(["classifier", "--data", str(data), "--out", str(clf_path), "--epochs", "1", "--batch-size", "16"]) == 0
    clf = load_classifier(clf_path)
    assert (clf.model.config.img_size, clf.model.config.in_chans, clf.model.config.num_classes) == (8, 3, 3)
    cond = tmp_path / "cond.pth"
    torch.save(authors_state_dict(img=8, chans=3, patch=2, width=64, k=1, rows=4, lte=True), cond)
    conv = tmp_path / "cond.pt"
    assert main(["convert", str(cond), "-o", str(conv), "--null-class", "last", "--scale", "1"]) == 0
    capsys.readouterr()
    common = ["--n", "4", "--steps", "2", "--batch-size", "4", "--json"]
    assert main(["evaluate", str(conv), *common]) == 2
    err = capsys.readouterr().err
    assert "28x28x1" in err and "8x8x3" in err and "classifier --data" in err
    assert main(["evaluate", str(conv), *common, "--classifier", str(clf_path)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= rec["full"]["accuracy"] <= 1.0 and rec["full"]["fd"] >= 0
    uncond = tmp_path / "uncond.pth"
    torch.save(authors_state_dict(img=8, chans=3, patch=2, width=64, k=1, rows=0, lte=True), uncond)
    assert main(["evaluate", str(uncond), *common, "--classifier", str(clf_path)]) == 0
    out = capsys.readouterr().out
    rec = json.loads(out.strip().splitlines()[-1])
    assert "accuracy n/a: the model is unconditional" in out and rec["full"]["accuracy"] is None
    assert "detected: AdaDiff" in out and "converted in memory" in out  # the .pth itself, said so
    assert rec["full"]["fd"] >= 0
