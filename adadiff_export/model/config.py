"""Model configurations: one dataclass and the named presets the CLI knows."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict

TOKEN_ORDERS = ("time_first", "label_first")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a U-ViT with AdaDiff uncertainty modules.

    `depth` must be odd (k in blocks, one mid block, k out blocks).
    `num_classes` = 0 builds an unconditional model; otherwise one extra
    embedding row (index `num_classes`) is the null class used by
    classifier-free guidance.

    The last four fields are conventions, so that a checkpoint converted from the authors' code
    (`model/convert.py`) computes their function exactly; the defaults are this repository's own:
    `time_scale` (the sinusoid is of t * time_scale; the authors' continuous-time models use 999),
    `time_mlp` (the time embedding is an MLP over the sinusoid; False: the raw sinusoid, the
    authors' `mlp_time_embed=False`), `qkv_bias` (the authors' released configs: False) and
    `token_order` ("time_first": [time, class, patches]; "label_first": the authors' [class, time,
    patches]).
    """

    img_size: int = 28
    in_chans: int = 1
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 13
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    time_scale: float = 1000.0
    time_mlp: bool = True
    qkv_bias: bool = True
    token_order: str = "time_first"

    def __post_init__(self) -> None:
        if self.depth < 1 or self.depth % 2 == 0:
            raise ValueError(f"depth must be odd and positive, got {self.depth}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a positive number, got {self.time_scale}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_extra_tokens(self) -> int:
        """Time token plus the class token when conditional."""
        return 1 + (1 if self.num_classes > 0 else 0)

    @property
    def num_tokens(self) -> int:
        return self.num_extra_tokens + self.num_patches

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    @property
    def num_in_blocks(self) -> int:
        return self.depth // 2

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: Dict[str, ModelConfig] = {
    # For tests: runs in milliseconds.
    "tiny": ModelConfig(img_size=8, in_chans=1, patch_size=2, embed_dim=32, depth=5, num_heads=2, num_classes=10),
    # 28x28 grayscale (Fashion-MNIST); the shipped checkpoint.
    "small": ModelConfig(img_size=28, in_chans=1, patch_size=4, embed_dim=96, depth=13, num_heads=4, num_classes=10),
    # The paper's U-ViT-S shapes, for users with a GPU.
    "uvit-s-cifar10": ModelConfig(img_size=32, in_chans=3, patch_size=2, embed_dim=512, depth=13, num_heads=8, num_classes=10),
    "uvit-s-celeba64": ModelConfig(img_size=64, in_chans=3, patch_size=4, embed_dim=512, depth=13, num_heads=8, num_classes=0),
}


def preset(name: str) -> ModelConfig:
    """Return the named configuration or raise with the list of names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}") from None
