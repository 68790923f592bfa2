"""The export contract's segments as torch modules (docs/ARCHITECTURE.md, "Contracts"; docs/MANIFEST.md).

Each wrapper owns nothing but a reference to the model and calls its public pieces
(`stem`, `layer`, `uncertainty`, `head`), so the exported graphs compute exactly what the
reference early exit computes; two of them in a form that runs faster on the engines
(`mean_uncertainty`, `head`), equal up to float rounding. Layers are numbered 1..N, the same numbers as exit layers.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..model.uvit import UViT
from .manifest import BATCH, Segment, TensorSpec

class StemSegment(nn.Module):
    """x, t[, y] -> h, temb."""

    def __init__(self, model: UViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.model.stem(x, t, y)


class LayerSegment(nn.Module):
    """Block i with its UEM fused in: h_in, temb[, skip] -> h_out, u[, u_map]."""

    def __init__(self, model: UViT, index: int, uncertainty_map: bool = False) -> None:
        super().__init__()
        if not 1 <= index <= model.depth:
            raise ValueError(f"layer index must be in 1..{model.depth}, got {index}")
        self.model = model
        self.index = index
        self.uncertainty_map = uncertainty_map

    def forward(self, h_in: Tensor, temb: Tensor, skip: Optional[Tensor] = None):
        i = self.index - 1
        h_out = self.model.layer(i, h_in, skip)
        if self.uncertainty_map:
            u_map = self.model.uncertainty(i, h_out, temb)
            return h_out, u_map.mean(dim=(1, 2, 3)), u_map
        return h_out, mean_uncertainty(self.model, i, h_out, temb)


def mean_uncertainty(model: UViT, i: int, h: Tensor, temb: Tensor) -> Tensor:
    """`model.uncertainty(i, h, temb).mean((1, 2, 3))` computed the cheap way, for the graphs.

    The UEM runs in every layer segment but not in `full`, so its cost is the segmented runtime's
    overhead at threshold 0 (issue 4: at most 5%). W [h; temb] + b = W_h h + (W_t temb + b): the
    temb half once per sample instead of once per token, and no expand/concat; the mean needs no
    unpatchify. Equal to the reference up to float rounding (about 1e-7 relative).
    """
    proj = model.uems[i].proj
    d = h.shape[-1]
    patches = h[:, model.config.num_extra_tokens:, :]
    z = F.linear(patches, proj.weight[:, :d]) + F.linear(temb, proj.weight[:, d:], proj.bias)[:, None, :]
    return torch.sigmoid(z).mean(dim=(1, 2))


def head(model: UViT, h: Tensor) -> Tensor:
    """`model.head(h)` for the graphs: with one image channel, the final 3x3 convolution becomes nine
    shifted multiply-adds.

    OpenVINO CPU runs a Convolution with one input and one output channel at a small fraction of
    its usual speed: it was the largest single node of a batch-1 forward of the shipped model.
    Nine scaled slices fuse into one elementwise kernel instead (`experiments/head_conv_probe.py` times
    both forms). It is equal to the convolution up to float rounding (about 1e-7 relative).
    Several channels keep the Convolution, which OpenVINO runs well.
    """
    conv = model.final_conv
    if conv.in_channels != 1:
        return model.head(h)
    x = model.head_image(h)
    rows, cols = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    w = conv.weight[0, 0]
    out = conv.bias.view(1, 1, 1, 1)
    for i in range(3):
        for j in range(3):
            out = out + w[i, j] * padded[:, :, i:i + rows, j:j + cols]
    return out


class HeadSegment(nn.Module):
    """h -> eps."""

    def __init__(self, model: UViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: Tensor) -> Tensor:
        return head(self.model, h)


class FullSegment(nn.Module):
    """x, t[, y] -> eps (the whole model, the speed baseline)."""

    def __init__(self, model: UViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        h, _ = self.model.stem(x, t, y)
        return head(self.model, self.model.run_layers(h))


def block_kind(model: UViT, index: int) -> str:
    """`in`, `mid` or `out` for the 1-based layer `index`."""
    k = model.config.num_in_blocks
    if index <= k:
        return "in"
    return "mid" if index == k + 1 else "out"


def skip_from(model: UViT, index: int) -> Optional[int]:
    """1-based in layer whose h_out feeds layer `index`'s skip input, or None."""
    src = model.skip_source(index - 1)
    return None if src is None else src + 1


def segment_specs(model: UViT, uncertainty_map: bool = False, dtype: str = "float32") -> List[Segment]:
    """Every segment of the contract in manifest order: stem, layer_1..layer_N, head, full."""
    c = model.config
    img = (BATCH, c.in_chans, c.img_size, c.img_size)
    hid = (BATCH, c.num_tokens, c.embed_dim)
    x = TensorSpec("x", dtype, img)
    t = TensorSpec("t", "float32", (BATCH,))
    stem_in = (x, t) + ((TensorSpec("y", "int64", (BATCH,)),) if c.num_classes > 0 else ())
    temb = TensorSpec("temb", dtype, (BATCH, c.embed_dim))
    eps = TensorSpec("eps", dtype, img)
    specs = [Segment("stem", "stem", stem_in, (TensorSpec("h", dtype, hid), temb))]
    for i in range(1, model.depth + 1):
        src = skip_from(model, i)
        ins = (TensorSpec("h_in", dtype, hid), temb) + ((TensorSpec("skip", dtype, hid),) if src else ())
        outs = (TensorSpec("h_out", dtype, hid), TensorSpec("u", dtype, (BATCH,)))
        if uncertainty_map:
            outs += (TensorSpec("u_map", dtype, img),)
        specs.append(Segment(f"layer_{i}", "layer", ins, outs, i, block_kind(model, i), src))
    specs.append(Segment("head", "head", (TensorSpec("h", dtype, hid),), (eps,)))
    specs.append(Segment("full", "full", stem_in, (eps,)))
    return specs


def segment_module(model: UViT, spec: Segment, uncertainty_map: bool = False) -> nn.Module:
    """The torch module that computes `spec`."""
    if spec.kind == "stem":
        return StemSegment(model)
    if spec.kind == "layer":
        assert spec.index is not None
        return LayerSegment(model, spec.index, uncertainty_map)
    if spec.kind == "head":
        return HeadSegment(model)
    if spec.kind == "full":
        return FullSegment(model)
    raise ValueError(f"unknown segment kind {spec.kind!r}")


def random_inputs(model: UViT, spec: Segment, batch: int, generator: torch.Generator) -> List[Tensor]:
    """Fresh inputs of the right shapes and plausible ranges for a parity check."""
    out: List[Tensor] = []
    for ts in spec.inputs:
        shape = ts.concrete(batch)
        if ts.name == "t":
            out.append(torch.rand(shape, generator=generator) * 0.999 + 0.001)
        elif ts.name == "y":
            out.append(torch.randint(0, model.config.num_classes + 1, shape, generator=generator))
        else:
            out.append(torch.randn(shape, generator=generator))
    return out
