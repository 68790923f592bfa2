"""The bench's quality figures: FD and class accuracy of each setting from one sampling run of n images, and
saturation matched to a layer budget. FD is in the shipped classifier's feature space, not Inception FID.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..calibration.search import match_threshold
from ..model.checkpoint import Loaded
from ..sampling.early_exit import ExitPolicy
from ..quality.metrics import class_accuracy, fd_to_test_set
from ..sampling.generate import noise_and_labels
from .config import BenchConfig
from .contenders import RtSetting, SampleFn, rt_contender
from .harness import Row


@dataclass
class Quality:
    fd: float
    accuracy: float
    mean_layers: float
    ms_per_chunk: float   # median wall time of one 50-step run of `chunk` images (Figure 5's time axis)
    chunk: int


def measure_quality(sample_fn: SampleFn, clf, shape: Tuple[int, int, int], num_classes: int, n: int, chunk: int,
                    steps: int, seed: int) -> Quality:
    """Sample n images (labels i % classes) in chunks with `sample_fn`, then FD and class accuracy."""
    noise, labels = noise_and_labels(shape, num_classes, n, seed)
    images, layers, ms = [], [], []
    for i in range(0, n, chunk):
        sl = slice(i, min(n, i + chunk))
        start = time.perf_counter()
        img, used = sample_fn(noise[sl], None if labels is None else labels[sl], steps)
        ms.append((time.perf_counter() - start) * 1e3)
        images.append(img)
        layers.append(np.asarray(used).reshape(-1))
    images_t = torch.cat(images)
    acc = class_accuracy(clf, images_t, labels) if labels is not None else float("nan")
    return Quality(fd_to_test_set(clf, images_t), acc, float(np.concatenate(layers).mean()), statistics.median(ms), chunk)


def quality_runs(loaded: Loaded, runtime, clf, cfg: BenchConfig, thr: float, w: float, sweep: Sequence[float],
                 progress, default: Optional[ExitPolicy] = None) -> Tuple[Dict[str, Quality], Dict[str, float]]:
    """FD/accuracy for full depth, the default policy (when it is not the paper's uem), the uem sweep (both
    granularities at the default threshold), static and saturation matched to each uem point. Returns the
    qualities by key and the saturation thresholds by uem threshold."""

    c = loaded.model.config
    shape, chunk = (c.in_chans, c.img_size, c.img_size), min(64, cfg.n_quality)
    qa = dict(clf=clf, shape=shape, num_classes=c.num_classes, n=cfg.n_quality, chunk=chunk, steps=cfg.steps, seed=cfg.seed)
    rt = dict(steps=cfg.steps, guidance=w, seed=cfg.seed)
    q: Dict[str, Quality] = {}

    def run(key: str, sample_fn: SampleFn) -> Quality:
        progress.set_postfix_str(key)
        q[key] = measure_quality(sample_fn, **qa)
        progress.update(1)
        return q[key]

    run("full", rt_contender(runtime, RtSetting("uem", 0.0), **rt).sample)
    if default is not None and default.kind != "uem":
        run(f"default/{default.kind}", rt_contender(runtime, RtSetting.of(default), **rt).sample)
    run(f"uem/batch/{thr:g}", rt_contender(runtime, RtSetting("uem", thr, "batch"), **rt).sample)
    probe = noise_and_labels(shape, c.num_classes, 4, cfg.seed + 7)
    sat_thr: Dict[str, float] = {}

    def saturation_layers(th: float) -> float:
        return float(np.mean(rt_contender(runtime, RtSetting("saturation", th), **rt).sample(*probe, cfg.steps)[1]))

    for t in sweep:
        layers = run(f"uem/sample/{t:g}", rt_contender(runtime, RtSetting("uem", t), **rt).sample).mean_layers
        static = max(1, min(loaded.model.depth, int(round(layers))))
        if f"static/{static}" not in q:
            run(f"static/{static}", rt_contender(runtime, RtSetting("static", static_layer=static), **rt).sample)
        st = match_threshold(saturation_layers, layers)
        sat_thr[f"{t:g}"] = st
        run(f"saturation/{t:g}", rt_contender(runtime, RtSetting("saturation", st), **rt).sample)
    return q, sat_thr


def row_quality(r: Row, q: Dict[str, Quality], thr: float) -> Optional[Quality]:
    """The quality figures that belong to a timed row (its setting's sampling run)."""
    if r.policy == "full":
        return q.get("full")
    if r.policy in ("schedule", "uem-time"):
        return q.get(f"default/{r.policy}")
    if r.engine == "torch-authors":
        return q.get(f"uem/batch/{thr:g}")
    if r.policy == "static":
        return q.get(f"static/{r.static_layer}")
    if r.policy == "saturation":
        return q.get(f"saturation/{thr:g}")
    return q.get(f"uem/{r.granularity}/{r.threshold:g}")
