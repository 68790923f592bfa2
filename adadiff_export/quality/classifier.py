"""A small Fashion-MNIST classifier: the feature space of the project's quality measures.

Its penultimate layer (`features`, 128 values per image) is where FD (the Frechet distance
between generated and real images) is computed, and its logits give the class accuracy of
class-conditional samples. FD in this space is NOT Inception FID: the numbers are only
comparable with other FDs measured with the same shipped classifier.

The shipped file (`adadiff_export/weights/fashion_classifier.pt`) is a plain dict loadable with
`weights_only=True`: {"format": "adadiff-classifier", "version": 1, "config": {...},
"weights": state_dict, "test_accuracy": float, "test_features": {"mean": [F], "cov": [F, F],
"n": int}, "provenance": {...}}.

Train it again with `python -m adadiff_export classifier --out PATH`.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.checkpoint import write_atomic

FORMAT = "adadiff-classifier"
VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the CNN: three conv stages, global average pooling, one hidden linear layer."""

    in_chans: int = 1
    img_size: int = 28
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class FashionClassifier(nn.Module):
    """conv-pool, conv-conv-pool, conv, global average pool, linear (features), linear (logits)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            conv(config.in_chans, w), nn.MaxPool2d(2),
            conv(w, 2 * w), conv(2 * w, 2 * w), nn.MaxPool2d(2),
            conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(4 * w, config.feature_dim), nn.ReLU())
        self.out = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images in [-1, 1], [N, C, H, W] -> penultimate-layer features [N, feature_dim]."""
        return self.fc(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> class logits [N, num_classes]."""
        return self.out(self.features(x))


@dataclass
class ClassifierTrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flips (clothes are left-right symmetric enough) and 2-pixel shifts."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


@torch.no_grad()
def predict_in_batches(fn, images: Tensor, batch_size: int = 500) -> Tensor:
    """Apply `fn` to `images` in chunks and concatenate (bounded memory)."""
    return torch.cat([fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def accuracy(model: FashionClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose arg-max class equals the label."""
    model.eval()
    pred = predict_in_batches(model, images).argmax(dim=1)
    return float((pred == labels).float().mean())


@torch.no_grad()
def feature_stats(model: FashionClassifier, images: Tensor) -> Dict[str, Any]:
    """Mean [F] and covariance [F, F] (float64) of the features of `images`."""
    model.eval()
    f = predict_in_batches(model.features, images).double()
    return {"mean": f.mean(dim=0), "cov": torch.cov(f.T), "n": int(f.shape[0])}


def train_classifier(train_images: Tensor, train_labels: Tensor, cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
                     config: ClassifierConfig = ClassifierConfig(), progress: bool = True) -> FashionClassifier:
    """Train with AdamW and a cosine learning rate; returns the model in eval mode."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = FashionClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = train_images.shape[0]
    per_epoch = n // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * per_epoch)
    bar = tqdm(total=cfg.epochs * per_epoch, desc="classifier", disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = _augment(train_images[idx], gen)
            loss = F.cross_entropy(model(x), train_labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if b % 50 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    return model.eval()


def save_classifier(model: FashionClassifier, path: Path, test_accuracy: float, stats: Dict[str, Any],
                    provenance: Dict[str, Any]) -> None:
    """Write atomically a weights_only-loadable dict (float32 weights, float64 feature statistics)."""
    payload = {
        "format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "test_accuracy": float(test_accuracy),
        "test_features": {"mean": stats["mean"].clone(), "cov": stats["cov"].clone(), "n": int(stats["n"])},
        "provenance": provenance,
    }
    write_atomic(payload, path)


def _labelled_splits(data: str, test_data: Optional[str], img_size: int, channels: int, seed: int):
    """(train, test) datasets; refuses data without at least two classes (a classifier needs labels)."""
    from ..data import DataError, Dataset, load_dataset

    if data == "fashion-mnist":
        train = load_dataset(data, split="train")
        test = load_dataset(data, split="test") if test_data is None else None
    else:
        train, test = load_dataset(data, img_size, channels), None
    if test_data is not None:
        test = load_dataset(test_data, img_size, channels, "test")
    elif test is None:  # hold out 10% of the data, the same split for the same seed
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        cut = max(2, len(train) // 10)
        test = Dataset(train.images[perm[:cut]], train.labels[perm[:cut]])
        train = Dataset(train.images[perm[cut:]], train.labels[perm[cut:]])
    if int(train.labels.max()) < 1:
        raise DataError(f"{data} has one class only: a classifier needs labels (an .npz 'labels' array, or one "
                        "sub-folder per class)")
    if tuple(test.images.shape[1:]) != tuple(train.images.shape[1:]):
        raise DataError(f"test images {tuple(test.images.shape[1:])} differ from training images "
                        f"{tuple(train.images.shape[1:])}")
    return train, test


def train_and_save(out: Path, cfg: ClassifierTrainConfig, command: str, data: str = "fashion-mnist",
                   test_data: Optional[str] = None, img_size: int = 28, channels: int = 1) -> Tuple[float, float]:
    """Train on `data` (Fashion-MNIST's training set by default, or an .npz / image folder with labels),
    measure the test set (`test_data`; Fashion-MNIST's own, else 10% of `data` held out), and write the
    classifier file `out`, whose test-set feature statistics are what FD compares samples with.

    `img_size` and `channels` are the images a folder is read at (an .npz has its own). Returns (test
    accuracy, minutes of training); `command` is recorded in the file's provenance.
    """
    train, test = _labelled_splits(data, test_data, img_size, channels, cfg.seed)
    config = ClassifierConfig(in_chans=int(train.images.shape[1]), img_size=int(train.images.shape[-1]),
                              num_classes=int(max(train.labels.max(), test.labels.max())) + 1)
    start = time.time()
    model = train_classifier(train.images, train.labels, cfg, config)
    minutes = (time.time() - start) / 60
    acc = accuracy(model, test.images, test.labels)
    stats = feature_stats(model, test.images)
    provenance = {"train": asdict(cfg), "data": data, "test_data": test_data, "minutes": round(minutes, 2), "machine": platform.processor() or platform.machine(),
                  "torch": str(torch.__version__), "command": command}
    save_classifier(model, out, acc, stats, provenance)
    return acc, minutes
