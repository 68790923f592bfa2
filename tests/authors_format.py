"""State dicts in the layout of the authors' code (U-ViT's libs/uvit.py, AdaDiff's certainty modules), with
random weights, and an independent re-computation of their forward and exit rule, written from the facts
(not from adadiff_export's model):

- keys: patch_embed.proj (p x p conv, stride p), pos_embed [1, extras + tokens, D], label_emb (num_classes
  rows), time_embed.0/.2 only with mlp_time_embed, in_blocks.i / mid_block / out_blocks.j (norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2, skip_linear on out blocks), norm, decoder_pred, final_layer (3x3 conv,
  absent with conv=False), lte_classifer.i.lte (Linear D -> p*p*C, sigmoid) per block for AdaDiff;
- tokens [label, time, patches]; the time token is the sinusoid of t * 999 (cos half first), through the
  MLP when there is one; out block j takes the skip of in block k-1-j (a stack); heads split qkv as
  (3, heads, head_dim);
- the certainty c of block i is sigmoid(lte(patch tokens)); their exit: the batch mean of c above tau exits,
  in blocks at the second trigger (not necessarily consecutive), from the mid block on at the first.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def authors_state_dict(img: int, chans: int, patch: int, width: int, k: int, rows: int, lte: bool,
                       mlp_time: bool = False, qkv_bias: bool = False, conv: bool = True, seed: int = 0,
                       lte_gain: float = 3.0) -> Dict[str, Tensor]:
    """A random state dict of U-ViT `depth=2k` (2k+1 blocks); `rows` label rows (0: unconditional)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=None):  # weights: std 0.7 / sqrt(fan in), so activations stay O(1) through the blocks
        if std is None:
            std = 0.7 / math.sqrt(shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)) if len(shape) > 1 else 0.1
        return torch.randn(*shape, generator=g) * std

    d, pd = width, patch * patch * chans
    tokens = (img // patch) ** 2 + (2 if rows else 1)
    sd = {"patch_embed.proj.weight": r(d, chans, patch, patch), "patch_embed.proj.bias": r(d),
          "pos_embed": r(1, tokens, d, std=0.3)}
    if rows:
        sd["label_emb.weight"] = r(rows, d, std=0.3)
    if mlp_time:
        sd.update({"time_embed.0.weight": r(4 * d, d), "time_embed.0.bias": r(4 * d),
                   "time_embed.2.weight": r(d, 4 * d), "time_embed.2.bias": r(d)})
    blocks = [f"in_blocks.{i}" for i in range(k)] + ["mid_block"] + [f"out_blocks.{j}" for j in range(k)]
    for name in blocks:
        sd.update({f"{name}.norm1.weight": 1 + r(d), f"{name}.norm1.bias": r(d),
                   f"{name}.attn.qkv.weight": r(3 * d, d), f"{name}.attn.proj.weight": r(d, d),
                   f"{name}.attn.proj.bias": r(d), f"{name}.norm2.weight": 1 + r(d), f"{name}.norm2.bias": r(d),
                   f"{name}.mlp.fc1.weight": r(4 * d, d), f"{name}.mlp.fc1.bias": r(4 * d),
                   f"{name}.mlp.fc2.weight": r(d, 4 * d), f"{name}.mlp.fc2.bias": r(d)})
        if qkv_bias:
            sd[f"{name}.attn.qkv.bias"] = r(3 * d)
        if name.startswith("out_blocks"):
            sd.update({f"{name}.skip_linear.weight": r(d, 2 * d), f"{name}.skip_linear.bias": r(d)})
    sd.update({"norm.weight": 1 + r(d), "norm.bias": r(d), "decoder_pred.weight": r(pd, d),
               "decoder_pred.bias": r(pd)})
    if conv:
        sd.update({"final_layer.weight": r(chans, chans, 3, 3), "final_layer.bias": r(chans)})
    if lte:
        for i in range(2 * k + 1):
            sd[f"lte_classifer.{i}.lte.weight"] = r(pd, d, std=lte_gain / math.sqrt(d))
            sd[f"lte_classifer.{i}.lte.bias"] = r(pd, std=0.3)
    return sd


def _ln(x: Tensor, sd: Dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def _lin(x: Tensor, sd: Dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _block(x: Tensor, sd: Dict[str, Tensor], name: str, heads: int, skip: Optional[Tensor]) -> Tensor:
    if skip is not None:
        x = _lin(torch.cat([x, skip], dim=-1), sd, f"{name}.skip_linear")
    b, n, d = x.shape
    qkv = _lin(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn.qkv").reshape(b, n, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, Dh]
    att = torch.softmax((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5, dim=-1)
    x = x + _lin((att @ v).transpose(1, 2).reshape(b, n, d), sd, f"{name}.attn.proj")
    hmid = F.gelu(_lin(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp.fc1"))
    return x + _lin(hmid, sd, f"{name}.mlp.fc2")


def _unpatchify(x: Tensor, chans: int) -> Tensor:
    """'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'."""
    b, n, pd = x.shape
    p, g = int(round(math.sqrt(pd // chans))), int(round(math.sqrt(n)))
    return x.reshape(b, g, g, p, p, chans).permute(0, 5, 1, 3, 2, 4).reshape(b, chans, g * p, g * p)


def authors_forward(sd: Dict[str, Tensor], x: Tensor, t: Tensor, y: Optional[Tensor],
                    heads: int) -> Tuple[List[Tensor], List[Tensor]]:
    """Every block's noise prediction (their output_forward) and certainty map (their lte), from the facts."""
    w = sd["patch_embed.proj.weight"]
    d, chans, p = w.shape[0], w.shape[1], w.shape[2]
    tokens = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    half = d // 2
    ts = t * 999  # sde.ScoreModel.predict: nnet(xt, t * 999)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = ts[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if "time_embed.0.weight" in sd:
        temb = _lin(F.silu(_lin(temb, sd, "time_embed.0")), sd, "time_embed.2")
    extra = [temb[:, None]]
    if "label_emb.weight" in sd:
        extra = [sd["label_emb.weight"][y][:, None]] + extra  # [label, time, patches]
    h = torch.cat(extra + [tokens], dim=1) + sd["pos_embed"]
    n_extra = len(extra)
    k = len({key.split(".")[1] for key in sd if key.startswith("in_blocks.")})

    def out(hh: Tensor) -> Tensor:
        z = _lin(_ln(hh, sd, "norm"), sd, "decoder_pred")[:, n_extra:]
        img = _unpatchify(z, chans)
        if "final_layer.weight" in sd:
            img = F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
        return img

    def cert(i: int, hh: Tensor) -> Tensor:
        if f"lte_classifer.{i}.lte.weight" not in sd:
            return torch.full_like(out(hh), float("nan"))
        return _unpatchify(torch.sigmoid(_lin(hh[:, n_extra:], sd, f"lte_classifer.{i}.lte")), chans)

    eps, certainty, skips = [], [], []
    for i in range(k):
        h = _block(h, sd, f"in_blocks.{i}", heads, None)
        skips.append(h)
        eps.append(out(h))
        certainty.append(cert(i, h))
    h = _block(h, sd, "mid_block", heads, None)
    eps.append(out(h))
    certainty.append(cert(k, h))
    for j in range(k):
        h = _block(h, sd, f"out_blocks.{j}", heads, skips.pop())
        eps.append(out(h))
        certainty.append(cert(k + 1 + j, h))
    return eps, certainty


def authors_exit(certainty: List[Tensor], tau: float) -> int:
    """The 1-based block their forward returns at for one batch (one call), from the per-block certainty maps.

    The rule as their loop runs it: a 'patient' flag set by the first in-block trigger, an in block exits when
    triggered with the flag already set; the mid and out blocks exit at the first trigger; the last returns.
    """
    k = (len(certainty) - 1) // 2
    patient = False
    for i, c in enumerate(certainty):
        trig = float(c.reshape(-1).mean()) > tau
        if i < k:
            if trig and patient:
                return i + 1
            patient = patient or trig
        elif trig:
            return i + 1
    return len(certainty)
