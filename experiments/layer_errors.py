"""Each layer's noise prediction against the TRUE noise, and each layer's mean uncertainty, on noised test images.

The README's per-layer table: where an early exit can be trusted, and whether the UEMs say so.
(`adadiff_export.quality.metrics.per_layer_error` is the paper's Figure 1, each layer against the final layer.)

    python experiments/layer_errors.py                                # the shipped checkpoint
    python experiments/layer_errors.py runs/x/ckpt.pt --t 0.2 0.5     # a training checkpoint (its EMA weights)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adadiff_export.data import load_fashion_mnist  # noqa: E402
from adadiff_export.model.checkpoint import load  # noqa: E402
from adadiff_export.quality.metrics import prediction_mse  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None, help="default: the shipped checkpoint")
    p.add_argument("--t", type=float, nargs="+", default=[0.05, 0.2, 0.5, 0.8, 0.98], help="diffusion times")
    p.add_argument("--n", type=int, default=256, help="test images")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    loaded = load(a.checkpoint)
    model, schedule = loaded.model, loaded.schedule
    test = load_fashion_mnist("test")
    x0, y = test.images[:a.n], test.labels[:a.n]
    g = torch.Generator().manual_seed(0)
    print(f"{loaded.path}: rows per t: mse(eps_i, noise) for layers 1..{model.depth}, mean u_i, and the fraction "
          f"of u_i's pixels saturated at u > 1 - 1e-5 (a UEM logit above ~11.5: no gradient left)")
    with torch.no_grad():
        for t in a.t:
            tt = torch.full((x0.shape[0],), t)
            noise = torch.randn(x0.shape, generator=g)
            out = model.forward_all_layers(schedule.add_noise(x0, tt, noise), tt, y)
            print(f"t={t:.2f} mse " + " ".join(f"{prediction_mse(e, noise):.3f}" for e in out.eps_layers))
            print("       u   " + " ".join(f"{float(u.mean()):.3f}" for u in out.u_maps))
            print("       sat " + " ".join(f"{float((u > 1 - 1e-5).double().mean()):.3f}" for u in out.u_maps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
