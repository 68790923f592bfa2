"""A whole bench run: the quality runs, the timing cells of the shipped model and of the U-ViT-S/2 CIFAR-10
shape, the figures, and the files it writes (bench.md, bench.json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import fashion_mnist_test_for
from ..model.checkpoint import Loaded
from ..sampling.early_exit import ExitPolicy
from ..sampling.generate import default_guidance, default_threshold, exit_defaults, policy_label
from .config import BenchConfig
from .contenders import (CHAINED, AuthorsEarlyExit, Contender, RtSetting, authors_layers, engines_match, ensure_engines,
                         full_depth_peers, open_runtime, python_contender, rt_contender, static_contenders)
from .harness import (RT_PROMOTE_AFTER, Case, Row, SegmentCosts, finish_cell, machine, profile_segments,
                      time_interleaved)
from .quality import Quality, quality_runs, row_quality
from .report import goals, markdown, to_json


@dataclass
class BenchResult:
    rows: List[Row]
    machine: Dict[str, object]
    quality: Dict[str, Quality]
    figures: Dict[str, Path]
    default_threshold: float
    guidance: float
    matched_layers: float


def denoise_inputs(loaded: Loaded, batch: int, seed: int, real: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """x_t at times spread over (0, 1]: real images noised when given (a realistic mix of exit layers)."""
    c = loaded.model.config
    g = torch.Generator().manual_seed(seed)
    shape = (batch, c.in_chans, c.img_size, c.img_size)
    x0 = real[:batch] if real is not None and real.shape[0] >= batch else torch.randn(shape, generator=g).clamp(-1, 1)
    t = torch.linspace(1.0, loaded.schedule.t_eps, batch + 2, dtype=torch.float32)[1:-1] if batch > 1 else torch.tensor([0.5])
    x = loaded.schedule.add_noise(x0, t, torch.randn(shape, generator=g))
    y = torch.arange(batch) % c.num_classes if c.num_classes > 0 else None
    return x.float(), t, y


def time_cell(contenders: Sequence[Contender], model: str, workload: str, batch: int, inputs: tuple, steps: int,
              cfg: BenchConfig, tick: Callable[[], None]) -> List[Tuple[Row, np.ndarray]]:
    """Time every contender on the same inputs, interleaved; rows with ms, mean layers and prediction error.

    Returns each row with the exit layers of its first timed run (for the ideal speedup).
    """
    # adadiff_rt compiles a static-batch variant on the third call of a batch size (and the OpenVINO peer on its
    # first): warm-up passes that point, so no compile lands in a timed run. A sampling warm-up is the whole run:
    # a schedule's exit layer depends on the step's time, and each layer's fused graph is compiled on first use,
    # so a shorter run (its steps at other times) left those compiles in the first timed run (a batch-1 row
    # read 2.7 s against 0.15-0.19 s warm).
    cases = []
    for ct in contenders:
        if workload == "denoise":
            run = (lambda ct=ct: ct.denoise(*inputs))
            warm = (lambda run=run: [run() for _ in range(RT_PROMOTE_AFTER)])
        else:
            run = (lambda ct=ct: ct.sample(inputs[0], inputs[1], steps))
            warm = run
        cases.append(Case(ct.row(model, workload, batch), run, warm))
    time_interleaved(cases, cfg.repeats, cfg.warmup, tick)
    ref = next(c.output for c in cases if c.row.engine == "torch-eager" and c.row.policy == "full")
    for c in cases:
        c.row.pred_mse = float(((c.output.double() - ref.double()) ** 2).mean())
    return [(c.row, c.layers) for c in cases]


def _contenders(loaded: Loaded, engines: Path, runtime, cfg: BenchConfig, thr: float, w: float,
                static_layer: int, sat_threshold: float, sweep: Sequence[float]) -> List[Contender]:
    """Every peer and every setting of ours, in table order: the default policy (the checkpoint's) is marked."""
    m = loaded.model
    py = dict(schedule=loaded.schedule, guidance=w, null_class=m.config.num_classes)
    authors = AuthorsEarlyExit(m, thr)
    rt = dict(steps=cfg.steps, guidance=w, seed=cfg.seed)
    chained = open_runtime(engines, cfg.threads, fuse=False)
    default = default_policy(loaded)
    paper_default = default.kind == "uem"  # an uncalibrated checkpoint: the paper's rule is the default
    out = [
        *full_depth_peers(m, engines, cfg.threads, loaded.schedule, w, engines_used=cfg.peers),
        python_contender("torch-authors", "uem", authors, authors_layers, granularity="batch", threshold=thr,
                         default=paper_default, note="head+UEM at every layer, one decision per batch", **py),
        rt_contender(runtime, RtSetting("uem", 0.0), **rt),
    ]
    if not paper_default:
        out.append(rt_contender(runtime, RtSetting.of(default), default=True,
                                note=f"the default: {policy_note(default)}", **rt))
    out += [
        rt_contender(runtime, RtSetting("uem", thr, "sample"), default=paper_default, note="the paper's rule", **rt),
        rt_contender(chained, RtSetting("uem", thr, "sample"), note=CHAINED, **rt),
        rt_contender(runtime, RtSetting("uem", thr, "batch"), default=paper_default, **rt),
        *static_contenders(runtime, chained, static_layer, "matched layer budget", **rt),
        rt_contender(runtime, RtSetting("saturation", sat_threshold), note="matched layer budget", **rt),
    ]
    for t in sweep:
        if t != thr:
            out.append(rt_contender(runtime, RtSetting("uem", t, "sample"), in_sweep=True, **rt))
    return out


def default_policy(loaded: Loaded) -> ExitPolicy:
    """The checkpoint's default exit policy with its stored parameters."""
    d = exit_defaults(loaded)
    return ExitPolicy(d.policy, threshold=d.threshold, patience=d.patience, granularity=d.granularity,
                      layer=d.layer, table=d.table_for(d.policy))


def policy_note(p: ExitPolicy) -> str:
    """What a table note says of a policy's parameters."""
    if p.kind == "schedule":
        return "exit layers by time bin " + ",".join(str(v) for v in p.table.min_layers)
    if p.kind == "uem-time":
        return "uem-time, " + ",".join(f"{lo}-{hi}" for lo, hi in zip(p.table.min_layers, p.table.max_layers))
    return policy_label(p)


def _cells(cfg: BenchConfig) -> List[Tuple[str, int]]:
    """Whole sampling runs first, smallest and largest batch first (the headline cells), then single calls."""
    sb = sorted(cfg.sample_batches)
    order = [sb[0], sb[-1]] + sb[1:-1] if len(sb) > 1 else sb
    return [("sample", b) for b in order] + [("denoise", b) for b in cfg.denoise_batches]


def _cell_contenders(cts: Sequence[Contender], workload: str, batch: int, cfg: BenchConfig) -> List[Contender]:
    return [c for c in cts if not (c.in_sweep and workload == "sample" and batch not in cfg.sweep_batches)]


def run_small(loaded: Loaded, checkpoint: Path, cfg: BenchConfig, progress: bool = True,
              on_rows: Callable[[List[Row]], None] = lambda rows: None) -> BenchResult:
    """The whole bench on the shipped (or given) checkpoint: quality runs, timing cells, figures."""
    from tqdm import tqdm

    from ..quality.metrics import load_classifier

    thr = cfg.threshold if cfg.threshold is not None else default_threshold(loaded)
    w = cfg.guidance if cfg.guidance is not None else default_guidance(loaded)
    sweep = sorted({round(thr * k, 6) for k in cfg.sweep} | {thr})
    guided_rows = 2 if loaded.model.config.num_classes > 0 and w != 1.0 else 1
    # adadiff_rt runs up to twice the engines' max batch (both guidance halves), so sampling batch B needs max_batch >= B
    need = max(max(cfg.denoise_batches), max(cfg.sample_batches), min(64, cfg.n_quality))
    engines = next((e for e in cfg.engines_candidates if engines_match(e, checkpoint, need)), None)
    engines = engines or ensure_engines(checkpoint, cfg.out / "engines_small", need)
    max_batch = int(json.loads((engines / "manifest.json").read_text())["max_batch"])
    runtime = open_runtime(engines, cfg.threads)
    clf = load_classifier()
    n_quality_runs = 2 + 3 * len(sweep)
    bar = tqdm(total=n_quality_runs, desc="quality", disable=not progress, dynamic_ncols=True)
    quality, sat_thr = quality_runs(loaded, runtime, clf, cfg, thr, w, sweep, bar, default_policy(loaded))
    bar.close()
    figs = _figures(loaded, quality, thr, w, sat_thr, cfg)
    matched = quality[f"uem/sample/{thr:g}"].mean_layers
    static_layer = max(1, min(loaded.model.depth, int(round(matched))))
    cts = _contenders(loaded, engines, runtime, cfg, thr, w, static_layer, sat_thr[f"{thr:g}"], sweep)
    real = _real_images(loaded)
    rows: List[Row] = []
    total = sum(len(_cell_contenders(cts, wl, b, cfg)) for wl, b in _cells(cfg)) * cfg.repeats
    bar = tqdm(total=total, desc="timing", disable=not progress, dynamic_ncols=True)
    costs: Dict[int, SegmentCosts] = {}
    c = loaded.model.config
    for workload, b in _cells(cfg):
        bar.set_postfix_str(f"{workload} batch {b}")
        if workload == "denoise":
            inputs = denoise_inputs(loaded, b, cfg.seed, real)
        else:
            from ..sampling.generate import noise_and_labels

            inputs = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, b, cfg.seed)
        cell = time_cell(_cell_contenders(cts, workload, b, cfg), "small", workload, b, inputs, cfg.steps, cfg,
                         lambda: bar.update(1))
        # segments are profiled up to the engines' max batch (cost ratios barely move between 64 and 128 rows)
        eff_b = min(max_batch, b if workload == "denoise" else guided_rows * b)
        if eff_b not in costs:
            costs[eff_b] = profile_segments(engines, eff_b, threads=cfg.threads)
        rows += finish_cell(cell, costs[eff_b])
        on_rows(rows)
    bar.close()
    for r in rows:
        qq = row_quality(r, quality, thr)
        if qq is not None:
            r.fd, r.accuracy = qq.fd, qq.accuracy
    return BenchResult(rows, machine(), quality, figs, thr, w, matched)


def _real_images(loaded: Loaded) -> Optional[Tensor]:
    """Fashion-MNIST test images for the denoise inputs when the model has that shape, else None (the data
    package is optional for timing; random images do as well)."""
    c = loaded.model.config
    test = fashion_mnist_test_for(c.img_size, c.in_chans)
    return None if test is None else test.images[:128]


def _figures(loaded: Loaded, quality: Dict[str, Quality], thr: float, w: float, sat_thr: Dict[str, float],
             cfg: BenchConfig) -> Dict[str, Path]:
    """Figure 5 from the quality runs, Figures 1, 3, 4 and 6 from the PyTorch oracle, written into cfg.out."""
    from . import figures as F

    pts = []
    for key, q in quality.items():
        parts = key.split("/")
        if parts[0] == "uem" and parts[1] == "sample":
            pts.append(F.TradeoffPoint("uem", float(parts[2]), q.ms_per_chunk, q.fd, q.mean_layers))
        elif parts[0] == "static":
            pts.append(F.TradeoffPoint("static", float(parts[1]), q.ms_per_chunk, q.fd, q.mean_layers))
        elif parts[0] == "saturation":
            pts.append(F.TradeoffPoint("saturation", sat_thr[parts[1]], q.ms_per_chunk, q.fd, q.mean_layers))
    full = quality["full"]
    out = {"fig5_tradeoff": F.plot_tradeoff(
        pts, cfg.out / "fig5_tradeoff.png", full.ms_per_chunk, full.fd, full_layers=float(loaded.model.depth),
        title=f"Quality vs. time, {full.chunk} images per 50-step DPM-Solver++ run (guidance {w:g})")}
    data = F.oracle_figure_data(loaded.model, loaded.schedule, thr, n=8 if cfg.n_quality < 128 else 16,
                                steps=cfg.steps, guidance=w, seed=cfg.seed)
    out.update(F.write_oracle_figures(data, cfg.out, loaded.model.depth))
    return out


def run_cifar_shape(cfg: BenchConfig, static_layer: int, progress: bool = True) -> List[Row]:
    """The U-ViT-S/2 CIFAR-10 shape, untrained: exported and timed like the shipped model (denoise only)."""
    from tqdm import tqdm

    from ..model.checkpoint import load, save_untrained
    from ..model.config import preset

    ckpt = save_untrained(preset("uvit-s-cifar10"), cfg.out / "uvit_s_cifar10_untrained.pt", cfg.seed)
    loaded = load(ckpt)
    engines = ensure_engines(ckpt, cfg.out / "engines_uvit_s_cifar10", max(cfg.cifar_batches))
    runtime = open_runtime(engines, cfg.threads)
    rt = dict(steps=cfg.steps, guidance=1.0, seed=cfg.seed)
    note = "untrained weights; static exit at the shipped model's mean layers"
    cts = [
        *full_depth_peers(loaded.model, engines, cfg.threads, loaded.schedule, 1.0,
                          engines_used=("torch-eager", "onnxruntime", "openvino")),
        rt_contender(runtime, RtSetting("uem", 0.0), **rt),
        *static_contenders(runtime, open_runtime(engines, cfg.threads, fuse=False), static_layer, note, **rt),
    ]
    rows: List[Row] = []
    bar = tqdm(total=len(cts) * cfg.repeats * len(cfg.cifar_batches), desc="uvit-s-cifar10", disable=not progress)
    for b in cfg.cifar_batches:
        cell = time_cell(cts, "uvit-s-cifar10", "denoise", b, denoise_inputs(loaded, b, cfg.seed, None), cfg.steps, cfg,
                         lambda: bar.update(1))
        rows += finish_cell(cell, profile_segments(engines, b, threads=cfg.threads))
    bar.close()
    return rows


def run(cfg: BenchConfig, command: str, json_path: Optional[Path] = None, progress: bool = True) -> BenchResult:
    """Run the bench and write bench.md, bench.json and the figures into cfg.out (and JSON to json_path)."""
    from ..model.checkpoint import SHIPPED_CHECKPOINT, load

    if cfg.n_quality < 2:
        raise ValueError(f"--n must be at least 2 (FD needs a covariance), got {cfg.n_quality}")
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint is not None else SHIPPED_CHECKPOINT
    loaded = load(checkpoint)
    cfg.out.mkdir(parents=True, exist_ok=True)
    info = machine()

    def write(rows: List[Row], done: bool) -> None:
        md = markdown(rows, info, command) if done else "(partial: the run is still going)\n\n" + markdown(rows, info, command)
        md += "\nGoals (issue 5; whole sampling run, adadiff_rt at the default threshold, granularity sample):\n\n"
        md += "\n".join(f"- {line}" for line in goals(rows)) + "\n"
        (cfg.out / "bench.md").write_text(md + "\n")
        payload = json.dumps(to_json(rows, info), indent=1)
        (cfg.out / "bench.json").write_text(payload + "\n")
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(payload + "\n")

    res = run_small(loaded, checkpoint, cfg, progress, on_rows=lambda rows: write(rows, False))
    if cfg.cifar:
        res.rows += run_cifar_shape(cfg, max(1, int(round(res.matched_layers))), progress)
    write(res.rows, True)
    return res
