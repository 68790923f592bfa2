"""Training and evaluation data: Fashion-MNIST (Debian package), an image folder, or an .npz.

Every loader returns images as float32 in [-1, 1], shape [N, C, H, W], and int64 labels
(all zeros when the source has none).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class DataError(UserError, RuntimeError):
    """The data could not be found or read; the message says what to do."""


@dataclass
class Dataset:
    images: Tensor  # [N, C, H, W] float32 in [-1, 1]
    labels: Tensor  # [N] int64

    def __len__(self) -> int:
        return self.images.shape[0]


def _fashion_dir() -> Path:
    return Path(os.environ.get("ADADIFF_FASHION_MNIST", FASHION_MNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "train") -> Dataset:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` package (28x28, 10 classes)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _fashion_dir()
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise DataError(
            f"Fashion-MNIST not found in {root}: install it with "
            "`apt-get install -y dataset-fashion-mnist` (or set ADADIFF_FASHION_MNIST to its folder)"
        )
    images = _read_idx(img_path).astype(np.float32) / 127.5 - 1.0
    labels = _read_idx(lbl_path).astype(np.int64)
    return Dataset(torch.from_numpy(images[:, None]), torch.from_numpy(labels))


def fashion_mnist_test_for(img_size: int, in_chans: int) -> Optional[Dataset]:
    """The Fashion-MNIST test set when a model takes its images (28x28, one channel) and the data is
    installed; None otherwise, where callers fall back to random images."""
    if (img_size, in_chans) != (28, 1):
        return None
    try:
        return load_fashion_mnist("test")
    except DataError:
        return None


def load_npz(path: Path) -> Dataset:
    """An .npz with `images` ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8 or float in [-1,1]) and optional `labels`."""
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z:
            raise DataError(f"{path} has no array named 'images' (found {sorted(z.files)})")
        images = z["images"]
        labels = z["labels"] if "labels" in z else np.zeros(len(images), dtype=np.int64)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 127.5 - 1.0
    return Dataset(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                   torch.from_numpy(labels.astype(np.int64)))


def load_image_folder(path: Path, img_size: int, channels: int) -> Dataset:
    """Every image under `path`; a first-level sub-folder name is the class (sorted order)."""
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found under {path}")
    classes = sorted({p.relative_to(path).parts[0] for p in files if len(p.relative_to(path).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    mode = "L" if channels == 1 else "RGB"
    arrays, labels = [], []
    for f in files:
        img = Image.open(f).convert(mode).resize((img_size, img_size), Image.BICUBIC)
        a = np.asarray(img, dtype=np.float32)
        arrays.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
        parts = f.relative_to(path).parts
        labels.append(index[parts[0]] if len(parts) > 1 else 0)
    images = np.stack(arrays) / 127.5 - 1.0
    return Dataset(torch.from_numpy(images.astype(np.float32)), torch.tensor(labels, dtype=torch.int64))


def load_dataset(spec: str, img_size: int = 28, channels: int = 1, split: str = "train") -> Dataset:
    """`fashion-mnist`, a path to an .npz, or a folder of images."""
    if spec == "fashion-mnist":
        return load_fashion_mnist(split)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {spec!r} is neither 'fashion-mnist' nor an existing .npz file or folder")
    if path.is_dir():
        return load_image_folder(path, img_size, channels)
    if path.suffix == ".npz":
        return load_npz(path)
    raise DataError(f"cannot read {path}: give an .npz file or a folder of images")


def check_shape(data: Dataset, img_size: int, channels: int) -> None:
    """Refuse data whose images do not match the model."""
    want: Tuple[int, int, int] = (channels, img_size, img_size)
    got = tuple(data.images.shape[1:])
    if got != want:
        raise DataError(f"data images have shape {got}, the model expects {want}")


def sample_batch(data: Dataset, batch_size: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    idx = torch.randint(0, len(data), (batch_size,), generator=generator)
    return data.images[idx], data.labels[idx]
