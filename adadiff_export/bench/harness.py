"""The bench's timing harness: the machine line, interleaved timing with medians, and the ideal speedup.

Cases of one (workload, batch) cell run round-robin, the order rotating every round, so a burst of load from
elsewhere on a shared machine lands on every case alike; medians after warm-up. The ideal speedup is what
the layers a case actually ran would save if the runtime cost nothing around them, from the per-segment costs
`export.profile` measures.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


RT_PROMOTE_AFTER = 3  # adadiff_rt's OpenVINO engine compiles a batch size statically on its third run


@dataclass
class Row:
    """One line of the table (and of the JSON list)."""

    model: str
    workload: str                 # denoise | sample
    batch: int
    engine: str
    policy: str                   # full | uem | static | saturation
    granularity: str              # sample | batch | "-"
    threshold: Optional[float]
    ms: float
    mean_layers: float
    speedup: float = float("nan")
    ideal_speedup: float = float("nan")
    efficiency: float = float("nan")
    fd: float = float("nan")
    accuracy: float = float("nan")
    pred_mse: float = float("nan")
    default: bool = False
    static_layer: Optional[int] = None
    note: str = ""


def machine() -> Dict[str, object]:
    """CPU model and vector ISA from /proc/cpuinfo, logical CPUs, and the versions of every engine measured."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    except OSError:
        pass
    # OpenVINO picks its kernels by vector ISA, and VMs of one name differ in it from host to host.
    isa = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "")
    info: Dict[str, object] = {"cpu": model, "isa": isa, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    for mod in ("onnxruntime", "openvino", "adadiff_rt"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            info[mod] = None
    return info


def machine_line(info: Dict[str, object]) -> str:
    isa = f" ({info['isa']})" if info.get("isa") else ""
    return (f"{info['cpu']}{isa}, {info['logical_cpus']} logical CPUs, torch {info['torch']} ({info['torch_threads']} threads), "
            f"onnxruntime {info.get('onnxruntime')}, OpenVINO {info.get('openvino')}")


@dataclass
class Case:
    """One thing to time: `run()` does the work and returns its output and the exit layers it used."""

    row: Row
    run: Callable[[], Tuple[Tensor, np.ndarray]]
    warm: Optional[Callable[[], object]] = None  # cheaper warm-up (default: `run`)
    times: List[float] = field(default_factory=list)
    output: Optional[Tensor] = None
    layers: Optional[np.ndarray] = None


def rotating_times(calls: Sequence[Callable[[], object]], repeats: int,
                   after: Callable[[], None] = lambda: None) -> List[List[float]]:
    """Seconds of each call over `repeats` rounds, the order rotating every round so none always goes first
    (load from elsewhere on a shared machine then lands on all alike); `after` runs untimed after each call."""
    times: List[List[float]] = [[] for _ in calls]
    for r in range(repeats):
        for j in range(len(calls)):
            k = (j + r) % len(calls)
            start = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - start)
            after()
    return times


def time_interleaved(cases: Sequence[Case], repeats: int, warmup: int, tick: Callable[[], None] = lambda: None) -> None:
    """Warm every case up, then run them round-robin `repeats` times (rotating who goes first)."""
    for c in cases:
        for _ in range(warmup):
            (c.warm or c.run)()

    def keep_first(c: Case) -> None:
        out, layers = c.run()
        if c.output is None:
            c.output, c.layers = out, layers

    times = rotating_times([lambda c=c: keep_first(c) for c in cases], repeats, after=tick)
    for c, t in zip(cases, times):
        c.times.extend(1e3 * x for x in t)
    for c in cases:
        c.row.ms = statistics.median(c.times)
        if c.layers is not None and c.layers.size:
            c.row.mean_layers = float(np.mean(c.layers))


@dataclass
class SegmentCosts:
    """Median latency (ms) of each segment at one batch size."""

    batch: int
    stem: float
    layers: List[float]
    head: float

    @property
    def full_depth(self) -> float:
        return self.stem + sum(self.layers) + self.head


def ideal_speedup(layers: np.ndarray, costs: SegmentCosts) -> float:
    """Full-depth segment cost over the cost of the layers actually run (rows exiting at `layers`).

    `layers` is [B] (one call) or [calls, B]; each call pays stem and head once and layer i in
    proportion to the rows still running at layer i (the cost model of per-sample compaction).
    """
    calls = np.atleast_2d(layers)
    n = len(costs.layers)
    depth = np.arange(1, n + 1)
    frac = (calls[:, :, None] >= depth[None, None, :]).mean(axis=1)  # [calls, N]
    spent = calls.shape[0] * (costs.stem + costs.head) + float((frac * np.asarray(costs.layers)).sum())
    return calls.shape[0] * costs.full_depth / spent


def profile_segments(engines: Path, batch: int, threads: int = 0) -> SegmentCosts:
    """Per-segment latency at `batch` through OpenVINO f32 (the engine adadiff_rt runs on CPU), from `profile`."""
    from ..export.profile import segment_costs

    costs = segment_costs(engines, engine="openvino", batch=batch, warmup=2, iters=7, threads=threads or None)
    n = sum(1 for k in costs if k.startswith("layer_"))
    return SegmentCosts(batch, costs["stem"], [costs[f"layer_{i}"] for i in range(1, n + 1)], costs["head"])


FULL_PEERS = ("torch-eager", "torch-compile", "onnxruntime", "openvino")


def finish_cell(cell: List[Tuple[Row, np.ndarray]], costs: SegmentCosts,
                full_peers: Sequence[str] = FULL_PEERS) -> List[Row]:
    """Speedup over the fastest full-depth peer of the cell, ideal speedup and efficiency."""
    fastest = min(r.ms for r, _ in cell if r.policy == "full" and r.engine in full_peers)
    for r, layers in cell:
        r.speedup = fastest / r.ms
        r.ideal_speedup = ideal_speedup(layers, costs)
        r.efficiency = r.speedup / r.ideal_speedup
    return [r for r, _ in cell]
