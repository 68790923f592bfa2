"""`python -m adadiff_export train`: train a U-ViT with AdaDiff's joint loss (or the plain one)."""
from __future__ import annotations

import argparse
from pathlib import Path


# flag, ModelConfig field, help
SHAPE_FLAGS = (
    ("--img-size", "img_size", "image size (square)"),
    ("--channels", "in_chans", "image channels (1 grayscale, 3 colour)"),
    ("--patch", "patch_size", "patch size (divides the image size)"),
    ("--width", "embed_dim", "token width D"),
    ("--depth", "depth", "blocks (odd: k in, 1 mid, k out)"),
    ("--heads", "num_heads", "attention heads (divides the width)"),
    ("--classes", "num_classes", "classes (0: an unconditional model; otherwise a null class is added for guidance)"),
)


def add_parser(sub) -> None:
    """Register `train`."""
    p = sub.add_parser(
        "train", help="train a U-ViT with AdaDiff's joint loss",
        description="Train a U-ViT with AdaDiff uncertainty modules. The joint loss is "
                    "L_simple + lambda*L_u + beta*L_UAL; --loss simple trains the plain baseline. "
                    "Under torchrun it trains data-parallel (gloo on CPU).")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="folder for ckpt.pt, log.jsonl and sample grids")
    p.add_argument("--config", default=None,
                   help="named model config: tiny, small (default), uvit-s-cifar10, uvit-s-celeba64; with --init or "
                        "--resume the checkpoint's own shape is trained")
    shape = p.add_argument_group("custom shape (set over --config; with --init they must match its shape)")
    for flag, name, what in SHAPE_FLAGS:
        shape.add_argument(flag, dest=name, type=int, default=None, help=what)
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', an .npz file or a folder of images")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps in total (resume continues to this count)")
    p.add_argument("--batch-size", type=int, default=128, help="per-process batch size")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--loss", choices=["joint", "simple"], default="joint")
    p.add_argument("--lambda-u", type=float, default=1.0, help="weight of the uncertainty regression term L_u")
    p.add_argument("--beta-ual", type=float, default=1.0, help="weight of the uncertainty-aware layer-wise term L_UAL")
    p.add_argument("--gamma-layer", type=float, default=0.0,
                   help="weight of a plain (unweighted) layer-wise term, NOT in the paper (default 0: the paper's "
                        "loss); keeps intermediate layers learning where the UEM has settled at u ~ 1")
    p.add_argument("--init", type=Path,
                   help="start from this checkpoint's weights and shape: the paper's fine-tuning recipe (an adadiff "
                        "checkpoint, or a U-ViT / AdaDiff state dict of the authors' code, converted in memory)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    p.add_argument("--reset-uems", action="store_true",
                   help="re-initialise the uncertainty modules after loading (--resume or --init): re-fits UEMs "
                        "whose sigmoids saturated while the layers' errors were large (e.g. after changing the loss)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the periodic sample grids (stored as the default; an unconditional model stores 1)")
    p.add_argument("--sample-every", type=int, default=1000, help="write a sample grid every N steps (0: never)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this much wall time (0: no limit)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from ..training.losses import LossConfig
    from ..training.train import TrainConfig, train

    shape = {name: getattr(a, name) for _, name, _ in SHAPE_FLAGS if getattr(a, name) is not None}
    cfg = TrainConfig(
        out=a.out, config=a.config, shape=shape, data=a.data, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
        warmup=a.warmup, ema_decay=a.ema_decay, grad_clip=a.grad_clip,
        loss=LossConfig(a.loss, a.lambda_u, a.beta_ual, a.gamma_layer), init=a.init, resume=a.resume, reset_uems=a.reset_uems, seed=a.seed,
        guidance=a.guidance, sample_every=a.sample_every, save_every=a.save_every, threads=a.threads,
        max_minutes=a.max_minutes,
    )
    path = train(cfg, log_line=print)
    print(f"checkpoint: {path}")
    return 0
