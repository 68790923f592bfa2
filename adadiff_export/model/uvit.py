"""U-ViT with AdaDiff uncertainty estimation modules (UEMs).

Layout (docs/ARCHITECTURE.md, "The model"): tokens are [time, class?, patches]
(or [class?, time, patches] with `token_order="label_first"`, the authors' order)
plus a learned position embedding; `depth = 2k + 1` blocks with long skips from
in block k+1-j into out block j; one output head shared by every layer; one UEM
per layer fed with the detached hidden state and time embedding.

The network can be run whole (`forward`) or one piece at a time (`stem`,
`layer`, `uncertainty`, `head`), which is what the reference early exit and the
segment exporter use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

TIME_SCALE = 1000.0  # the network sees t in [0, 1] as t * 1000 (ModelConfig.time_scale; the authors' 999)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = TIME_SCALE) -> Tensor:
    """Sinusoidal embedding of a float time vector [B] -> [B, dim], of t * scale."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] in (row, col, channel) order per patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, channels: int) -> Tensor:
    """Inverse of `patchify`: [B, L, p*p*C] -> [B, C, H, W] (square images)."""
    b, n, d = x.shape
    p = int(round(math.sqrt(d // channels)))
    g = int(round(math.sqrt(n)))
    x = x.reshape(b, g, g, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * p, g * p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block; out blocks first fuse the long skip."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool, qkv_bias: bool = True) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this out block needs its skip input")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UncertaintyModule(nn.Module):
    """UEM: u = sigmoid(W [h(token); temb] + b), one value per pixel of each patch."""

    def __init__(self, dim: int, patch_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, patch_dim)

    def forward(self, patch_tokens: Tensor, temb: Tensor) -> Tensor:
        t = temb[:, None, :].expand(-1, patch_tokens.shape[1], -1)
        return torch.sigmoid(self.proj(torch.cat([patch_tokens, t], dim=-1)))


@dataclass
class LayerOutputs:
    """Everything the joint loss needs from one pass over all layers."""

    eps_layers: List[Tensor]  # eps_i = head(h_i) for i = 1..N (the last is the model's prediction)
    u_maps: List[Tensor]      # uncertainty maps [B, C, H, W] for i = 1..N


class UViT(nn.Module):
    """U-ViT backbone with one shared output head and per-layer UEMs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        d = c.embed_dim
        self.patch_embed = nn.Conv2d(c.in_chans, d, kernel_size=c.patch_size, stride=c.patch_size)
        self.time_embed = (nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d)) if c.time_mlp
                           else nn.Identity())
        self.label_emb = nn.Embedding(c.num_classes + 1, d) if c.num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, d))
        k = c.num_in_blocks
        self.blocks = nn.ModuleList(
            [Block(d, c.num_heads, c.mlp_ratio, skip=i > k, qkv_bias=c.qkv_bias) for i in range(c.depth)]
        )
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, c.patch_dim)
        self.final_conv = nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1)
        self.uems = nn.ModuleList([UncertaintyModule(d, c.patch_dim) for _ in range(c.depth)])
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----- wiring -----------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.config.depth

    def skip_source(self, i: int) -> Optional[int]:
        """0-based index of the in block whose output feeds block `i`, or None."""
        k = self.config.num_in_blocks
        if i <= k:
            return None
        j = i - k  # out block j = 1..k
        return k - j  # in block k+1-j, 0-based

    # ----- pieces -----------------------------------------------------------
    def stem(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Image, time (float in [0, 1]) and class -> tokens [B, T, D] and time embedding [B, D]."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        temb = self.time_embed(timestep_embedding(t, self.config.embed_dim, scale=self.config.time_scale))
        extra = [temb[:, None, :]]
        if self.label_emb is not None:
            if y is None:
                raise ValueError("a class-conditional model needs y (use the null class for unconditional)")
            label = self.label_emb(y)[:, None, :]
            extra = [label] + extra if self.config.token_order == "label_first" else extra + [label]
        h = torch.cat(extra + [tokens], dim=1) + self.pos_embed
        return h, temb

    def layer(self, i: int, h: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        """Run block `i` (0-based)."""
        return self.blocks[i](h, skip)

    def uncertainty(self, i: int, h: Tensor, temb: Tensor) -> Tensor:
        """UEM of layer `i` (0-based): uncertainty map [B, C, H, W] of h_i (detached input)."""
        patches = h[:, self.config.num_extra_tokens:, :].detach()
        u = self.uems[i](patches, temb.detach())
        return unpatchify(u, self.config.in_chans)

    def head(self, h: Tensor) -> Tensor:
        """Shared output head g: hidden state -> noise prediction [B, C, H, W]."""
        return self.final_conv(self.head_image(h))

    def head_image(self, h: Tensor) -> Tensor:
        """The head up to its final convolution: hidden state -> image [B, C, H, W]."""
        x = self.decoder_pred(self.norm(h))[:, self.config.num_extra_tokens:, :]
        return unpatchify(x, self.config.in_chans)

    # ----- whole passes -----------------------------------------------------
    def run_layers(self, h: Tensor, on_layer=None) -> Tensor:
        """Run the blocks with the skip wiring; `on_layer(i, h)` sees each output.

        A truthy return from `on_layer` stops after that layer (a whole-batch exit); the
        hidden state of the last layer run is returned.
        """
        saved: List[Tensor] = []
        k = self.config.num_in_blocks
        for i in range(self.depth):
            src = self.skip_source(i)
            h = self.layer(i, h, saved[src] if src is not None else None)
            if i < k:
                saved.append(h)
            if on_layer is not None and on_layer(i, h):
                break
        return h

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Full-depth noise prediction."""
        h, _ = self.stem(x, t, y)
        return self.head(self.run_layers(h))

    def forward_all_layers(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> LayerOutputs:
        """eps_i and uncertainty map of every layer, for the joint loss."""
        h, temb = self.stem(x, t, y)
        out = LayerOutputs([], [])

        def record(i: int, hi: Tensor) -> None:
            out.eps_layers.append(self.head(hi))
            out.u_maps.append(self.uncertainty(i, hi, temb))

        self.run_layers(h, record)
        return out
