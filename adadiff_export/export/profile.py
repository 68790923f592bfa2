"""`python -m adadiff_export profile DIR`: per-segment latency and the cost of exiting after each layer.

The cost model behind every speed claim: a sample that exits after layer i costs
stem + layer_1 + ... + layer_i + head, against `full` for the whole model in one graph.
`segment_costs` returns the per-segment times (the benchmark's "ideal speedup" uses it).

Engines: OpenVINO (CPU, f32 inference precision: on CPUs with bf16 it otherwise silently runs
bf16) and onnxruntime (CPU) at batch 1 and max_batch; where TensorRT's `trtexec` is on PATH and
the folder has plans, `trtexec` per plan (written against trtexec's documented output; not run in
our CI).
"""
from __future__ import annotations

import functools
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .manifest import Manifest, load
from .parity import random_feed

ENGINES = ("openvino", "onnxruntime")


def timed_rounds(calls: Dict[str, Callable[[], object]], warmup: int, iters: int) -> Dict[str, float]:
    """Median seconds per call of each entry, timed in interleaved rounds.

    One call of every segment per round, so a burst of load from elsewhere on the machine lands on
    all segments alike instead of inflating whichever segment happened to be timed then.
    """
    for _ in range(warmup):
        for run in calls.values():
            run()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, run in calls.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def _openvino_runner(path: Path, threads: Optional[int], batch: int):
    from .openvino_cpu import compile_static

    request = compile_static(path, batch, threads).create_infer_request()
    return lambda feed: request.infer(feed)


def _onnxruntime_runner(path: Path, threads: Optional[int], batch: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


_RUNNERS = {"openvino": _openvino_runner, "onnxruntime": _onnxruntime_runner}


def segment_costs(folder: Path, engine: str = "openvino", batch: int = 1, warmup: int = 3, iters: int = 20,
                  threads: Optional[int] = None, manifest: Optional[Manifest] = None) -> Dict[str, float]:
    """Median milliseconds per call of every segment (stem, layer_1..N, head, full) on `engine`."""
    if engine not in _RUNNERS:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    manifest = manifest or load(folder, check=True)
    if not 1 <= batch <= manifest.max_batch:
        raise ValueError(f"batch must be in 1..{manifest.max_batch}, got {batch}")
    rng = np.random.default_rng(0)
    calls: Dict[str, Callable[[], object]] = {}
    for seg in manifest.segments:
        run = _RUNNERS[engine](Path(folder) / seg.file, threads, batch)
        feed = random_feed(seg, batch, rng, manifest.model["num_classes"])
        calls[seg.name] = functools.partial(run, feed)
    return {name: 1000.0 * sec for name, sec in timed_rounds(calls, warmup, iters).items()}


def exit_costs(costs: Dict[str, float], depth: int) -> List[float]:
    """Cost (ms) of a call that exits after layer i, i = 1..depth: stem + layers 1..i + head."""
    out, acc = [], costs["stem"] + costs["head"]
    for i in range(1, depth + 1):
        acc += costs[f"layer_{i}"]
        out.append(acc)
    return out


@dataclass
class ProfileRun:
    engine: str
    batch: int
    segments: Dict[str, float]  # ms per call
    exit_after: List[float]     # ms of a call exiting after layer i (index i-1)

    @property
    def full(self) -> float:
        return self.segments["full"]


@dataclass
class ProfileResult:
    folder: str
    runs: List[ProfileRun] = field(default_factory=list)
    trtexec: Dict[str, Dict[str, float]] = field(default_factory=dict)  # plan -> {"mean_ms", "median_ms"}
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_TRTEXEC_GPU = re.compile(r"GPU Compute Time: min = ([\d.]+) ms, max = ([\d.]+) ms, mean = ([\d.]+) ms, "
                          r"median = ([\d.]+) ms")


def trtexec_costs(folder: Path, manifest: Manifest, batch: int) -> Dict[str, Dict[str, float]]:
    """`trtexec --loadEngine` per plan at `batch`; GPU compute time parsed from its summary."""
    from .tensorrt_build import _shapes_arg

    out: Dict[str, Dict[str, float]] = {}
    for seg in manifest.segments:
        plan = manifest.tensorrt.plans[seg.name].file
        cmd = ["trtexec", f"--loadEngine={plan}", f"--shapes={_shapes_arg(seg, batch)}", "--useCudaGraph",
               "--noDataTransfers", "--useSpinWait"]
        res = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
        m = _TRTEXEC_GPU.search(res.stdout)
        if res.returncode != 0 or m is None:
            raise RuntimeError(f"trtexec failed on {plan} (segment {seg.name}): {res.stdout[-500:]}{res.stderr[-500:]}")
        out[seg.name] = {"mean_ms": float(m.group(3)), "median_ms": float(m.group(4))}
    return out


def profile_folder(folder: Path, engines: Sequence[str] = ENGINES, batches: Optional[Sequence[int]] = None,
                   warmup: int = 3, iters: int = 20, threads: Optional[int] = None,
                   log: Callable[[str], None] = print) -> ProfileResult:
    """Per-segment times on each engine and batch (default 1 and max_batch), plus trtexec where possible."""
    from tqdm import tqdm

    folder = Path(folder)
    manifest = load(folder, check=True)
    batches = list(batches) if batches else sorted({1, manifest.max_batch})
    result = ProfileResult(str(folder))
    for engine, batch in tqdm([(e, b) for e in engines for b in batches], desc="profile", leave=False):
        costs = segment_costs(folder, engine, batch, warmup, iters, threads, manifest)
        result.runs.append(ProfileRun(engine, batch, costs, exit_costs(costs, manifest.depth)))
    if manifest.tensorrt is None:
        result.notes.append("trtexec: this folder has no TensorRT plans")
    elif shutil.which("trtexec") is None:
        result.notes.append("trtexec: not on PATH; the plans were not profiled (see trtexec.sh)")
    else:
        result.trtexec = trtexec_costs(folder, manifest, manifest.tensorrt.profile.get("opt", 1))
    return result


def format_table(result: ProfileResult, depth: int) -> str:
    """Per-segment ms per engine/batch, then the cumulative cost of exiting after each layer."""
    cols = [f"{r.engine[:11]} b{r.batch}" for r in result.runs]
    head = f"{'segment':<10s}" + "".join(f"{c:>16s}" for c in cols)
    lines = ["per-segment latency (ms, median)", head]
    names = list(result.runs[0].segments) if result.runs else []
    for n in names:
        lines.append(f"{n:<10s}" + "".join(f"{r.segments[n]:>16.3f}" for r in result.runs))
    lines += ["", "cost of a call exiting after layer i (stem + layers 1..i + head), ms and fraction of full", head]
    for i in range(depth):
        lines.append(f"{'exit ' + str(i + 1):<10s}" + "".join(
            f"{r.exit_after[i]:>9.3f} ({r.exit_after[i] / r.full:4.2f})" for r in result.runs))
    for plan, v in result.trtexec.items():
        lines.append(f"trtexec {plan}: mean {v['mean_ms']:.4f} ms, median {v['median_ms']:.4f} ms")
    lines += result.notes
    return "\n".join(lines)
