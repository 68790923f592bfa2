"""`python -m adadiff_export demo`: the whole toolchain on the shipped checkpoint in a few minutes.

Build the engines (into `engines/` unless a valid build of this checkpoint is already there),
verify them, sample with adadiff_rt at full depth and at the shipped default threshold, time the
same sampling run with PyTorch eager and OpenVINO on the full graph, print a short speed and
quality table, and write the pictures.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .contenders import Contender, RtSetting, engines_match, full_depth_peers, open_runtime, rt_contender
from ..model.checkpoint import SHIPPED_CHECKPOINT, Loaded, load
from .harness import machine, machine_line
from .quality import Quality, measure_quality


@dataclass(frozen=True)
class DemoConfig:
    checkpoint: Optional[Path] = None
    engines: Path = Path("engines")
    out: Path = Path("demo_out")
    n: int = 128
    steps: int = 50
    seed: int = 0
    threads: int = 0


def prepare_engines(engines: Path, checkpoint: Path, log: Callable[[str], None] = print) -> str:
    """Build unless a valid build is there, then verify; returns what was done, for the log."""
    from ..export.build import build_engines
    from ..export.verify import verify

    def indented(line: str) -> None:
        log("    " + line)

    did = "reused"
    if not engines_match(engines, checkpoint):
        build_engines(checkpoint, engines, max_batch=64, precision="fp32", tensorrt="auto", force=True, log=indented)
        did = "built"
    verify(engines, checkpoint, log=indented)
    return did


RT_FULL, RT_DEFAULT = "adadiff_rt, threshold 0 (all layers)", "adadiff_rt, default policy"


def _contenders(loaded: Loaded, engines: Path, runtime, cfg: DemoConfig, thr: float, w: float) -> Dict[str, Contender]:
    from .run import default_policy

    eager, openvino = full_depth_peers(loaded.model, engines, cfg.threads, loaded.schedule, w,
                                       engines_used=("torch-eager", "openvino"))
    rt = dict(steps=cfg.steps, guidance=w, seed=cfg.seed)
    default = default_policy(loaded)
    out = {
        "PyTorch eager, full depth": eager,
        "OpenVINO f32, full graph": openvino,
        RT_FULL: rt_contender(runtime, RtSetting("uem", 0.0), **rt),
        f"{RT_DEFAULT} ({default.kind})": rt_contender(runtime, RtSetting.of(default), **rt),
    }
    if default.kind != "uem":
        out[f"adadiff_rt, paper's uem at {thr:g}"] = rt_contender(runtime, RtSetting("uem", thr), **rt)
    return out


def _default_key(results) -> str:
    return next(k for k in results if k.startswith(RT_DEFAULT))


def table(results: Dict[str, Quality], n_layers: int, steps: int) -> str:
    """A short fixed-width table: time per run, speedup over the fastest full-depth peer, layers, FD, accuracy."""
    peers = [q.ms_per_chunk for name, q in results.items() if "full" in name]
    fastest = min(peers)
    head = f"{'engine and setting':40s} {'ms/run':>9s} {'speedup':>8s} {'layers':>7s} {'FD':>7s} {'acc %':>6s}"
    lines = [head, "-" * len(head)]
    for name, q in results.items():
        lines.append(f"{name:40s} {q.ms_per_chunk:9.0f} {fastest / q.ms_per_chunk:7.2f}x {q.mean_layers:7.2f} "
                     f"{q.fd:7.2f} {q.accuracy * 100:6.1f}")
    lines.append(f"(ms/run: median time of one {steps}-step DPM-Solver++ run of {next(iter(results.values())).chunk} "
                 f"images with guidance; layers of {n_layers}; FD in the shipped classifier's feature space, "
                 "not Inception FID)")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, progress: bool = True, log: Callable[[str], None] = print) -> List[Path]:
    """Everything the demo does, each step reported through `log`; returns the paths of the pictures."""
    from tqdm import tqdm

    from ..quality.metrics import load_classifier
    from ..sampling.generate import default_guidance, default_threshold

    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint is not None else SHIPPED_CHECKPOINT
    loaded = load(checkpoint)
    thr, w = default_threshold(loaded), default_guidance(loaded)
    log(f"[1/4] engines in {cfg.engines}")
    log(f"    engines {prepare_engines(cfg.engines, checkpoint, log)} and verified")
    runtime = open_runtime(cfg.engines, cfg.threads)
    max_batch = int(json.loads((cfg.engines / "manifest.json").read_text())["max_batch"])
    c = loaded.model.config
    chunk = max(1, min(cfg.n, max_batch // (2 if c.num_classes > 0 and w != 1.0 else 1)))
    clf = load_classifier()
    log(f"[2/4] sampling {cfg.n} images per setting (batch {chunk}, {cfg.steps} steps, guidance {w:g})")
    results: Dict[str, Quality] = {}
    cts = _contenders(loaded, cfg.engines, runtime, cfg, thr, w)
    shape = (c.in_chans, c.img_size, c.img_size)
    for name, ct in tqdm(cts.items(), desc="settings", disable=not progress):
        results[name] = measure_quality(ct.sample, clf, shape, c.num_classes, cfg.n, chunk, cfg.steps, cfg.seed)
    # The baseline a learned exit has to beat: every sample stops after the same layer, at the
    # default's layer budget (OpenVINO runs it as one fused graph).
    static = max(1, min(c.depth, int(round(results[_default_key(results)].mean_layers))))
    ct = rt_contender(runtime, RtSetting("static", static_layer=static), steps=cfg.steps, guidance=w, seed=cfg.seed)
    results[f"adadiff_rt, static exit after layer {static}"] = measure_quality(ct.sample, clf, shape, c.num_classes,
                                                                               cfg.n, chunk, cfg.steps, cfg.seed)
    log(f"[3/4] results on {machine_line(machine())}")
    log(table(results, loaded.model.depth, cfg.steps))
    from .run import default_policy, policy_note

    log(f"default policy: {policy_note(default_policy(loaded))}")
    log("[4/4] pictures")
    paths = _pictures(loaded, cts, cfg, thr, w)
    for p in paths:
        log(f"  {p}")
    log(f"pictures are in {cfg.out.resolve()}")
    return paths


def _pictures(loaded: Loaded, cts: Dict[str, Contender], cfg: DemoConfig, thr: float, w: float) -> List[Path]:
    """Figures 3 and 4 from adadiff_rt (same noise, 16 images), Figures 1 and 6 from the PyTorch oracle."""
    from ..sampling.generate import noise_and_labels
    from ..sampling.samplers import time_grid
    from . import figures as F
    from .run import default_policy

    c = loaded.model.config
    noise, labels = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, 16, cfg.seed)
    full_img, _ = cts[RT_FULL].sample(noise, labels, cfg.steps)
    exit_img, used = cts[_default_key(cts)].sample(noise, labels, cfg.steps)
    used = np.asarray(used)[:, :16]
    cfg.out.mkdir(parents=True, exist_ok=True)
    steps_t = time_grid(loaded.schedule, cfg.steps).numpy()[:-1]
    out = [F.plot_side_by_side(full_img, exit_img, cfg.out / "fig4_side_by_side.png", float(c.depth), float(used.mean())),
           F.plot_exit_heatmap(used, steps_t, c.depth, cfg.out / "fig3_exit_heatmap.png", thr,
                               policy=f"default policy: {default_policy(loaded).kind}")]
    data = F.oracle_figure_data(loaded.model, loaded.schedule, thr, n=4, steps=cfg.steps, guidance=w, seed=cfg.seed)
    out.append(F.plot_layer_error(data.layer_error_t, data.layer_error, cfg.out / "fig1_layer_error.png"))
    out.append(F.plot_uncertainty_maps(data.u_maps, data.x0_preview, data.u_map_steps, data.step_times,
                                       data.u_map_layer, cfg.out / "fig6_uncertainty_maps.png"))
    return out
