"""Where the segmented model's batch-1 overhead goes, measured on OpenVINO alone (no adadiff_rt code).

Compiles an engines folder's segments like adadiff_rt does (adadiff_export.export.openvino_cpu) at one batch size and
prints, medians of interleaved rounds:
  1. the chain of all segments (stem, layers, head) against `full`, wall time and OpenVINO's per-node counters
     summed (the rest of the wall time is per-infer cost outside the nodes; rough: the counters come from a
     second, counted run), and voluntary context switches
     per chain (a thread hand-off would show here);
  2. layers 1..7 as 7 infer requests of ONE compiled layer, as 7 separately compiled copies of that layer,
     and as the 7 different layers: what distinct compiled models cost;
  3. every layer compiled with and without its `u` output (OpenVINO then drops the UEM): what the UEMs cost.

    python experiments/openvino_chain_probe.py                      # engines/ (build it first), batch 1, 1 thread
    python experiments/openvino_chain_probe.py --engines DIR --batch 1 --threads 1 --rounds 300
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adadiff_export.export.manifest import load  # noqa: E402
from adadiff_export.export.openvino_cpu import bound_request, compile_static  # noqa: E402
from adadiff_export.export.profile import timed_rounds  # noqa: E402
from adadiff_export.export.parity import random_feed  # noqa: E402


def _rounds(cases: dict, rounds: int) -> dict:
    """Median ms per call of each case: 10 warm-up rounds, then `rounds` rounds of one call each."""
    return {k: 1e3 * sec for k, sec in timed_rounds(cases, warmup=10, iters=rounds).items()}


def _voluntary_switches() -> int:
    total = 0
    for task in glob.glob(f"/proc/{os.getpid()}/task/*/status"):
        with open(task) as f:
            total += int(next(line.split()[1] for line in f if line.startswith("voluntary_ctxt_switches")))
    return total


def _node_us(req) -> float:
    return sum(p.real_time.total_seconds() * 1e6 for p in req.get_profiling_info() if p.status == p.Status.EXECUTED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=300)
    a = p.parse_args(argv)

    m = load(a.engines, check=True)
    rng = np.random.default_rng(0)
    feeds = {s.name: random_feed(s, a.batch, rng, m.model["num_classes"]) for s in m.segments}
    files = {s.name: a.engines / s.file for s in m.segments}
    chain_names = [s.name for s in m.segments if s.name != "full"]

    def compiled(name, counters=False):
        return compile_static(files[name], a.batch, a.threads, {"PERF_COUNT": "YES"} if counters else None)

    chain = [bound_request(compiled(n), feeds[n]) for n in chain_names]
    full = bound_request(compiled("full"), feeds["full"])
    run_chain = lambda: [r.infer() for r in chain]  # noqa: E731
    t = _rounds({"chain": run_chain, "full": full.infer}, a.rounds)
    before = _voluntary_switches()
    for _ in range(100):
        run_chain()
    switches = (_voluntary_switches() - before) / 100
    counted_chain = [bound_request(compiled(n, True), feeds[n]) for n in chain_names]
    counted_full = bound_request(compiled("full", True), feeds["full"])
    for _ in range(50):
        [r.infer() for r in counted_chain], counted_full.infer()
    nodes_chain, nodes_full = sum(_node_us(r) for r in counted_chain) / 1e3, _node_us(counted_full) / 1e3
    print(f"{a.engines}, batch {a.batch}, {a.threads} thread(s), median of {a.rounds} interleaved rounds")
    print(f"1. chain of {len(chain)} segments {t['chain']:.3f} ms (nodes {nodes_chain:.3f} ms), "
          f"full {t['full']:.3f} ms (nodes {nodes_full:.3f} ms); per-infer cost outside the nodes "
          f"{1e3 * (t['chain'] - nodes_chain) / len(chain):.0f} us per segment vs "
          f"{1e3 * (t['full'] - nodes_full):.0f} us for full; voluntary context switches per chain {switches:.1f}")
    one = compiled("layer_2")
    same = [bound_request(one, feeds["layer_2"]) for _ in range(7)]
    copies = [bound_request(compiled("layer_2"), feeds["layer_2"]) for _ in range(7)]
    distinct = [bound_request(compiled(f"layer_{i}"), feeds[f"layer_{i}"]) for i in range(1, 8)]
    t = _rounds({k: (lambda rs=rs: [r.infer() for r in rs]) for k, rs in
                 (("same", same), ("copies", copies), ("distinct", distinct))}, a.rounds)
    print(f"2. 7 requests of one compiled layer {t['same']:.3f} ms; 7 compiled copies of that layer "
          f"{t['copies']:.3f} ms; 7 different layers {t['distinct']:.3f} ms")
    layers = [n for n in chain_names if n.startswith("layer_")]
    cases = {}
    for n in layers:
        cases[n] = (lambda r=bound_request(compiled(n), feeds[n]): r.infer())
        without_u = compile_static(files[n], a.batch, a.threads, drop_outputs=("u",))
        cases[n + "-u"] = (lambda r=bound_request(without_u, feeds[n]): r.infer())
    t = _rounds(cases, a.rounds)
    per_layer = [1e3 * (t[n] - t[n + "-u"]) for n in layers]
    print(f"3. each layer's UEM (the layer compiled with and without its u output, all in rotation): "
          f"{statistics.mean(per_layer):.0f} us per layer on average, {sum(per_layer) / 1e3:.3f} ms over {len(layers)} "
          f"layers (min {min(per_layer):.0f}, max {max(per_layer):.0f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
