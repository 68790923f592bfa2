"""A closed-loop load test of `adadiff_sample`: the same workload at full depth and at the default exit policy.

`concurrency` clients each send one request (one sample) and send the next when the answer comes, until
`requests` have been sent; the server's dynamic batcher turns what arrives together into batches. Request i
carries the same noise (seeded by i) and label (i mod `num_classes`) in every mode, so the modes differ only in
how samples exit: `full depth` sends threshold 0 (every layer, which the server runs as one graph), `default` sends no
threshold (the engines' default policy). Each (concurrency, mode) cell is warmed up first (`warmup` requests,
not counted: the first batches of each size compile OpenVINO graphs) and, with `rounds` > 1, measured in
alternating slices so that both modes see the same background load.

Reported per cell: throughput (answered images per second of wall time), latency percentiles of the answered
requests, the mean layers the server reports, and the errors (a refused, failed or timed-out request; a request
is never dropped silently: every one sent is counted as answered or as an error).
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .client import Client
from .protocol import SAMPLE_MODEL

MODES = {"full depth": 0.0, "default": None}   # mode -> the threshold a request carries (None: none sent)


@dataclasses.dataclass
class Workload:
    url: str
    requests: int = 256
    steps: Optional[int] = None        # None: the server's default (50)
    num_classes: int = 10
    seed: int = 0
    warmup: Optional[int] = None       # None: one batch's worth (the concurrency)
    rounds: int = 1
    timeout: float = 300.0
    protocol: str = ""

    def check(self) -> None:
        if self.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.requests}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.num_classes < 1:
            raise ValueError(f"--num-classes must be >= 1, got {self.num_classes}")
        if self.rounds < 1 or self.rounds > self.requests:
            raise ValueError(f"--rounds must be in 1..--requests, got {self.rounds}")


@dataclasses.dataclass
class Cell:
    """What one mode measured at one concurrency."""

    mode: str
    concurrency: int
    sent: int = 0
    answered: int = 0
    seconds: float = 0.0
    latencies: List[float] = dataclasses.field(default_factory=list)
    layers: List[float] = dataclasses.field(default_factory=list)
    errors: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> Dict[str, object]:
        lat = np.asarray(self.latencies) * 1000.0
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) if lat.size else None for q in (50, 95, 99)}
        return {"mode": self.mode, "concurrency": self.concurrency, "requests": self.sent, "answered": self.answered,
                "errors": len(self.errors),
                "images_per_s": round(self.answered / self.seconds, 3) if self.seconds > 0 else None, **pct,
                "mean_layers": round(float(np.mean(self.layers)), 3) if self.layers else None,
                "first_error": self.errors[0] if self.errors else None}


def request_inputs(i: int, shapes: Dict[str, List[int]], w: Workload, threshold: Optional[float]) -> Dict[str, np.ndarray]:
    """Request i of the workload (the same noise and label in every mode)."""
    rng = np.random.default_rng([w.seed, i])
    inputs = {"noise": rng.standard_normal((1, *shapes["noise"]), dtype=np.float32)}
    if "label" in shapes:
        inputs["label"] = np.array([[i % w.num_classes]], np.int64)
    if threshold is not None:
        inputs["threshold"] = np.array([[threshold]], np.float32)
    if w.steps is not None:
        inputs["steps"] = np.array([[w.steps]], np.int32)
    return inputs


def _drive(w: Workload, shapes, threshold: Optional[float], indices: Sequence[int], concurrency: int,
           cell: Optional[Cell], tick: Callable[[], None]) -> None:
    """Send `indices` with `concurrency` closed-loop clients; record into `cell` (None: a warm-up)."""
    lock = threading.Lock()
    queue = list(reversed(indices))

    def worker() -> None:
        with Client(w.url, w.protocol, w.timeout) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop()
                inputs = request_inputs(i, shapes, w, threshold)
                start = time.perf_counter()
                try:
                    out = client.infer(SAMPLE_MODEL, inputs, ("image", "layers"))
                    error = None if out["image"].shape[0] == 1 else f"request {i}: {out['image'].shape[0]} images back"
                except Exception as e:  # noqa: BLE001 - every failure of a request is counted, none is lost
                    error, out = f"request {i}: {type(e).__name__}: {e}", None
                elapsed = time.perf_counter() - start
                with lock:
                    if cell is not None:
                        cell.sent += 1
                        if error is None:
                            cell.answered += 1
                            cell.latencies.append(elapsed)
                            cell.layers.append(float(out["layers"].reshape(-1)[0]))
                        else:
                            cell.errors.append(error)
                tick()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(indices)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if cell is not None:
        cell.seconds += time.perf_counter() - start


def run(w: Workload, concurrencies: Sequence[int], progress: bool = True,
        log: Callable[[str], None] = lambda _m: None) -> List[Cell]:
    """Every mode at every concurrency; returns the cells in (concurrency, mode) order."""
    from tqdm import tqdm

    w.check()
    try:
        with Client(w.url, w.protocol, w.timeout) as client:
            ready = client.ready(SAMPLE_MODEL)
            shapes = client.input_shapes(SAMPLE_MODEL) if ready else None
    except Exception as e:  # noqa: BLE001 - refused, unreachable, not a Triton server: all say the same to the user
        raise ConnectionError(f"{type(e).__name__}: {e}") from None
    if not ready:
        raise ConnectionError(f"{SAMPLE_MODEL} is not ready")
    cells: List[Cell] = []
    for c in concurrencies:
        if c < 1:
            raise ValueError(f"--concurrency must be >= 1, got {c}")
        if w.requests // w.rounds < c:  # a slice smaller than the concurrency would measure a lower one
            raise ValueError(f"--requests / --rounds = {w.requests // w.rounds} is below --concurrency {c}: "
                             "each measured slice needs at least one request per client")
        warmup = c if w.warmup is None else w.warmup
        by_mode = {mode: Cell(mode, c) for mode in MODES}
        total = len(MODES) * (warmup + w.requests)
        with tqdm(total=total, desc=f"concurrency {c}", unit="req", disable=not progress, leave=False) as bar:
            for mode, threshold in MODES.items():
                bar.set_postfix_str(f"{mode} warm-up")
                _drive(w, shapes, threshold, range(w.requests, w.requests + warmup), c, None, bar.update)
            slices = np.array_split(np.arange(w.requests), w.rounds)
            for part in slices:
                for mode, threshold in MODES.items():
                    bar.set_postfix_str(mode)
                    _drive(w, shapes, threshold, part.tolist(), c, by_mode[mode], bar.update)
        for cell in by_mode.values():
            s = cell.summary()
            log(f"concurrency {c}, {cell.mode}: {s['images_per_s']} images/s, p50 {s['p50_ms']} ms, "
                f"p99 {s['p99_ms']} ms, mean layers {s['mean_layers']}, errors {s['errors']}")
        cells.extend(by_mode.values())
    return cells


def ratios(cells: Sequence[Cell]) -> List[Dict[str, object]]:
    """Per concurrency: the default policy against full depth (throughput and p99 latency ratios)."""
    out = []
    for c in sorted({cell.concurrency for cell in cells}):
        s = {cell.mode: cell.summary() for cell in cells if cell.concurrency == c}
        full, default = s["full depth"], s["default"]
        ok = full["images_per_s"] and default["images_per_s"] and full["p99_ms"] and default["p99_ms"]
        out.append({"concurrency": c,
                    "throughput_ratio": round(default["images_per_s"] / full["images_per_s"], 3) if ok else None,
                    "p99_ratio": round(default["p99_ms"] / full["p99_ms"], 3) if ok else None})
    return out


def table(cells: Sequence[Cell]) -> str:
    """The markdown table of README / BENCHMARKS.md."""
    r = {x["concurrency"]: x for x in ratios(cells)}
    lines = ["| concurrency | policy | requests | errors | images/s | p50 ms | p95 ms | p99 ms | mean layers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        s = cell.summary()
        lines.append(f"| {s['concurrency']} | {s['mode']} | {s['requests']} | {s['errors']} | {s['images_per_s']} | "
                     f"{s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['mean_layers']} |")
    lines.append("")
    for c, x in r.items():
        lines.append(f"concurrency {c}: default policy / full depth: throughput x{x['throughput_ratio']}, "
                     f"p99 latency x{x['p99_ratio']}")
    return "\n".join(lines)


def summary_json(w: Workload, cells: Sequence[Cell]) -> str:
    return json.dumps({"url": w.url, "requests": w.requests, "steps": w.steps, "rounds": w.rounds,
                       "cells": [c.summary() for c in cells], "ratios": ratios(cells)})


def plot(cells: Sequence[Cell], path: Path, title: str = "") -> Path:
    """Latency (p50 and p99) against throughput, one line per mode, each point labeled with its concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import write_atomically

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for mode, color in zip(MODES, ("tab:gray", "tab:blue")):
        pts = [c.summary() for c in cells if c.mode == mode and c.answered]
        x = [p["images_per_s"] for p in pts]
        for q, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(x, [p[q] for p in pts], style, color=color, label=f"{mode}, {q[:3]}")
        for p in pts:
            ax.annotate(f"c={p['concurrency']}", (p["images_per_s"], p["p99_ms"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=color)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "adadiff_sample under load: latency against throughput", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
