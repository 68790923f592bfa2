"""Turn a training checkpoint into the small shipped one (EMA weights in half precision).

    python scripts/ship_checkpoint.py runs/fashion_small/ckpt.pt --threshold T [--guidance W] \
        --provenance provenance.json [--out adadiff_export/weights/fashion_small.pt]

Before writing, it checks that half precision loses nothing measurable: the full-depth noise
prediction of the fp16-stored weights against the fp32 ones on noised test images, and every
layer's mean uncertainty.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adadiff_export.data import load_fashion_mnist
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.model.config import ModelConfig
from adadiff_export.model.schedule import VPSchedule
from adadiff_export.model.uvit import UViT


def _half_precision_error(raw: dict, n: int = 256) -> dict:
    config = ModelConfig.from_dict(raw["config"])
    full, half = UViT(config).eval(), UViT(config).eval()
    full.load_state_dict({k: v.float() for k, v in raw["ema"].items()})
    half.load_state_dict({k: v.half().float() for k, v in raw["ema"].items()})
    data = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    x0, y = data.images[:n], data.labels[:n]
    t = torch.rand(n, generator=g) * 0.999 + 0.001
    noise = torch.randn(x0.shape, generator=g)
    xt = VPSchedule.from_dict(raw["schedule"]).add_noise(x0, t, noise)
    with torch.no_grad():
        a, b = full.forward_all_layers(xt, t, y), half.forward_all_layers(xt, t, y)
    eps_err = float(((a.eps_layers[-1] - b.eps_layers[-1]) ** 2).mean() / (a.eps_layers[-1] ** 2).mean())
    u_err = max(float((ua.mean((1, 2, 3)) - ub.mean((1, 2, 3))).abs().max()) for ua, ub in zip(a.u_maps, b.u_maps))
    return {"eps_normalized_error": eps_err, "u_max_abs_diff": u_err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--threshold", type=float, required=True, help="default uem threshold to ship")
    p.add_argument("--guidance", type=float, default=2.0, help="default classifier-free guidance scale")
    p.add_argument("--provenance", type=Path, required=True, help="JSON file: how the checkpoint was trained")
    p.add_argument("--out", type=Path, default=ckpt.SHIPPED_CHECKPOINT)
    a = p.parse_args()
    raw = ckpt.read_raw(a.checkpoint)
    err = _half_precision_error(raw)
    print(f"half precision vs fp32 weights: eps normalized error {err['eps_normalized_error']:.2e}, "
          f"max |u| difference {err['u_max_abs_diff']:.2e}")
    provenance = json.loads(a.provenance.read_text())
    provenance["half_precision_check"] = err
    provenance["step"] = int(raw.get("step", 0))
    defaults = {"threshold": a.threshold, "guidance": a.guidance}
    ckpt.save(ckpt.shipped_payload(raw, defaults, provenance), a.out)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB), step {provenance['step']}, defaults {defaults}")


if __name__ == "__main__":
    main()
