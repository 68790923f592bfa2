"""`python -m adadiff_export bench`: every peer side by side, in one process, interleaved."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict


def add_parser(sub) -> None:
    """Register `bench`."""
    p = sub.add_parser(
        "bench", help="time every peer and adadiff_rt side by side; quality, speedups and figures",
        description="Measure, in one process and interleaved (medians after warm-up): PyTorch eager, the authors' "
                    "early exit in PyTorch, onnxruntime and OpenVINO (f32) on the full graph, and adadiff_rt "
                    "(threshold 0, a threshold sweep, granularity sample and batch, static and saturation at "
                    "matched layer budgets), at batch 1, 8 and 64, for one denoiser call and one 50-step "
                    "DPM-Solver++ run; plus the U-ViT-S/2 CIFAR-10 shape with untrained weights (denoise only). "
                    "FD is in the shipped classifier's feature space, not Inception FID.")
    p.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint (default: the shipped one)")
    p.add_argument("--quick", action="store_true", help="a reduced run that finishes in a few minutes")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for engines, table, JSON and figures")
    p.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    p.add_argument("--n", type=int, help="images per quality run (default 256, --quick 64)")
    p.add_argument("--repeats", type=int, help="timed runs per case after warm-up (default 3, --quick 2)")
    p.add_argument("--threshold", type=float, help="the default threshold (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=0, help="threads for every engine (0: each engine's default)")
    p.add_argument("--no-cifar", action="store_true", help="skip the U-ViT-S/2 CIFAR-10 shape")
    p.add_argument("--sample-batches", type=int, nargs="+", help="batches of the sampling workload (default 1 8 64)")
    p.add_argument("--denoise-batches", type=int, nargs="+", help="batches of the denoise workload (default 1 8 64)")
    p.add_argument("--cifar-batches", type=int, nargs="+", help="batches of the CIFAR-10 shape (default 1 4)")
    p.set_defaults(func=_cmd_bench)


def config_from_args(a: argparse.Namespace):
    """The BenchConfig the flags describe (`--quick` starts from the reduced run)."""
    from ..bench.config import BenchConfig

    kw: Dict[str, object] = dict(checkpoint=a.checkpoint, out=a.out, threshold=a.threshold, threads=a.threads,
                                 cifar=not a.no_cifar)
    if a.n is not None:
        kw["n_quality"] = a.n
    if a.repeats is not None:
        kw["repeats"] = a.repeats
    for flag, key in (("sample_batches", "sample_batches"), ("denoise_batches", "denoise_batches"),
                      ("cifar_batches", "cifar_batches")):
        if getattr(a, flag):
            kw[key] = tuple(getattr(a, flag))
    return BenchConfig.quick(**kw) if a.quick else BenchConfig(**kw)


def _cmd_bench(a: argparse.Namespace) -> int:
    from ..bench.report import goals, markdown
    from ..bench.run import run

    cfg = config_from_args(a)
    res = run(cfg, "python -m adadiff_export " + " ".join(sys.argv[1:]), a.json)
    print(markdown(res.rows, res.machine, "python -m adadiff_export " + " ".join(sys.argv[1:])))
    print("Goals (issue 5; whole 50-step sampling run, adadiff_rt at the default threshold, granularity sample):")
    for line in goals(res.rows):
        print("  " + line)
    print(f"default threshold {res.default_threshold:g}, guidance {res.guidance:g}; "
          f"FD is in the shipped classifier's feature space (not Inception FID)")
    print(f"table: {cfg.out / 'bench.md'}  rows: {cfg.out / 'bench.json'}")
    for name, path in res.figures.items():
        print(f"{name}: {path}")
    return 0
