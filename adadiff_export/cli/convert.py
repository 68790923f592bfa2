"""`python -m adadiff_export convert`: a checkpoint of the authors' code (U-ViT, AdaDiff) -> an adadiff checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register `convert`."""
    from ..model.convert import DEFAULT_TAU, NULL_CLASS_CHOICES

    p = sub.add_parser(
        "convert", help="convert a U-ViT or AdaDiff checkpoint of the authors' code into an adadiff checkpoint",
        description="Read a state dict saved by the authors' code (the original U-ViT release, or AdaDiff's U-ViT "
                    "with a certainty module per block; a dict holding one, e.g. {'model': ...} or an EMA copy, "
                    "works too) with weights_only=True, infer the config from the shapes, map the weights exactly "
                    "and write an adadiff checkpoint that computes the same function. build, sample, evaluate and "
                    "train --init also take such a file directly (converting in memory with the defaults below).")
    p.add_argument("source", type=Path, help="the authors' checkpoint (e.g. nnet_ema.pth, cifar10_uvit_small.pth)")
    p.add_argument("-o", "--out", type=Path, required=True, help="adadiff checkpoint to write")
    p.add_argument("--from", dest="fmt", choices=["auto", "uvit", "adadiff"], default="auto",
                   help="source format (auto: adadiff when it has certainty modules lte_classifer.i, else uvit; "
                        "uvit on an AdaDiff file drops its certainty modules for fresh UEMs)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (not stored in the weights; default width / 64, as every released config)")
    p.add_argument("--null-class", choices=list(NULL_CLASS_CHOICES), default="none",
                   help="class-conditional models: 'last' if the label table's last row is the null class of "
                        "classifier-free guidance (models trained with label dropout); 'none' (default: the "
                        "authors' pixel-space training drops no labels) appends an untrained null row, guidance off")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help=f"the authors' exit threshold on mean certainty (default {DEFAULT_TAU}, their configs; "
                        "their evaluation scripts use 0.92 / 0.95); stored as our threshold 1 - tau")
    p.add_argument("--scale", type=float, default=0.0,
                   help="the authors' guidance scale s (eps_c + s (eps_c - eps_u)); stored as our w = 1 + s")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh UEMs of a U-ViT without certainty modules")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(a: argparse.Namespace) -> int:
    from ..model.checkpoint import save
    from ..model.convert import ConvertOptions, convert_file

    opts = ConvertOptions(fmt=a.fmt, heads=a.heads, null_class=a.null_class, tau=a.tau, scale=a.scale, seed=a.seed)
    if a.out.exists() and not a.force:
        raise FileExistsError(f"{a.out} already exists; pass --force to replace it")
    if a.out.exists() and a.out.resolve() == a.source.resolve():
        raise FileExistsError(f"-o {a.out} is the source file; write the adadiff checkpoint elsewhere")
    converted = convert_file(a.source, opts)
    print(converted.describe())
    save(converted.payload, a.out)
    print(f"wrote {a.out}")
    return 0
