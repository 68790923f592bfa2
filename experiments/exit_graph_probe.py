"""Where the uem exit graph's overhead over `full` goes, measured on OpenVINO alone (no adadiff_rt code).

adadiff_rt runs `denoise` with the uem policy as one OpenVINO graph stitched from the segments (see
csrc/openvino_engine.cpp, exit_graph). This probe stitches the same segments with the openvino Python API
into forms that add one ingredient at a time, compiles each like adadiff_rt does (adadiff_export.export.openvino_cpu:
f32, latency, one stream, the given threads, static batch) and times them against `full`:

  stitched         stem, layers 1..N, head: the `full` computation from the segments (u outputs dropped, so
                   OpenVINO drops the UEMs);
  + UEMs           the same with the u of layers 1..N-1 kept as outputs (no decision reads the last layer's u, and
                   neither the runtime nor this probe computes it): the UEMs' own cost;
  Ifs              layers 2..N each inside an `If` that would pass h through (condition an input, false):
                   the branch plumbing without UEMs;
  exit graph       Ifs + UEMs + the exit test on u after each layer (u < threshold, on the batch mean above one
                   row; threshold 0 so every layer runs), the skipped-layer sentinel and the u output: the
                   runtime's exit graph for one row, or for whole-batch exit (granularity `batch`).

Every form is checked against `full` (eps within 1e-4 relative) before timing. Compile-to-compile speed differs
by several percent on small VMs, so each form is compiled `--compiles` times; the table shows, per form, the
median over compilations of the median call time (all calls rotating, so load lands on all alike). A last line
puts the parts per gated layer beside what the 5% goal allows per gated layer (N-1 of them carry a UEM, a test
and an If).

With --nodes, one layer segment is also compiled with OpenVINO's per-node counters and the nodes that only its
`u` needs (its UEM, found from the compiled graph) are listed with their median time: what a UEM is made of.

    python experiments/exit_graph_probe.py                               # engines/, batch 1, 1 thread
    python experiments/exit_graph_probe.py --engines DIR --batch 1 --threads 1 --rounds 400 --compiles 3
    python experiments/exit_graph_probe.py --nodes layer_2                # + the UEM's nodes in layer_2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Set

import numpy as np
import openvino as ov
from openvino import opset8, opset13 as ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adadiff_export.bench.harness import rotating_times  # noqa: E402
from adadiff_export.export.manifest import Manifest, load  # noqa: E402
from adadiff_export.export.openvino_cpu import bound_request, compile_static, config, static_batch  # noqa: E402
from adadiff_export.export.parity import max_relative_error, random_feed  # noqa: E402

FORMS = ("full", "stitched", "+ UEMs", "Ifs", "exit graph")


class Stitcher:
    """Builds the probe's forms from one engines folder's segment files."""

    def __init__(self, folder: Path, manifest: Manifest, batch: int) -> None:
        self.core = ov.Core()
        self.folder = folder
        self.batch = batch
        self.segs = {s.name: s for s in manifest.segments}
        self.depth = int(manifest.model["depth"])

    def read(self, name: str) -> ov.Model:
        return self.core.read_model(str(self.folder / self.segs[name].file))

    @staticmethod
    def produced(model: ov.Model, name: str) -> ov.Output:
        for r in model.get_results():
            if name in r.output(0).get_names():
                v = r.input_value(0)
                v.get_tensor().set_names(set())
                return v
        raise KeyError(f"{model.get_friendly_name()} has no output {name}")

    def layer_inputs(self, i: int, h, temb, saved: List) -> Dict[str, ov.Output]:
        s = self.segs[f"layer_{i}"]
        feeds = {"h_in": h, "temb": temb}
        if s.skip_from:
            feeds["skip"] = saved[s.skip_from - 1]
        return feeds

    def build(self, form: str) -> ov.Model:
        if form == "full":
            model = self.read("full")
        else:
            model = self.stitch(uems=form in ("+ UEMs", "exit graph"), ifs=form in ("Ifs", "exit graph"),
                                tests=form == "exit graph")
        static_batch(model, self.batch)
        return model

    def stitch(self, uems: bool, ifs: bool, tests: bool) -> ov.Model:
        stem = self.read("stem")
        h, temb = self.produced(stem, "h"), self.produced(stem, "temb")
        params = list(stem.get_parameters())
        done = None
        if ifs and not tests:
            cond = ops.parameter([], np.bool_, name="skip_layers")
            params.append(cond)
            done = cond.output(0)
        if tests:
            thr = ops.parameter([], np.float32, name="thr")
            params.append(thr)
        skipped = ops.constant(np.full([self.batch], -np.inf, np.float32)).output(0)
        saved, us = [], []
        for i in range(1, self.depth + 1):
            layer = self.read(f"layer_{i}")
            feeds = self.layer_inputs(i, h, temb, saved)
            # no decision reads the last layer's u: like the runtime, a constant there (OpenVINO drops that UEM)
            u = self.produced(layer, "u") if i < self.depth else ops.constant(np.zeros([self.batch], np.float32)).output(0)
            run = [self.produced(layer, "h_out")] + ([u] if uems else [])
            if not ifs or i == 1:
                for p in layer.get_parameters():
                    p.output(0).replace(feeds[p.output(0).get_any_name()])
                outs = run
            else:
                outs = self._branch(done, layer, feeds, run, h, skipped if uems else None)
            h = outs[0]
            if uems:
                us.append(outs[1])
            if tests and i < self.depth:  # the runtime's test for one row, or one decision for the batch
                score = outs[1] if self.batch == 1 else ops.reduce_mean(outs[1], [0], True)
                done = ops.less(score, thr).output(0)
            if self.segs[f"layer_{i}"].block == "in":
                saved.append(h)
        head = self.read("head")
        head.get_parameters()[0].output(0).replace(h)
        results = [ops.result(self.produced(head, "eps"))]
        results[0].output(0).get_tensor().set_names({"eps"})
        if uems:
            results.append(ops.result(ops.concat(us, 0)))
        return ov.Model(results, params, "probe")

    @staticmethod
    def _branch(done, layer: ov.Model, feeds: Dict, run: List, h, skipped) -> List:
        """If(done) pass h (and the -inf sentinel as u) else run the layer, as the runtime's exit graph does."""
        node = opset8.if_op(done)
        passed = ops.parameter(h.get_partial_shape(), np.float32)
        then_results = [ops.result(passed)] + ([ops.result(skipped)] if skipped is not None else [])
        else_results = [ops.result(v) for v in run]
        node.set_then_body(ov.Model(then_results, [passed]))
        node.set_else_body(ov.Model(else_results, list(layer.get_parameters())))
        node.set_input(h, passed, None)
        for p in layer.get_parameters():
            node.set_input(feeds[p.output(0).get_any_name()], None, p)
        return [node.set_output(t, e) for t, e in zip(then_results, else_results)]


def _feed(base: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`base` plus the probe forms' own inputs: threshold 0 (every layer runs) and no layer skipped."""
    return {**base, "thr": np.array(0.0, np.float32), "skip_layers": np.array(False)}


def _ancestors(node) -> Set[str]:
    """Friendly names of every node `node` reads from, directly or not."""
    seen: Set[str] = set()
    stack = [node]
    while stack:
        for i in stack.pop().inputs():
            parent = i.get_source_output().get_node()
            if parent.get_friendly_name() not in seen:
                seen.add(parent.get_friendly_name())
                stack.append(parent)
    return seen


def uem_nodes(path: Path, feed: Dict[str, np.ndarray], batch: int, threads: int, rounds: int) -> List[tuple]:
    """(node type, kernel, output shape, median us) for each node of a layer segment that only its `u` output
    needs and that does work of its own, from OpenVINO's per-node counters over `rounds` calls."""
    compiled = compile_static(path, batch, threads, {"PERF_COUNT": "YES"})
    graph = compiled.get_runtime_model()
    reach = {r.get_friendly_name().split("/sink_port")[0]: _ancestors(r) for r in graph.get_results()}
    only_u = reach["u"] - reach["h_out"]
    shapes = {op.get_friendly_name(): str(op.get_output_partial_shape(0)) for op in graph.get_ordered_ops()
              if op.get_output_size()}
    req = bound_request(compiled, feed)
    times: Dict[str, List[float]] = {}
    kinds: Dict[str, tuple] = {}
    for r in range(rounds + 20):
        req.infer()
        if r < 20:
            continue
        for info in req.get_profiling_info():
            # The counters' status is no guide to what ran: a node under their 1 us resolution reads NOT_RUN in
            # some calls. Parameters, constants and reshapes (views in OpenVINO CPU) do no work of their own.
            if info.node_name in only_u and info.node_type not in ("Parameter", "Constant", "Reshape"):
                times.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e6)
                kinds[info.node_name] = (info.node_type, info.exec_type)
    return [kinds[n] + (shapes.get(n, "?"), statistics.median(v)) for n, v in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OpenVINO CPU threads (0: its default)")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--compiles", type=int, default=3, help="separate compilations of each form")
    p.add_argument("--nodes", metavar="LAYER", default=None,
                   help="also list the per-node times of this layer segment's UEM (e.g. layer_2)")
    a = p.parse_args(argv)
    if a.batch < 1 or a.rounds < 1 or a.compiles < 1:
        p.error("--batch, --rounds and --compiles must be >= 1")

    try:
        m = load(a.engines, check=True)
    except (OSError, ValueError) as e:  # no folder, no manifest, a changed file
        p.error(str(e))
    st = Stitcher(a.engines, m, a.batch)
    if a.nodes is not None and not (a.nodes in st.segs and a.nodes.startswith("layer_")):
        p.error(f"--nodes: {a.nodes!r} is not a layer segment of {a.engines} (layer_1 .. layer_{st.depth})")
    base = random_feed(st.segs["full"], a.batch, np.random.default_rng(0), int(m.model["num_classes"]))
    cfg = config(a.threads)
    reference = None
    calls = {}
    for c in range(a.compiles):
        for form in FORMS:
            compiled = st.core.compile_model(st.build(form), "CPU", cfg)
            req = bound_request(compiled, _feed(base))
            req.infer()
            eps = req.get_tensor("eps").data.copy()
            if reference is None:
                reference = eps
            err = max_relative_error(reference, eps)
            if err > 1e-4:
                raise SystemExit(f"{form} differs from full: max relative error {err:.2e}")
            calls[(form, c)] = (lambda req=req: req.infer())
    keys = list(calls)
    rotating_times([calls[k] for k in keys], 20)  # warm-up
    t = {k: 1e3 * statistics.median(v) for k, v in zip(keys, rotating_times([calls[k] for k in keys], a.rounds))}
    ms = {f: statistics.median(t[(f, c)] for c in range(a.compiles)) for f in FORMS}
    print(f"{a.engines} (depth {st.depth}), batch {a.batch}, {a.threads or 'default'} thread(s), OpenVINO "
          f"{ov.__version__}; median of {a.rounds} rotating calls, median over {a.compiles} compilations")
    print(f"{'form':>11} | {'ms':>8} | vs full | per compilation")
    for f in FORMS:
        spread = " ".join(f"{100 * (t[(f, c)] / ms['full'] - 1):+.1f}%" for c in range(a.compiles))
        print(f"{f:>11} | {ms[f]:8.3f} | {100 * (ms[f] / ms['full'] - 1):+6.1f}% | {spread}")
    uems, ifs = ms["+ UEMs"] - ms["stitched"], ms["Ifs"] - ms["stitched"]
    rest = ms["exit graph"] - ms["Ifs"] - uems
    share = lambda x: 100 * x / ms["full"]  # noqa: E731
    print(f"UEMs alone (+ UEMs - stitched) {share(uems):+.1f}%, If plumbing alone (Ifs - stitched) {share(ifs):+.1f}%, "
          f"tests and the rest (exit graph - Ifs - UEMs alone) {share(rest):+.1f}% of full")
    gated = st.depth - 1
    per = lambda x: 1e3 * x / gated  # noqa: E731
    print(f"per gated layer ({gated} of them): the 5% goal allows {per(0.05 * ms['full']):.1f} us; "
          f"UEM {per(uems):.1f} us, If {per(ifs):.1f} us, tests and the rest {per(rest):.1f} us")
    if a.nodes:
        feed = random_feed(st.segs[a.nodes], a.batch, np.random.default_rng(1), 0)
        rows = uem_nodes(a.engines / st.segs[a.nodes].file, feed, a.batch, a.threads, a.rounds)
        print(f"{a.nodes}'s UEM node by node (OpenVINO per-node counters, 1 us resolution, median of {a.rounds} "
              f"calls), {sum(r[3] for r in rows):.1f} us in all:")
        for node_type, kernel, shape, us in rows:
            print(f"  {node_type:>14} {kernel:<16} -> {shape:<12} {us:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
