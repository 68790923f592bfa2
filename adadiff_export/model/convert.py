"""Checkpoints from the authors' code -> adadiff checkpoints, exactly.

Two source formats, both a plain `state_dict` saved by `torch.save` (or a dict holding one, such as
`{"model": ...}` or an EMA copy; a `module.` prefix from DDP is dropped):

- `uvit`: the original U-ViT release (github.com/baofff/U-ViT, `libs/uvit.py`), the pre-trained
  pixel-space models AdaDiff fine-tunes;
- `adadiff`: the AdaDiff code (the same U-ViT plus `lte_classifer.i.lte`, one certainty module per
  block: a Linear D -> p*p*C on the patch tokens, then a sigmoid).

What is converted, so the model computes the authors' function (`ModelConfig` carries the conventions):

- names: `in_blocks.i`, `mid_block`, `out_blocks.j` -> `blocks.i`, `blocks.k`, `blocks.k+1+j` (out block j
  takes the skip of in block k-1-j, as ours does), `mlp.fc1/fc2` -> `mlp.0/2`, `final_layer` -> `final_conv`
  (an identity 3x3 convolution when the source has none: `conv=False`);
- token order [label, time, patches] (`token_order="label_first"`), the sinusoid of t * 999
  (`time_scale=999`), no time MLP unless the source has one (`mlp_time_embed`), no qkv bias unless the
  source has one;
- the label table: the authors' has `num_classes` rows and, when trained with label dropout, the null
  class is the last id (`null_class="last"`); their pixel-space training never drops labels, so by
  default (`null_class="none"`) a null row of zeros is appended and guidance is off until fine-tuned;
- certainty c = sigmoid(W h + b) -> our uncertainty u = 1 - c = sigmoid(-W h - b): the weights are negated
  (exact), and the UEM's time-embedding half is zero (their module does not read the time);
- defaults: the authors' exit threshold tau on mean certainty -> ours 1 - tau on mean uncertainty, under
  their rule (policy `uem-authors`); their guidance eps_c + s (eps_c - eps_u) -> ours w = 1 + s.

Refused, with what is missing named: text-conditioned models (no text encoder) and latent models (no
autoencoder, nor the discrete-time schedule of the released latent models). The number of heads is not
in the weights: `heads` (default D / 64, as in every released config).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import UserError
from ..files import sha256_file
from .config import ModelConfig
from .schedule import VPSchedule

FORMATS = ("uvit", "adadiff")
NULL_CLASS_CHOICES = ("none", "last")
DEFAULT_TAU = 0.9     # the AdaDiff configs' exit_threshold
AUTHORS_TIME_SCALE = 999.0  # sde.ScoreModel.predict: nnet(x, t * 999)
HEAD_WIDTH = 64       # the released configs use num_heads = D / 64
WRAPPER_KEYS = ("ema", "nnet_ema", "model_ema", "model", "nnet", "state_dict", "net", "params")
STRIP_PREFIXES = ("module.", "_orig_mod.")
BLOCK_PARTS = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "norm2",
               "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2", "skip_linear": "skip_linear"}


class ConvertError(UserError, ValueError):
    """The file is not a checkpoint of the authors' code that adadiff can run; nothing was written."""


@dataclass(frozen=True)
class ConvertOptions:
    fmt: str = "auto"                 # auto | uvit | adadiff
    heads: Optional[int] = None       # None: D / 64
    null_class: str = "none"          # none | last (see the module docstring)
    tau: float = DEFAULT_TAU          # the authors' exit threshold on mean certainty
    scale: float = 0.0                # the authors' guidance scale s (ours: 1 + s)
    seed: int = 0                     # fresh UEMs of a U-ViT without certainty modules

    def __post_init__(self) -> None:
        if self.fmt not in ("auto",) + FORMATS:
            raise ValueError(f"--from must be one of auto, {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.heads is not None and self.heads < 1:
            raise ValueError(f"--heads must be >= 1, got {self.heads}")
        if self.null_class not in NULL_CLASS_CHOICES:
            raise ValueError(f"--null-class must be one of {NULL_CLASS_CHOICES}, got {self.null_class!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"--tau is a certainty threshold in [0, 1], got {self.tau}")
        if not self.scale >= 0.0:
            raise ValueError(f"--scale must be >= 0, got {self.scale}")


@dataclass
class Converted:
    """An adadiff checkpoint payload (config, schedule, ema, defaults, provenance) and what was found."""

    payload: Dict[str, Any]
    fmt: str
    notes: List[str] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.payload["config"])

    def describe(self) -> str:
        """One line per fact a user should know: what was detected, and what it means."""
        return "\n".join(self.notes)


class NotAUViT(ConvertError):
    """The file holds no U-ViT state dict at all."""


def _refuse(what: str) -> ConvertError:
    return ConvertError(f"{what}; nothing was written")


def find_state_dict(raw: Any) -> Tuple[Dict[str, Tensor], str]:
    """The U-ViT state dict inside `raw` and where it was: "" (the file is one), or the wrapper key.

    EMA copies are preferred over training weights when a file holds both.
    """
    def clean(d: Dict[str, Any]) -> Optional[Dict[str, Tensor]]:
        if not isinstance(d, dict) or not d or not all(isinstance(k, str) for k in d):
            return None
        out = {}
        for k, v in d.items():
            for p in STRIP_PREFIXES:
                while k.startswith(p):
                    k = k[len(p):]
            out[k] = v
        return out if "patch_embed.proj.weight" in out and all(isinstance(v, Tensor) for v in out.values()) else None

    sd = clean(raw)
    if sd is not None:
        return sd, ""
    if isinstance(raw, dict):
        for key in WRAPPER_KEYS + tuple(k for k in raw if k not in WRAPPER_KEYS):
            sd = clean(raw.get(key)) if isinstance(key, str) else None
            if sd is not None:
                return sd, key
    raise NotAUViT("no U-ViT state dict found (no 'patch_embed.proj.weight', at the top level or under "
                       f"one of {', '.join(WRAPPER_KEYS)})")


def _indices(sd: Dict[str, Tensor], prefix: str) -> List[int]:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _refuse_unsupported(sd: Dict[str, Tensor]) -> None:
    """Text-conditioned and latent models: one message naming everything adadiff lacks for them."""
    in_chans = sd["patch_embed.proj.weight"].shape[1]
    if "context_embed.weight" in sd:
        raise _refuse("this is a text-to-image U-ViT (context_embed: CLIP text tokens, as in the MS-COCO model); "
                      "adadiff cannot run it: it has no text encoder (CLIP) to make the context tokens, no "
                      "autoencoder to decode its latents, and not the discrete-time schedule (t in 1..1000, Stable "
                      "Diffusion's betas) it was trained with")
    if in_chans == 4:
        raise _refuse("this U-ViT takes 4-channel inputs: a latent model (ImageNet 256/512 style, on Stable "
                      "Diffusion's autoencoder latents); adadiff runs pixel-space models only: it has no "
                      "autoencoder to encode and decode the latents, and not the discrete-time schedule (t in "
                      "1..1000, Stable Diffusion's betas) of the released latent models")


def _infer(sd: Dict[str, Tensor], opts: ConvertOptions) -> Tuple[ModelConfig, str, List[str]]:
    """The config the shapes imply, the format, and notes on what was inferred."""
    notes: List[str] = []
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise _refuse(f"patch_embed.proj.weight has shape {tuple(w.shape)}, not a square patch convolution")
    d, in_chans, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    conditional = "label_emb.weight" in sd
    rows = int(sd["label_emb.weight"].shape[0]) if conditional else 0
    extras = 2 if conditional else 1
    if "pos_embed" not in sd:
        raise _refuse("the state dict has no pos_embed")
    tokens = int(sd["pos_embed"].shape[1])
    grid = int(round((tokens - extras) ** 0.5))
    if grid < 1 or grid * grid != tokens - extras:
        raise _refuse(f"pos_embed holds {tokens} tokens, not {extras} extra tokens plus a square grid of patches")
    k = len(_indices(sd, "in_blocks"))
    if _indices(sd, "in_blocks") != list(range(k)) or _indices(sd, "out_blocks") != list(range(k)):
        raise _refuse(f"in_blocks {_indices(sd, 'in_blocks')} and out_blocks {_indices(sd, 'out_blocks')} are not "
                      "0..k-1 each")
    if "mid_block.norm1.weight" not in sd:
        raise _refuse("the state dict has no mid_block")
    if k and "out_blocks.0.skip_linear.weight" not in sd:
        raise _refuse("the out blocks have no skip_linear: a U-ViT without long skips (skip=False), which adadiff's "
                      "U-ViT does not model")
    depth = 2 * k + 1
    hidden = int(sd["mid_block.mlp.fc1.weight"].shape[0])
    ratio = hidden / d
    if int(d * ratio) != hidden:
        raise _refuse(f"mlp hidden width {hidden} is not int({d} * ratio) for any ratio")
    heads = opts.heads
    if heads is None:
        if d % HEAD_WIDTH:
            raise _refuse(f"the number of heads is not in the weights and width {d} is not a multiple of "
                          f"{HEAD_WIDTH} (the released configs use D / {HEAD_WIDTH}); pass --heads")
        heads = d // HEAD_WIDTH
        notes.append(f"heads: {heads} (width {d} / {HEAD_WIDTH}, the released configs' rule; the weights do not "
                     "say: pass --heads if yours differ)")
    if d % heads:
        raise _refuse(f"width {d} is not a multiple of --heads {heads}")
    lte = _indices(sd, "lte_classifer")
    has_lte = bool(lte)
    fmt = opts.fmt
    if fmt == "auto":
        fmt = "adadiff" if has_lte else "uvit"
    elif fmt == "adadiff" and not has_lte:
        raise _refuse("--from adadiff, but the state dict has no certainty modules (lte_classifer.i.lte); "
                      "it is a plain U-ViT (--from uvit)")
    if has_lte and lte != list(range(depth)):
        raise _refuse(f"lte_classifer holds modules {lte}, want one per block (0..{depth - 1})")
    if rows and opts.null_class == "last" and rows < 2:
        raise _refuse("--null-class last needs at least one class besides the null class")
    num_classes = (rows - 1 if opts.null_class == "last" else rows) if conditional else 0
    cfg = ModelConfig(img_size=grid * p, in_chans=in_chans, patch_size=p, embed_dim=d, depth=depth,
                      num_heads=heads, mlp_ratio=ratio, num_classes=num_classes, time_scale=AUTHORS_TIME_SCALE,
                      time_mlp="time_embed.0.weight" in sd, qkv_bias="mid_block.attn.qkv.bias" in sd,
                      token_order="label_first")
    return cfg, fmt, notes


def _map_state(sd: Dict[str, Tensor], cfg: ModelConfig, fmt: str, fresh: Dict[str, Tensor],
               null_class: str) -> Dict[str, Tensor]:
    """Our state dict from theirs; every one of their tensors is used once, every one of ours is filled."""
    k = cfg.num_in_blocks
    used = set()
    out: Dict[str, Tensor] = {}

    def take(src: str) -> Tensor:
        if src not in sd:
            raise _refuse(f"the state dict has no {src}")
        used.add(src)
        return sd[src].detach().to(torch.float32)

    def copy(dst: str, src: str) -> None:
        out[dst] = take(src)

    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        copy(name.replace(".proj", ""), name)
    copy("pos_embed", "pos_embed")
    if cfg.time_mlp:
        for part in ("0.weight", "0.bias", "2.weight", "2.bias"):
            copy(f"time_embed.{part}", f"time_embed.{part}")
    if cfg.num_classes:
        table = take("label_emb.weight")
        if null_class == "none":  # an untrained null class, learned by fine-tuning with label dropout
            table = torch.cat([table, torch.zeros(1, table.shape[1])])
        out["label_emb.weight"] = table
    blocks = [f"in_blocks.{i}" for i in range(k)] + ["mid_block"] + [f"out_blocks.{j}" for j in range(k)]
    for i, src in enumerate(blocks):
        for theirs, ours in BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                if f"{src}.{theirs}.{kind}" in sd:
                    copy(f"blocks.{i}.{ours}.{kind}", f"{src}.{theirs}.{kind}")
    for name in ("norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias"):
        copy(name, name)
    if "final_layer.weight" in sd:
        copy("final_conv.weight", "final_layer.weight")
        copy("final_conv.bias", "final_layer.bias")
    else:  # conv=False: nn.Identity, which a 3x3 convolution with a centred 1 computes exactly
        c = cfg.in_chans
        weight = torch.zeros(c, c, 3, 3)
        weight[torch.arange(c), torch.arange(c), 1, 1] = 1.0
        out["final_conv.weight"], out["final_conv.bias"] = weight, torch.zeros(c)
    for i in range(cfg.depth):
        if fmt == "adadiff":
            # certainty c = sigmoid(W h + b); uncertainty u = 1 - c = sigmoid(-W h - b); no time input.
            weight, bias = take(f"lte_classifer.{i}.lte.weight"), take(f"lte_classifer.{i}.lte.bias")
            out[f"uems.{i}.proj.weight"] = torch.cat([-weight, torch.zeros_like(weight)], dim=1)
            out[f"uems.{i}.proj.bias"] = -bias
        else:
            out[f"uems.{i}.proj.weight"] = fresh[f"uems.{i}.proj.weight"]
            out[f"uems.{i}.proj.bias"] = fresh[f"uems.{i}.proj.bias"]
    left = sorted(set(sd) - used)
    if fmt == "uvit":
        left = [name for name in left if not name.startswith("lte_classifer.")]
    if left:
        raise _refuse(f"{len(left)} tensors of the state dict have no place in adadiff's U-ViT (first: "
                      f"{', '.join(left[:4])}); a variant of U-ViT this converter does not know")
    missing = sorted(set(fresh) - set(out))
    if missing:
        raise _refuse(f"the state dict lacks {', '.join(missing[:4])}")
    for name, tensor in out.items():
        if tuple(tensor.shape) != tuple(fresh[name].shape):
            raise _refuse(f"{name}: shape {tuple(tensor.shape)} does not fit the inferred config "
                          f"(want {tuple(fresh[name].shape)})")
    return out


def convert_raw(raw: Any, source: Optional[Path] = None, sha256: Optional[str] = None,
                opts: ConvertOptions = ConvertOptions()) -> Converted:
    """Convert what `torch.load(..., weights_only=True)` returned; raises ConvertError naming the problem."""
    from .uvit import UViT

    sd, where = find_state_dict(raw)
    _refuse_unsupported(sd)
    cfg, fmt, notes = _infer(sd, opts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        fresh = UViT(cfg).state_dict()
    state = _map_state(sd, cfg, fmt, fresh, opts.null_class)
    model = UViT(cfg)
    model.load_state_dict(state, strict=True)
    shape = (f"{cfg.img_size}x{cfg.img_size}x{cfg.in_chans}, patch {cfg.patch_size}, width {cfg.embed_dim}, "
             f"{cfg.depth} blocks, {cfg.num_heads} heads, "
             + (f"{cfg.num_classes} classes" if cfg.num_classes else "unconditional"))
    name = "AdaDiff (U-ViT with certainty modules)" if fmt == "adadiff" else "U-ViT (no certainty modules)"
    lines = [f"detected: {name} state dict" + (f" under '{where}'" if where else "") + f": {shape}",
             "conventions carried: tokens [label, time, patches], sinusoid of t * 999, "
             + ("time MLP" if cfg.time_mlp else "no time MLP") + ", "
             + ("qkv bias" if cfg.qkv_bias else "no qkv bias")
             + ("" if "final_layer.weight" in sd else ", no final conv (identity)")]
    lines += notes
    guidance = 1.0
    if cfg.num_classes:
        if opts.null_class == "last":
            guidance = 1.0 + opts.scale
            lines.append(f"label table: {cfg.num_classes} classes + null class {cfg.num_classes} (the last row); "
                         f"guidance w = 1 + s = {guidance:g}")
        else:
            lines.append(f"label table: {cfg.num_classes} classes, no null class (the authors' pixel-space training "
                         "never drops labels); a null row of zeros was appended, so classifier-free guidance is off "
                         "(w = 1) until `train --init` learns it; pass --null-class last if the last row is one")
            if opts.scale:
                lines.append(f"--scale {opts.scale:g} ignored: there is no null class to guide with")
    threshold = round(1.0 - opts.tau, 12)
    if fmt == "adadiff":
        defaults = {"policy": "uem-authors", "granularity": "batch", "threshold": threshold, "patience": 1,
                    "guidance": guidance}
        lines.append(f"certainty modules -> uncertainty modules (u = 1 - c, weights negated); default exit: the "
                     f"authors' rule (policy uem-authors) at threshold 1 - tau = {threshold:g} (tau {opts.tau:g})")
    else:
        defaults = {"policy": "static", "layer": 0, "threshold": threshold, "guidance": guidance}
        lines.append(f"no certainty modules: the UEMs are freshly initialised (seed {opts.seed}, u ~ 0.5 everywhere), "
                     "so early exit means nothing yet and the default is full depth; fine-tune them with "
                     "`python -m adadiff_export train --init THIS_FILE --data ...` (the paper's recipe)")
    provenance = {"converted_from": {
        "format": fmt, "file": source.name if source is not None else None, "sha256": sha256,
        "state_dict": where or "(top level)", "heads": cfg.num_heads,
        "heads_from": "--heads" if opts.heads is not None else f"width / {HEAD_WIDTH}",
        "null_class": opts.null_class if cfg.num_classes else None, "tau": opts.tau, "scale": opts.scale,
        "uems": "certainty modules negated" if fmt == "adadiff" else f"fresh (seed {opts.seed})",
        "converter": "python -m adadiff_export convert"}}
    payload = {"config": cfg.to_dict(), "schedule": VPSchedule().to_dict(), "ema": state, "step": 0,
               "defaults": defaults, "provenance": provenance}
    return Converted(payload, fmt, lines)


def convert_file(src: Path, opts: ConvertOptions = ConvertOptions()) -> Converted:
    """Read `src` safely (weights only) and convert it."""
    from .checkpoint import is_adadiff, read_weights_only

    src = Path(src)
    raw = read_weights_only(src)
    if is_adadiff(raw):
        raise ConvertError(f"{src} is already an adadiff checkpoint")
    return convert_raw(raw, src, sha256_file(src), opts)
