"""Image grids: tensors in [-1, 1] to PNG (or any format PIL writes) files."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    a = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return a.transpose(0, 2, 3, 1)


def grid(images: Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """Tile N images into one uint8 array [H', W', C] with `pad` pixels of white between them."""
    a = to_uint8(images)
    n, h, w, c = a.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = a[i]
    return out


def save_grid(images: Tensor, path: Path, nrow: Optional[int] = None, scale: int = 2) -> Path:
    """Write a PNG grid (upscaled `scale` times with nearest neighbour so small images stay visible)."""
    from PIL import Image

    g = grid(images, nrow)
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def check_image_path(path: Path) -> Path:
    """Refuse, before any work is done, a path `save_grid` could not write: a file ending PIL writes no
    format for, a folder, or a place inside a file or a folder that is not writable."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give an image file name such as {path / 'grid.png'}")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write an image to {path}: {path.suffix or 'no file ending'} is not an image "
                         "format PIL writes (use .png, .jpg, .bmp, .tif, .webp, ...)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not writable")
    return path
