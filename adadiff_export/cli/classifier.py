"""`python -m adadiff_export classifier`: train the quality-measure classifier and store test-set statistics."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    """Register `classifier`."""
    from ..quality.classifier import ClassifierTrainConfig

    p = sub.add_parser(
        "classifier", help="train the classifier used for accuracy and FD (Fashion-MNIST, or your labelled data)",
        description="Train the small CNN whose features define FD (the Frechet distance in THIS "
                    "classifier's feature space, not Inception FID) and whose logits give class accuracy. "
                    "Stores the weights with the real test set's feature mean and covariance. `evaluate "
                    "--classifier FILE` measures a model of another shape (e.g. 32x32 colour) with one trained "
                    "here on its data.")
    p.add_argument("--data", default="fashion-mnist",
                   help="training data: 'fashion-mnist' (default), an .npz with images and labels, or a folder with "
                        "one sub-folder per class")
    p.add_argument("--test-data", default=None,
                   help="the real test set FD compares with (default: Fashion-MNIST's, else 10%% of --data held out)")
    p.add_argument("--img-size", type=int, default=32, help="image size a folder is read at (default 32)")
    p.add_argument("--channels", type=int, default=3, help="channels a folder is read at (default 3)")
    p.add_argument("--out", type=Path, required=True, help="file to write (the shipped one is adadiff_export/weights/fashion_classifier.pt)")
    p.add_argument("--epochs", type=int, default=ClassifierTrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=ClassifierTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=ClassifierTrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(func=_cmd_classifier)


def _cmd_classifier(a: argparse.Namespace) -> int:
    from ..quality.classifier import ClassifierTrainConfig, train_and_save

    cfg = ClassifierTrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads)
    acc, minutes = train_and_save(a.out, cfg, "python -m adadiff_export " + " ".join(sys.argv[1:]), a.data,
                                  a.test_data, a.img_size, a.channels)
    print(f"test accuracy {acc:.4f} after {cfg.epochs} epochs ({minutes:.1f} min); wrote {a.out}")
    return 0
