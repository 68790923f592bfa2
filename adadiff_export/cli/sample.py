"""`python -m adadiff_export sample`: a PNG grid of class-conditional samples and the layers they used."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional


def final_x0_flag(final_x0: bool) -> str:
    """The flag that asks for `final_x0`, for messages."""
    return "--final-x0" if final_x0 else "--no-final-x0"


def add_final_x0_argument(p: argparse.ArgumentParser, prefix: str = "", default: Optional[bool] = True) -> None:
    """`--final-x0 / --no-final-x0`, shared by every command that samples. default None: the command
    tells a flag given from one left out (None), and applies True itself."""
    p.add_argument("--final-x0", action=argparse.BooleanOptionalAction, default=default,
                   help=prefix + "the last sampler step returns its x0 prediction instead of stepping to t_eps "
                        "(default; removes the ~1%% noise left there, as k-diffusion and DPM-Solver do: 3-7%% lower "
                        "FD on 1,000 samples). --no-final-x0: stop at t_eps and return x there, as the paper's "
                        "samplers do (and as the README's t_eps tables were measured)")

def add_exit_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `sample` and `evaluate`: checkpoint, sampler, guidance and exit policy."""
    from ..sampling.early_exit import GRANULARITIES, POLICIES
    from ..sampling.samplers import DEFAULT_STEPS, SAMPLERS

    p.add_argument("checkpoint", nargs="?", type=Path, default=None,
                   help="checkpoint file (default: the shipped adadiff_export/weights/fashion_small.pt)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="dpm++",
                   help="dpm++ (DPM-Solver++ 2M), ddim or euler (Euler-Maruyama on the VP SDE)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's, else 2.0; 1 = no guidance)")
    p.add_argument("--policy", choices=list(POLICIES), default=None,
                   help="exit policy (default: the checkpoint's): uem (the paper's rule: learned uncertainty below "
                        "--threshold), uem-time (uncertainty with thresholds and a layer range by time, calibrated), "
                        "schedule (an exit layer by time, calibrated), static (fixed --layer), saturation (hidden "
                        "state stops changing), uem-authors (the AdaDiff code's rule: one decision for the batch on "
                        "mean uncertainty below --threshold = 1 - their tau, in blocks at the second trigger)")
    p.add_argument("--threshold", type=float, default=None,
                   help="exit when the score is below this (default for uem: the checkpoint's default threshold; 0 = full depth)")
    p.add_argument("--patience", type=int, default=None,
                   help="consecutive layers below the threshold before exiting (default: the checkpoint's, 1)")
    p.add_argument("--layer", type=int, default=None,
                   help="static policy: the layer every sample exits after (0 = full depth; default: the checkpoint's, 0)")
    p.add_argument("--granularity", choices=list(GRANULARITIES), default=None,
                   help="sample: each sample exits on its own; batch: one decision for the batch (the authors' rule); "
                        "default: the checkpoint's, sample")
    p.add_argument("--table", type=Path, default=None,
                   help="schedule / uem-time: a JSON file holding the table (as in the manifest's exit.schedule or "
                        "exit.uem_time); default: the one the checkpoint stores")
    add_final_x0_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (and of stochastic samplers)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")


def say_detected(loaded) -> None:
    """Print what was detected when the checkpoint was converted from the authors' format in memory."""
    if loaded.note:
        print(loaded.note)


def run_guidance(asked, default: float, num_classes: int) -> float:
    """The guidance scale of a run: the flag, else the checkpoint's default; an unconditional model has none
    (1), whatever its stored default, and refuses a flag that asks for guidance."""
    if num_classes == 0:
        if asked is not None and asked != 1.0:
            raise ValueError(f"--guidance {asked:g} needs a class-conditional model; this one is unconditional "
                             "(leave --guidance out, or 1)")
        return 1.0
    return default if asked is None else float(asked)


def check_run_arguments(a: argparse.Namespace) -> None:
    """Refuse bad --steps, --seed and --batch-size of `sample` and `evaluate` before any work is done."""
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps} (leave it out for the sampler's default)")
    if a.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {a.seed}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")


def exit_policy(a: argparse.Namespace, defaults):
    """The ExitPolicy the flags describe; what they leave out comes from `defaults` (ExitDefaults)."""
    from ..sampling.early_exit import UEM_POLICIES, ExitPolicy
    from ..sampling.exit_settings import TimeTable

    kind = a.policy or defaults.policy
    authors = kind == "uem-authors"  # decides for the batch and has its own patience
    threshold = a.threshold
    if threshold is None:
        if kind == "saturation":
            raise ValueError("--policy saturation needs --threshold (its score is the relative change of the hidden state)")
        threshold = defaults.threshold if kind in UEM_POLICIES else 0.0
    table = defaults.table_for(kind)
    if a.table is not None:
        if kind not in ("schedule", "uem-time"):
            raise ValueError(f"--table is read by --policy schedule or uem-time, not {kind}")
        try:
            table = TimeTable.from_dict(json.loads(Path(a.table).read_text()), str(a.table))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--table {a.table}: {e}") from None
    return ExitPolicy(kind=kind, threshold=threshold, patience=a.patience or (1 if authors else defaults.patience),
                      layer=defaults.layer if a.layer is None else a.layer,
                      granularity=a.granularity or ("batch" if authors else defaults.granularity), table=table)


def add_parser(sub) -> None:
    """Register `sample`."""
    p = sub.add_parser(
        "sample", help="sample a grid of images with early exit and report the layers used",
        description="Sample N class-conditional images (labels 0..9 in turn) with the reference early exit "
                    "(or the C++ runtime with --backend rt), write them as a PNG grid and print the mean "
                    "number of layers used overall and at each step.")
    add_exit_arguments(p)
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG file to write")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per sampler run (rt: at most what the engines' max_batch holds); chunk k draws the "
                        "stochastic samplers' noise with seed + k, so torch and rt agree at the same batch size")
    p.add_argument("--backend", choices=["torch", "rt"], default="torch",
                   help="torch: the PyTorch reference; rt: the adadiff_rt C++ runtime over built engines")
    p.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder for --backend rt")
    p.set_defaults(func=_cmd_sample)


def summary(result, a: argparse.Namespace, policy, steps: int) -> Dict[str, Any]:
    """The --json record of one sampling run."""
    from ..sampling.generate import THRESHOLD_POLICIES

    return {
        "mean_layers": round(result.mean_layers, 4),
        "layers_by_step": [round(v, 3) for v in result.layers_by_step],
        "seconds": round(result.seconds, 3),
        "image_mean": round(float(result.images.mean()), 5),
        "image_std": round(float(result.images.std()), 5),
        "threshold": policy.threshold if policy.kind in THRESHOLD_POLICIES else None,
        "layer": policy.layer if policy.kind == "static" else None,
        "policy": policy.kind, "granularity": policy.granularity,
        "sampler": a.sampler, "steps": steps, "n": a.n, "backend": a.backend,
    }


def _cmd_sample(a: argparse.Namespace) -> int:
    from ..model import checkpoint as ckpt
    from ..sampling.generate import exit_defaults, generate, generate_rt
    from ..sampling.images import check_image_path, save_grid
    from ..sampling.samplers import steps_for

    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    check_run_arguments(a)
    check_image_path(a.out)
    loaded = ckpt.load(a.checkpoint)
    say_detected(loaded)
    defaults = exit_defaults(loaded)
    policy = exit_policy(a, defaults)
    steps = steps_for(a.sampler, a.steps)
    c = loaded.model.config
    guidance = run_guidance(a.guidance, defaults.guidance, c.num_classes)
    if a.backend == "rt":
        result = generate_rt(a.engines, (c.in_chans, c.img_size, c.img_size), c.num_classes, a.n, policy,
                             a.sampler, steps, guidance, a.seed, final_x0=a.final_x0, batch_size=a.batch_size)
        if a.sampler == "euler" and result.chunk < min(a.n, a.batch_size):
            print(f"note: adadiff_rt ran chunks of {result.chunk} samples (what the engines' max_batch holds); "
                  f"the torch backend draws the same Euler-Maruyama noise with --batch-size {result.chunk}")
    else:
        result = generate(loaded, a.n, policy, a.sampler, steps, guidance, a.seed, a.batch_size, final_x0=a.final_x0)
    path = save_grid(result.images, a.out, nrow=c.num_classes if c.num_classes and a.n % c.num_classes == 0 else None)
    rec = summary(result, a, policy, steps)
    print(f"wrote {path} ({a.n} images, {a.sampler} {steps} steps, guidance {guidance:g}, {policy.kind} "
          f"threshold {rec['threshold']}, {a.backend}) in {result.seconds:.1f} s")
    print(f"layers used: mean {result.mean_layers:.2f} of {c.depth}")
    print("by step: " + " ".join(f"{v:.1f}" for v in result.layers_by_step))
    if a.json:
        print(json.dumps(rec))
    return 0
