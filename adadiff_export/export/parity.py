"""Parity of exported segments with the PyTorch oracle, in the style of llama.cpp's test-backend-ops.

Every engine is compared with one reference using a normalized error, mse(ref, got) / mse(ref, 0),
against a named tolerance per precision. Two checks:

- `segment_parity`: each segment on fresh random inputs, PyTorch vs onnxruntime (through
  polygraphy's ONNX-Runtime runner);
- `chain_parity`: stem -> layers with exits -> head run segment by segment through onnxruntime,
  against `adadiff_export.sampling.early_exit.early_exit` on real inputs (noised Fashion-MNIST test images
  when the model is 28x28x1, random images otherwise): same exit layer per sample, same eps.

`full_chain_parity` needs no PyTorch model: it checks that the segment files chained at full depth
agree with `full.onnx` (what `verify` re-runs when the checkpoint is not at hand).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import UserError
from .manifest import Manifest, Segment

# Normalized error mse(ref, got) / mse(ref, 0) allowed per precision. fp32: 1e-8 is a relative RMS
# error of 1e-4 (the contract's "1e-4 relative"); fp16 / bf16 carry 10 and 8 mantissa bits.
TOLERANCES: Dict[str, float] = {"fp32": 1e-8, "fp16": 1e-5, "bf16": 1e-3}


class ParityError(UserError, RuntimeError):
    """An exported segment does not compute what PyTorch computes (within tolerance)."""


@dataclass(frozen=True)
class ParityFigure:
    """One compared output."""

    segment: str
    output: str
    error: float  # normalized error mse(ref, got) / mse(ref, 0)
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance

    def describe(self) -> str:
        rel = float(np.sqrt(self.error)) if np.isfinite(self.error) else float("nan")
        mark = "ok" if self.passed else "FAIL"
        return (f"{self.segment:>10s} {self.output:<6s} normalized error {self.error:.2e} "
                f"(relative {rel:.1e}, tolerance {self.tolerance:.0e}) {mark}")


@dataclass(frozen=True)
class ChainResult:
    """Chain parity: error of eps and how many samples exited at a different layer."""

    figure: ParityFigure
    threshold: float
    exit_mismatches: int
    batch: int
    mean_layers: float


def max_relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref - got| / max |ref|: the probes' check that two graph forms compute the same thing."""
    return float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-30))


def normalized_error(ref: np.ndarray, got: np.ndarray) -> float:
    """mse(ref, got) / mse(ref, 0); inf when shapes differ or got is not finite."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape or not np.all(np.isfinite(got)):
        return float("inf")
    denom = float(np.mean(ref * ref))
    return float(np.mean((ref - got) ** 2) / max(denom, 1e-30))


def require(figures: Sequence[ParityFigure]) -> None:
    """Raise `ParityError` naming the worst failing segment, if any failed."""
    failed = [f for f in figures if not f.passed]
    if failed:
        worst = max(failed, key=lambda f: f.error if np.isfinite(f.error) else float("inf"))
        raise ParityError(f"parity failed for segment {worst.segment} output {worst.output}: normalized error "
                          f"{worst.error:.3e} > tolerance {worst.tolerance:.0e}"
                          + (f" ({len(failed)} outputs failed)" if len(failed) > 1 else ""))


def summarize(label: str, figures: Sequence[ParityFigure]) -> str:
    """One line: the worst figure of a parity check."""
    w = max(figures, key=lambda f: f.error if np.isfinite(f.error) else float("inf"))
    return (f"{label}: worst normalized error {w.error:.2e} (relative {np.sqrt(w.error):.1e}, "
            f"{w.segment}.{w.output}), tolerance {w.tolerance:.0e}")


# ----- onnxruntime sessions --------------------------------------------------------------------

@contextlib.contextmanager
def ort_runners(folder: Path, segments: Sequence[Segment]) -> Iterator[Dict[str, object]]:
    """Activated polygraphy OnnxrtRunners for `segments`, by name."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR), contextlib.ExitStack() as stack:
        runners = {}
        for seg in segments:
            build = SessionFromOnnx(str(Path(folder) / seg.file), providers=["CPUExecutionProvider"])
            runners[seg.name] = stack.enter_context(OnnxrtRunner(build, name=seg.name))
        yield runners


def _infer(runner, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        return dict(runner.infer(feed))


# ----- per-segment parity ------------------------------------------------------------------------

def segment_parity(model, folder: Path, segments: Sequence[Segment], batch: int = 4, seed: int = 0,
                   uncertainty_map: bool = False, tolerance: float = TOLERANCES["fp32"]) -> List[ParityFigure]:
    """Each segment vs PyTorch on fresh random inputs through onnxruntime; one figure per output."""
    import torch

    from .segments import random_inputs, segment_module

    gen = torch.Generator().manual_seed(seed)
    figures: List[ParityFigure] = []
    with ort_runners(folder, segments) as runners:
        for seg in segments:
            inputs = random_inputs(model, seg, batch, gen)
            with torch.no_grad():
                ref = segment_module(model, seg, uncertainty_map).eval()(*inputs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = _infer(runners[seg.name], {ts.name: v.numpy() for ts, v in zip(seg.inputs, inputs)})
            for ts, r in zip(seg.outputs, ref):
                figures.append(ParityFigure(seg.name, ts.name, normalized_error(r.numpy(), got[ts.name]), tolerance))
    return figures


def random_feed(seg: Segment, batch: int, rng: np.random.Generator, num_classes: int) -> Dict[str, np.ndarray]:
    """Numpy inputs of the right shapes and plausible ranges for one segment."""
    feed = {}
    for ts in seg.inputs:
        shape = ts.concrete(batch)
        if ts.dtype == "int64":
            feed[ts.name] = rng.integers(0, max(num_classes, 1), shape).astype(np.int64)
        elif ts.name == "t":
            feed[ts.name] = rng.uniform(0.001, 1.0, shape).astype(np.float32)
        else:
            feed[ts.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _against_onnxruntime(folder: Path, manifest: Manifest, batch: int, seed: int, tolerance: float,
                         label: Callable[[Segment], str], infer: Callable[[Segment, dict], dict]) -> List[ParityFigure]:
    """Every segment through `infer(seg, feed) -> {name: array}` vs onnxruntime on the same random inputs."""
    rng = np.random.default_rng(seed)
    figures: List[ParityFigure] = []
    with ort_runners(folder, manifest.segments) as runners:
        for seg in manifest.segments:
            feed = random_feed(seg, batch, rng, manifest.model["num_classes"])
            ref = _infer(runners[seg.name], feed)
            got = infer(seg, feed)
            for ts in seg.outputs:
                figures.append(ParityFigure(label(seg), ts.name,
                                            normalized_error(ref[ts.name], np.asarray(got[ts.name], np.float32)),
                                            tolerance))
    return figures


def openvino_parity(folder: Path, manifest: Manifest, batch: int = 4, seed: int = 0,
                    tolerance: float = TOLERANCES["fp32"]) -> List[ParityFigure]:
    """Every segment through OpenVINO (CPU, f32 inference precision) vs onnxruntime on the same inputs.

    f32 is asked for explicitly: on CPUs with bf16 OpenVINO's default silently runs bf16.
    """
    import openvino as ov

    core = ov.Core()

    def infer(seg: Segment, feed: dict) -> dict:
        compiled = core.compile_model(str(Path(folder) / seg.file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled.create_infer_request().infer(feed)
        return {out.get_any_name(): val for out, val in got.items()}

    return _against_onnxruntime(folder, manifest, batch, seed, tolerance, lambda seg: seg.name, infer)


def tensorrt_parity(folder: Path, manifest: Manifest, batch: int, seed: int = 0) -> List[ParityFigure]:
    """Every TensorRT plan vs onnxruntime on the same inputs (polygraphy's TrtRunner), tolerance by precision.

    Runs only where plans were built (a GPU with TensorRT); not exercised in our CI.
    """
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.logger import G_LOGGER

    trt = manifest.tensorrt

    def infer(seg: Segment, feed: dict) -> dict:
        plan = BytesFromPath(str(Path(folder) / trt.plans[seg.name].file))
        with G_LOGGER.verbosity(G_LOGGER.ERROR), TrtRunner(EngineFromBytes(plan)) as runner:
            return dict(runner.infer(feed))

    return _against_onnxruntime(folder, manifest, batch, seed, TOLERANCES[trt.precision],
                                lambda seg: f"{seg.name}.plan", infer)


# ----- chained parity ----------------------------------------------------------------------------

def run_chain(runners: Dict[str, object], manifest: Manifest, x: np.ndarray, t: np.ndarray,
              y: Optional[np.ndarray], threshold: float) -> tuple:
    """The reference early exit (uem policy, patience 1, per-sample) over ONNX segments.

    Returns eps [B, C, H, W] and exit layer [B] (1-based). Threshold 0 runs full depth.
    """
    b = x.shape[0]
    feed = {"x": x, "t": t}
    if y is not None:
        feed["y"] = y
    stem = _infer(runners["stem"], feed)
    h, temb = stem["h"], stem["temb"]
    active = np.arange(b)
    eps = np.zeros_like(x)
    exit_layer = np.full(b, manifest.depth, dtype=np.int64)
    saved: Dict[int, np.ndarray] = {}
    for seg in manifest.layers():
        lf = {"h_in": h, "temb": temb}
        if seg.skip_from is not None:
            lf["skip"] = saved[seg.skip_from]
        out = _infer(runners[seg.name], lf)
        h = out["h_out"]
        if seg.block == "in":
            saved[seg.index] = h
        exits = np.ones(len(active), bool) if seg.index == manifest.depth else out["u"] < threshold
        if exits.any():
            eps[active[exits]] = _infer(runners["head"], {"h": h[exits]})["eps"]
            exit_layer[active[exits]] = seg.index
            keep = ~exits
            if not keep.any():
                break
            active, h, temb = active[keep], h[keep], temb[keep]
            saved = {k: v[keep] for k, v in saved.items()}
    return eps, exit_layer


def real_inputs(model, schedule, batch: int, seed: int = 0):
    """Noised Fashion-MNIST test images for a 28x28x1 model (random images otherwise), t and y."""
    import torch

    from ..data import fashion_mnist_test_for

    c = model.config
    gen = torch.Generator().manual_seed(seed)
    data = fashion_mnist_test_for(c.img_size, c.in_chans)
    if data is not None:
        idx = torch.randperm(len(data), generator=gen)[:batch]
        x0, y = data.images[idx], data.labels[idx]
    else:
        x0 = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=gen).clamp(-1, 1)
        y = torch.randint(0, max(c.num_classes, 1), (batch,), generator=gen)
    t = torch.rand(batch, generator=gen) * (1 - schedule.t_eps) + schedule.t_eps
    x = schedule.add_noise(x0, t, torch.randn(x0.shape, generator=gen))
    return x, t, (y if c.num_classes > 0 else None)


def _separating_threshold(u: np.ndarray) -> float:
    """A threshold near the median of the observed u values, halfway between two of them.

    Far from every observed value, so fp32 rounding cannot flip an exit decision, and in the
    middle of the distribution, so some samples exit early and some do not.
    """
    v = np.unique(u[np.isfinite(u)])
    if len(v) < 2:
        return float(v[0]) + 1e-3 if len(v) else 0.5
    lo, hi = len(v) // 4, max(len(v) // 4 + 1, 3 * len(v) // 4)
    gaps = np.diff(v)[lo:hi]
    j = lo + int(np.argmax(gaps))
    return float((v[j] + v[j + 1]) / 2)


def chain_parity(model, schedule, folder: Path, manifest: Manifest, batch: int = 16, seed: int = 0,
                 threshold: Optional[float] = None, tolerance: float = TOLERANCES["fp32"]) -> ChainResult:
    """Stem, layers with exits and head through onnxruntime vs the PyTorch reference early exit."""

    from ..sampling.early_exit import ExitPolicy, early_exit

    x, t, y = real_inputs(model, schedule, batch, seed)
    if threshold is None:
        probe = early_exit(model, x, t, y, ExitPolicy(kind="uem", threshold=0.0))
        threshold = _separating_threshold(probe.u[:, :-1].numpy())
    ref = early_exit(model, x, t, y, ExitPolicy(kind="uem", threshold=threshold))
    names = ["stem", "head"] + [s.name for s in manifest.layers()]
    with ort_runners(folder, [manifest.segment(n) for n in names]) as runners:
        eps, exit_layer = run_chain(runners, manifest, x.numpy(), t.numpy(),
                                    None if y is None else y.numpy(), threshold)
    mismatches = int((exit_layer != ref.exit_layer.numpy()).sum())
    fig = ParityFigure("chain", "eps", normalized_error(ref.eps.numpy(), eps), tolerance)
    return ChainResult(fig, float(threshold), mismatches, batch, float(ref.exit_layer.float().mean()))


def require_chain(result: ChainResult) -> None:
    """Raise `ParityError` if the chain made other exit decisions or its eps is off."""
    if result.exit_mismatches:
        raise ParityError(f"chained segments exit at a different layer than the PyTorch reference for "
                          f"{result.exit_mismatches} of {result.batch} samples (threshold {result.threshold:.6g})")
    require([result.figure])


def full_chain_parity(folder: Path, manifest: Manifest, batch: int = 4, seed: int = 0,
                      tolerance: float = TOLERANCES["fp32"]) -> ParityFigure:
    """Segments chained at full depth vs `full.onnx` on random inputs (no checkpoint needed)."""
    feed = random_feed(manifest.segment("stem"), batch, np.random.default_rng(seed), manifest.model["num_classes"])
    x, t, y = feed["x"], feed["t"], feed.get("y")
    with ort_runners(folder, manifest.segments) as runners:
        eps, _ = run_chain(runners, manifest, x, t, y, threshold=0.0)
        full = _infer(runners["full"], feed)["eps"]
    return ParityFigure("full", "eps", normalized_error(full, eps), tolerance)
