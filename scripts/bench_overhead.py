"""Overhead of adadiff_rt's segmented early-exit loop over the one-graph `full` model, on OpenVINO.

Side by side in one process and one Runtime (so both run with the same OpenVINO settings):
`denoise(threshold=0)` (every layer runs, u is computed and tested after each) against `full` (the
whole model in one OpenVINO graph), at batch 1 and 64, and static exit at the last layer (the same
computation as `full`, run by the runtime as one graph stitched from the segments: the runtime's own
cost around an engine call). The three rotate call by call, so load from other processes lands on
all alike; medians after warm-up (which also lets the engine compile its static-batch variants).
Goal: threshold 0 at most 5% slower than `full`.

    python scripts/bench_overhead.py                      # shipped checkpoint -> engines/ (built if absent)
    python scripts/bench_overhead.py --engines DIR        # an existing engines folder
    python scripts/bench_overhead.py --checkpoint CKPT --engines DIR --threads 2 --repeats 200
    python scripts/bench_overhead.py --config uvit-s-cifar10 --engines bench_out/engines_cifar --repeats 20
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _engines(args: argparse.Namespace) -> Path:
    if (args.engines / "manifest.json").is_file():
        return args.engines
    from adadiff_export.build import build_engines

    checkpoint = args.checkpoint
    if args.config:
        from adadiff_export.checkpoint import save_untrained
        from adadiff_export.config import preset

        checkpoint = save_untrained(preset(args.config), args.engines.parent / f"{args.config}_untrained.pt")
    print(f"building {args.engines} from {checkpoint or 'the shipped checkpoint'} ...", flush=True)
    return build_engines(checkpoint, args.engines, max_batch=max(args.batches), tensorrt="off")


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns: list, calls: int) -> list:
    """`calls` timings of each function, the order rotating call by call so none always runs first."""
    times = [[] for _ in fns]
    for i in range(calls):
        for k in range(len(fns)):
            j = (i + k) % len(fns)
            times[j].append(_once(fns[j]))
    return times


def _machine() -> str:
    """The bench's machine line (CPU, cores, versions) plus the load average, which these VMs need beside a timing."""
    from adadiff_export.bench import machine, machine_line

    load = ", load %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{platform.node()}: {machine_line(machine())}{load}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=Path, default=ROOT / "engines")
    p.add_argument("--checkpoint", type=Path, default=None, help="used only when --engines has to be built")
    p.add_argument("--config", default=None,
                   help="instead of a checkpoint, a named config with random weights (e.g. uvit-s-cifar10: the "
                        "paper's scale); built into --engines when that holds no manifest")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=200, help="timed calls of each (alternating)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls of each first")
    p.add_argument("--threads", type=int, default=0, help="OpenVINO CPU threads (0: its default)")
    a = p.parse_args(argv)

    import adadiff_rt

    folder = _engines(a)
    rt = adadiff_rt.Runtime(str(folder), threads=a.threads)
    m = rt.model
    rng = np.random.default_rng(0)
    rows = []
    for b in a.batches:
        if b > rt.max_batch:
            print(f"skip batch {b}: above the folder's max_batch {rt.max_batch}")
            continue
        x = rng.standard_normal((b, m["in_chans"], m["img_size"], m["img_size"])).astype(np.float32)
        t = rng.uniform(0.01, 1.0, b).astype(np.float32)
        y = rng.integers(0, m["num_classes"] + 1, b) if m["num_classes"] else None
        full = lambda: rt.full(x, t, y)  # noqa: E731
        seg = lambda: rt.denoise(x, t, y, threshold=0.0)  # noqa: E731
        fused = lambda: rt.denoise(x, t, y, policy="static", static_layer=rt.depth)  # noqa: E731
        _interleaved([full, seg, fused], a.warmup)
        mf, ms, mz = (statistics.median(v) * 1e3 for v in _interleaved([full, seg, fused], a.repeats))
        rows.append((b, mf, ms, mz))
    print(f"\nadadiff_rt overhead, OpenVINO CPU fp32, threads {a.threads or 'default'}, {folder} "
          f"(depth {rt.depth}), median of {a.repeats} calls each, the three in rotating order")
    print(f"machine: {_machine()}")
    print("full: the one-graph model through Runtime.full; thr=0: denoise at threshold 0 (the chain of segments, "
          "u tested after each layer); fused: static exit at the last layer, which the OpenVINO engine runs as "
          "one graph stitched from the segments (what the runtime itself costs around an engine call)")
    print(f"{'batch':>5} | {'full ms':>9} | {'thr=0 ms':>9} | {'overhead':>8} | goal <= 5% | {'fused ms':>9} | {'overhead':>8}")
    for b, f, s, z in rows:
        o, oz = (s / f - 1) * 100, (z / f - 1) * 100
        print(f"{b:>5} | {f:>9.3f} | {s:>9.3f} | {o:>7.1f}% | {'ok' if o <= 5 else 'MISSED':>10} | {z:>9.3f} | {oz:>7.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
