"""The paper's figures as PNG files (matplotlib, Agg backend).

Each `plot_*` function takes measured data and writes one PNG; `oracle_figure_data`
measures the data of Figures 1, 3, 4 and 6 from a model with the PyTorch reference
early exit (`adadiff_export.sampling.early_exit`). Figure 5 (the quality-speed trade-off)
takes the rows of a benchmark run, so its time axis is measured wall-clock time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..model.schedule import VPSchedule
from ..model.uvit import UViT
from ..sampling.early_exit import EarlyExitDenoiser, ExitPolicy, FULL_DEPTH
from ..sampling.images import grid
from ..sampling.samplers import guided, sample, time_grid

DPI = 110
POLICY_STYLE = {"uem": ("tab:blue", "o"), "static": ("tab:orange", "s"), "saturation": ("tab:green", "^")}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


@dataclass
class TradeoffPoint:
    """One point of Figure 5: a policy setting, its time and its quality."""

    policy: str          # uem | static | saturation
    setting: float       # threshold (uem, saturation) or exit layer (static)
    ms: float            # wall-clock time of the workload
    fd: float            # Frechet distance to the test set (lower is better)
    mean_layers: float


@dataclass
class OracleFigureData:
    """What Figures 1, 3, 4 and 6 show, measured with the reference early exit."""

    layer_error_t: List[float]         # Figure 1: times at which the per-layer error was measured
    layer_error: np.ndarray            # [len(t), N] mse(eps_i, eps_N)
    layers_by_step: np.ndarray         # Figure 3: [steps, B] exit layer of each sample at each step
    step_times: np.ndarray             # [steps] the time t of each step
    full_images: Tensor                # Figure 4: [B, C, H, W] full depth
    exit_images: Tensor                # [B, C, H, W] early exit, same noise and labels
    full_layers: float                 # layers of the full-depth run (= N)
    exit_layers: float                 # mean layers of the early-exit run
    threshold: float
    u_maps: np.ndarray                 # Figure 6: [samples, shown steps, H, W] uncertainty map
    u_map_steps: List[int]             # which steps (0-based) the maps belong to
    u_map_layer: int                   # 1-based layer the maps come from
    x0_preview: np.ndarray             # [samples, shown steps, H, W] predicted clean image at those steps


# ----- Figure 5 ---------------------------------------------------------------
def plot_tradeoff(points: Sequence[TradeoffPoint], path: Path, full_ms: float, full_fd: float,
                  full_layers: float, title: str = "Quality vs. time") -> Path:
    """Figure 5 twice: FD against mean layers (the paper's axis) and against wall-clock time."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4), sharey=True)
    labels = {policy: f"{policy} (adadiff_rt)" for policy in POLICY_STYLE}
    for ax, xkey, full_x, xlabel in (
            (axes[0], "mean_layers", full_layers, "mean layers per denoiser call"),
            (axes[1], "ms", full_ms, "time per 50-step sampling run (ms, lower is faster)")):
        for policy in ("uem", "static", "saturation"):
            pts = sorted((p for p in points if p.policy == policy), key=lambda p: getattr(p, xkey))
            if not pts:
                continue
            color, marker = POLICY_STYLE[policy]
            xs = [getattr(p, xkey) for p in pts]
            ax.plot(xs, [p.fd for p in pts], marker=marker, color=color, label=labels[policy])
            for p, xv in zip(pts, xs):
                text = f"L{int(p.setting)}" if policy == "static" else f"{p.setting:.3g}"
                ax.annotate(text, (xv, p.fd), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.scatter([full_x], [full_fd], marker="*", s=140, color="black", zorder=5, label="full depth (adadiff_rt)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FD to test set (classifier features, lower is better)")
    fig.subplots_adjust(wspace=0.12)
    axes[0].legend(title="policy (labels: threshold / exit layer)", fontsize=8, title_fontsize=8)
    fig.suptitle(title + " (Figure 5)", fontsize=10)
    return _save(fig, path)


# ----- Figure 1 ---------------------------------------------------------------
def plot_layer_error(ts: Sequence[float], error: np.ndarray, path: Path) -> Path:
    """Figure 1: mean squared error of each layer's prediction to the final layer's (layers 1..N-1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    n = error.shape[1] - 1  # the last layer's error to itself is 0 by definition
    error = error[:, :n]
    layers = np.arange(1, n + 1)
    cmap = plt.get_cmap("viridis")
    for j, t in enumerate(ts):
        ax.plot(layers, np.maximum(error[j], 1e-12), marker="o", ms=3, color=cmap(j / max(1, len(ts) - 1)),
                label=f"t = {t:.2f}")
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel(f"layer i (of {n + 1})")
    ax.set_ylabel(r"MSE($\epsilon_i$, $\epsilon_N$)")
    ax.set_title("Per-layer error to the final layer (Figure 1)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="diffusion time", fontsize=8, title_fontsize=8)
    return _save(fig, path)


# ----- Figure 3 ---------------------------------------------------------------
def plot_exit_heatmap(layers_by_step: np.ndarray, step_times: np.ndarray, n_layers: int, path: Path,
                      threshold: Optional[float] = None, policy: Optional[str] = None) -> Path:
    """Figure 3: the exit layer of every sample (x) at every sampling step (y)."""
    plt = _pyplot()
    steps, b = layers_by_step.shape
    fig, ax = plt.subplots(figsize=(min(10.0, 3.0 + 0.18 * b), 4.6))
    cmap = plt.get_cmap("magma", n_layers)
    im = ax.imshow(layers_by_step, aspect="auto", cmap=cmap, vmin=0.5, vmax=n_layers + 0.5, interpolation="nearest")
    ax.set_xlabel("sample")
    ax.set_ylabel("sampling step (time t)")
    ticks = np.linspace(0, steps - 1, min(steps, 6)).round().astype(int)
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{k} (t={step_times[k]:.2f})" for k in ticks], fontsize=8)
    cb = fig.colorbar(im, ax=ax, ticks=range(1, n_layers + 1))
    cb.set_label("exit layer")
    what = f", {policy}" if policy else (f", threshold {threshold:g}" if threshold is not None else "")
    ax.set_title(f"Exit layer by step and sample (Figure 3{what}; mean {layers_by_step.mean():.2f} of {n_layers})",
                 fontsize=10)
    return _save(fig, path)


# ----- Figure 4 ---------------------------------------------------------------
def plot_side_by_side(full: Tensor, early: Tensor, path: Path, full_layers: float, exit_layers: float,
                      nrow: Optional[int] = None) -> Path:
    """Figure 4: full-depth and early-exit samples from the same noise, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.6))
    for ax, imgs, name in ((axes[0], full, f"full depth ({full_layers:.0f} layers)"),
                           (axes[1], early, f"early exit (mean {exit_layers:.2f} layers)")):
        g = grid(imgs, nrow)
        ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle("Same noise and labels (Figure 4)", fontsize=10)
    return _save(fig, path)


# ----- Figure 6 ---------------------------------------------------------------
def plot_uncertainty_maps(u_maps: np.ndarray, x0: np.ndarray, steps: Sequence[int], step_times: np.ndarray,
                          layer: int, path: Path) -> Path:
    """Figure 6: for a few samples, the predicted image and the uncertainty map at several steps."""
    plt = _pyplot()
    n, k = u_maps.shape[:2]
    fig, axes = plt.subplots(2 * n, k, figsize=(1.35 * k + 1.2, 1.35 * 2 * n), squeeze=False)
    vmax = float(np.nanmax(u_maps)) if u_maps.size else 1.0
    im = None
    for s in range(n):
        for j in range(k):
            a_img, a_u = axes[2 * s, j], axes[2 * s + 1, j]
            a_img.imshow(x0[s, j], cmap="gray", vmin=-1, vmax=1)
            im = a_u.imshow(u_maps[s, j], cmap="inferno", vmin=0, vmax=vmax)
            for a in (a_img, a_u):
                a.set_xticks([])
                a.set_yticks([])
            if s == 0:
                a_img.set_title(f"step {steps[j]}\nt={step_times[steps[j]]:.2f}", fontsize=8)
            if j == 0:
                a_img.set_ylabel(f"#{s} x0", fontsize=8)
                a_u.set_ylabel(f"#{s} u", fontsize=8)
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
        cb.set_label(f"uncertainty u (layer {layer}; 0 = certain)")
    fig.suptitle(f"Predicted x0 and uncertainty map across steps (Figure 6, layer {layer})", fontsize=10)
    return _save(fig, path)


# ----- data from the oracle ----------------------------------------------------
@torch.no_grad()
def _layer_error(model: UViT, schedule: VPSchedule, x0: Tensor, y: Optional[Tensor], ts: Sequence[float],
                 gen: torch.Generator) -> np.ndarray:
    """[len(ts), N] mse of eps_i against eps_N on noised data x0 at each time."""
    rows = []
    for t in ts:
        tt = torch.full((x0.shape[0],), float(t))
        xt = schedule.add_noise(x0, tt, torch.randn(x0.shape, generator=gen))
        eps = model.forward_all_layers(xt, tt, y).eps_layers
        rows.append([float(((e - eps[-1]) ** 2).mean()) for e in eps])
    return np.asarray(rows)


@dataclass
class _MapRecorder:
    """A denoiser wrapper that keeps the uncertainty map and x0 prediction at chosen steps."""

    model: UViT
    schedule: VPSchedule
    inner: object
    steps: Sequence[int]
    layer: int
    samples: int
    calls: int = 0

    def __post_init__(self) -> None:
        self.maps: List[np.ndarray] = []
        self.x0: List[np.ndarray] = []

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        eps = self.inner(x, t, y)
        if self.calls in self.steps:
            xs, ts, ys = x[: self.samples], t[: self.samples], None if y is None else y[: self.samples]
            out = self.model.forward_all_layers(xs, ts, ys)
            self.maps.append(out.u_maps[self.layer - 1].mean(dim=1).numpy())
            a, s = self.schedule.alpha(float(ts[0])), self.schedule.sigma(float(ts[0]))
            self.x0.append(((xs - s * eps[: self.samples]) / a).clamp(-1, 1).mean(dim=1).numpy())
        self.calls += 1
        return eps


@torch.no_grad()
def oracle_figure_data(model: UViT, schedule: VPSchedule, threshold: float, n: int = 16, steps: int = 50,
                       guidance: float = 1.0, seed: int = 0, map_samples: int = 3, map_steps: int = 6) -> OracleFigureData:
    """Measure Figures 1, 3, 4 and 6 with the reference early exit (uem policy, per-sample exits).

    Figure 1 noises the full-depth samples again (so labels and images agree) at five times.
    """
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=gen)
    y = torch.arange(n) % c.num_classes if c.num_classes > 0 else None
    null = c.num_classes

    full = EarlyExitDenoiser(model, FULL_DEPTH)
    full_imgs = sample("dpm++", guided(full, guidance, null), noise.clone(), schedule, steps, y=y)
    early = EarlyExitDenoiser(model, ExitPolicy("uem", threshold=threshold))
    shown = sorted(set(np.linspace(0, steps - 1, map_steps).round().astype(int).tolist()))
    layer = c.num_in_blocks + 1
    rec = _MapRecorder(model, schedule, early, shown, layer, min(map_samples, n))
    exit_imgs = sample("dpm++", guided(rec, guidance, null), noise.clone(), schedule, steps, y=y)

    lbs = early.layers_by_step().numpy()[:, :n]  # the conditional half under guidance
    ts = [0.1, 0.3, 0.5, 0.7, 0.9]
    err = _layer_error(model, schedule, full_imgs, y, ts, gen)
    return OracleFigureData(
        layer_error_t=ts, layer_error=err, layers_by_step=lbs,
        step_times=time_grid(schedule, steps).numpy()[:-1],
        full_images=full_imgs, exit_images=exit_imgs,
        full_layers=float(full.mean_layers()), exit_layers=float(early.mean_layers()), threshold=threshold,
        u_maps=np.stack(rec.maps, axis=1), u_map_steps=shown, u_map_layer=layer,
        x0_preview=np.stack(rec.x0, axis=1),
    )


def write_oracle_figures(data: OracleFigureData, out: Path, n_layers: int) -> Dict[str, Path]:
    """Write Figures 1, 3, 4 and 6 into `out`; returns their paths by figure name."""
    out = Path(out)
    return {
        "fig1_layer_error": plot_layer_error(data.layer_error_t, data.layer_error, out / "fig1_layer_error.png"),
        "fig3_exit_heatmap": plot_exit_heatmap(data.layers_by_step, data.step_times, n_layers,
                                               out / "fig3_exit_heatmap.png", data.threshold),
        "fig4_side_by_side": plot_side_by_side(data.full_images, data.exit_images, out / "fig4_side_by_side.png",
                                               data.full_layers, data.exit_layers),
        "fig6_uncertainty_maps": plot_uncertainty_maps(data.u_maps, data.x0_preview, data.u_map_steps,
                                                       data.step_times, data.u_map_layer,
                                                       out / "fig6_uncertainty_maps.png"),
    }
