"""Overhead of adadiff_rt's early-exit loop over the one-graph `full` model, on OpenVINO.

Side by side in one process, each Runtime with the same OpenVINO settings, at batch 1 and 64:
- `full`: the whole model in one OpenVINO graph (the baseline);
- `thr=0`: `denoise(threshold=0)`, the uem policy with every layer run and u computed and tested
  after each, as the runtime runs it by default: one exit graph (the tests inside the graph) where
  the OpenVINO engine uses one (one row, or whole-batch exit), else the chain of segments;
- `thr=0 chained`: the same through the chain of segments (`Runtime(..., fuse_exit=False)`);
- `thr=0 whole batch`: the same with granularity `batch` (one decision for the batch), which the OpenVINO engine
  runs as one exit graph at any batch size;
- `static L13 fused`: static exit at the last layer, the same computation as `full` run by the
  runtime as one graph stitched from the segments: what the runtime itself costs around a call.
All calls rotate call by call, so load from other processes lands on all alike; medians after
warm-up. Each compiled model's speed also varies by a few percent from one compilation to the next
on these VMs, so every case runs in `--runtimes` separate Runtimes (separate compilations) and
the table reports the median over them. Goal (issue 4): `thr=0` at most 5% slower than `full`.

    python experiments/bench_overhead.py                      # shipped checkpoint -> engines/ (built if absent)
    python experiments/bench_overhead.py --engines DIR        # an existing engines folder
    python experiments/bench_overhead.py --checkpoint CKPT --engines DIR --threads 2 --repeats 200
    python experiments/bench_overhead.py --config uvit-s-cifar10 --engines bench_out/engines_cifar --repeats 20 --runtimes 1
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _engines(args: argparse.Namespace) -> Path:
    if (args.engines / "manifest.json").is_file():
        return args.engines
    from adadiff_export.export.build import build_engines

    checkpoint = args.checkpoint
    if args.config:
        from adadiff_export.model.checkpoint import save_untrained
        from adadiff_export.model.config import preset

        checkpoint = save_untrained(preset(args.config), args.engines.parent / f"{args.config}_untrained.pt")
    print(f"building {args.engines} from {checkpoint or 'the shipped checkpoint'} ...", flush=True)
    return build_engines(checkpoint, args.engines, max_batch=max(args.batches), tensorrt="off")


def _machine() -> str:
    """The bench's machine line (CPU, cores, versions) plus the load average, which these VMs need beside a timing."""
    from adadiff_export.bench.harness import machine, machine_line

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
    p.add_argument("--runtimes", type=int, default=3,
                   help="separate Runtimes (compilations) per case; the table shows the median over them")
    a = p.parse_args(argv)
    if a.runtimes < 1 or a.repeats < 1:
        p.error("--runtimes and --repeats must be >= 1")

    import adadiff_rt

    from adadiff_export.bench.harness import rotating_times

    folder = _engines(a)
    rts = [adadiff_rt.Runtime(str(folder), threads=a.threads) for _ in range(a.runtimes)]
    chained = [adadiff_rt.Runtime(str(folder), threads=a.threads, fuse_exit=False) for _ in range(a.runtimes)]
    rt = rts[0]
    m = rt.model
    rng = np.random.default_rng(0)
    cases = ["full", "thr=0", "thr=0 chained", "thr=0 whole batch", "static L13 fused"]
    rows = []
    for b in a.batches:
        if b > rt.max_batch:
            print(f"skip batch {b}: above the folder's max_batch {rt.max_batch}")
            continue
        x = rng.standard_normal((b, m["in_chans"], m["img_size"], m["img_size"])).astype(np.float32)
        t = rng.uniform(0.01, 1.0, b).astype(np.float32)
        y = rng.integers(0, m["num_classes"] + 1, b) if m["num_classes"] else None
        fns, labels = [], []
        for r, c in zip(rts, chained):
            fns += [lambda r=r: r.full(x, t, y), lambda r=r: r.denoise(x, t, y, threshold=0.0),
                    lambda c=c: c.denoise(x, t, y, threshold=0.0),
                    lambda r=r: r.denoise(x, t, y, threshold=0.0, granularity="batch"),
                    lambda r=r: r.denoise(x, t, y, policy="static", static_layer=r.depth)]
            labels += cases
        rotating_times(fns, a.warmup)
        rt.denoise(x, t, y, threshold=0.0)
        how = "exit graph" if rt.engine_calls == 1 else f"chain ({rt.engine_calls} calls)"
        per_instance = {k: [] for k in cases}
        for label, v in zip(labels, rotating_times(fns, a.repeats)):
            per_instance[label].append(statistics.median(v) * 1e3)
        rows.append((b, how, {k: statistics.median(v) for k, v in per_instance.items()}))
    print(f"\nadadiff_rt overhead, OpenVINO CPU fp32, threads {a.threads or 'default'}, {folder} "
          f"(depth {rt.depth}), median of {a.repeats} calls each in rotating order, then the median over "
          f"{a.runtimes} Runtime(s)")
    print(f"machine: {_machine()}")
    print("full: the one-graph model through Runtime.full; thr=0: denoise at threshold 0 as the runtime runs it "
          "(path in 'runs as'); chained: the same through the chain of segments (fuse_exit=False); whole batch: "
          "the same with granularity 'batch' (one exit graph at any batch); static L13: static exit at the last "
          "layer, one graph stitched from the segments (what the runtime itself costs)")
    print(f"{'batch':>5} | {'full ms':>9} | {'thr=0 ms':>9} | {'overhead':>8} | goal <= 5% | {'runs as':>16} | "
          f"{'chained ms':>10} | {'overhead':>8} | {'whole batch':>11} | {'overhead':>8} | {'static L13':>10} | "
          f"{'overhead':>8}")
    for b, how, r in rows:
        f = r["full"]
        o, oc, ob, oz = ((r[k] / f - 1) * 100 for k in cases[1:])
        print(f"{b:>5} | {f:>9.3f} | {r['thr=0']:>9.3f} | {o:>7.1f}% | {'ok' if o <= 5 else 'MISSED':>10} | "
              f"{how:>16} | {r['thr=0 chained']:>10.3f} | {oc:>7.1f}% | {r['thr=0 whole batch']:>11.3f} | {ob:>7.1f}% | "
              f"{r['static L13 fused']:>10.3f} | {oz:>7.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
