"""Generation of class-conditional samples with early exit, and their evaluation.

`generate` runs the PyTorch reference early exit (`EarlyExitDenoiser`) under any sampler with
classifier-free guidance; `generate_rt` runs the same job on the C++ runtime (`adadiff_rt`).
Both draw the same noise and labels for the same seed, so their outputs can be compared.
`evaluate` measures class accuracy, FD (in the shipped classifier's feature space, not
Inception FID) and mean layers at full depth and at one or more thresholds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..model.checkpoint import Loaded
from ..quality.metrics import LoadedClassifier, class_accuracy, fd_to_test_set
from .early_exit import FULL_DEPTH, EarlyExitDenoiser, ExitPolicy
from .samplers import Denoiser, guided, sample, steps_for

DEFAULT_GUIDANCE = 2.0
DEFAULT_THRESHOLD = 0.1  # used only when a checkpoint stores no default threshold
MAX_RT_SEED = 2 ** 64 - 1  # adadiff_rt's sample() takes its seed as uint64


@dataclass
class GenerationResult:
    images: Tensor          # [n, C, H, W] in [-1, 1]
    labels: Optional[Tensor]  # [n] int64 (None for an unconditional model)
    layers: Tensor          # [steps, B_eff] exit layer of every denoiser row (both CFG halves)
    seconds: float          # wall time of the sampling itself

    @property
    def layers_by_step(self) -> List[float]:
        """Mean exit layer per step over the batch (both halves under guidance)."""
        return [float(v) for v in self.layers.float().mean(dim=1)]

    @property
    def mean_layers(self) -> float:
        return float(self.layers.float().mean())


def default_guidance(loaded: Loaded) -> float:
    """The checkpoint's stored guidance scale, else 2.0."""
    return float(loaded.defaults.get("guidance", DEFAULT_GUIDANCE))


def default_threshold(loaded: Loaded) -> float:
    """The checkpoint's stored exit threshold, else 0.1 (a random or unfinished checkpoint)."""
    return float(loaded.defaults.get("threshold", DEFAULT_THRESHOLD))


def noise_and_labels(model_shape: Tuple[int, int, int], num_classes: int, n: int, seed: int) -> Tuple[Tensor, Optional[Tensor]]:
    """The starting noise [n, C, H, W] (one generator seeded with `seed`) and balanced labels i % classes."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *model_shape, generator=g)
    labels = torch.arange(n) % num_classes if num_classes > 0 else None
    return noise, labels


def _chunks(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def _counting(denoiser: Denoiser, tick: Callable[[], None]) -> Denoiser:
    def fn(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        out = denoiser(x, t, y)
        tick()
        return out

    return fn


@torch.no_grad()
def generate(loaded: Loaded, n: int, policy: ExitPolicy = FULL_DEPTH, sampler: str = "dpm++",
             steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0,
             batch_size: int = 100, progress: bool = True, desc: str = "sample") -> GenerationResult:
    """Sample `n` images (labels i % classes) with the reference early exit, in batches.

    Guidance defaults to the checkpoint's; full depth is `FULL_DEPTH` (or a uem threshold of 0).
    """
    from tqdm import tqdm

    model, c = loaded.model, loaded.model.config
    steps = steps_for(sampler, steps)
    w = default_guidance(loaded) if guidance is None else float(guidance)
    noise, labels = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    parts = list(_chunks(n, batch_size))
    bar = tqdm(total=len(parts) * steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    images, layers = [], []
    start = time.perf_counter()
    for sl in parts:
        den = EarlyExitDenoiser(model, policy)
        fn: Denoiser = den if labels is None else guided(den, w, c.num_classes)
        y = None if labels is None else labels[sl]
        images.append(sample(sampler, _counting(fn, lambda: bar.update(1)), noise[sl].clone(), loaded.schedule,
                             steps, y=y, generator=gen))
        layers.append(den.layers_by_step())
    seconds = time.perf_counter() - start
    bar.close()
    return GenerationResult(torch.cat(images), labels, torch.cat(layers, dim=1), seconds)


def _import_rt():
    try:
        import adadiff_rt  # noqa: WPS433 (optional, compiled extension)
    except ImportError as e:
        raise ValueError(
            f"--backend rt needs the compiled adadiff_rt module, which is not importable ({e}); "
            "build it with `pip install .` from the repository root") from None
    return adadiff_rt


def generate_rt(engines: Path, loaded_shape: Tuple[int, int, int], num_classes: int, n: int,
                policy: ExitPolicy, sampler: str = "dpm++", steps: Optional[int] = None,
                guidance: float = DEFAULT_GUIDANCE, seed: int = 0, progress: bool = True) -> GenerationResult:
    """The same job on the C++ runtime (adadiff_rt, OpenVINO on CPU), batched to the engines' max_batch.

    Chunk k of the run samples with seed `seed + k`: the runtime's generator takes an unsigned 64-bit seed.
    """
    from tqdm import tqdm

    if not 0 <= seed <= MAX_RT_SEED - n:
        raise ValueError(f"seed must be in 0..{MAX_RT_SEED - n} for adadiff_rt (an unsigned 64-bit seed per "
                         f"chunk of the run), got {seed}")
    rt_mod = _import_rt()
    if not (Path(engines) / "manifest.json").exists():
        raise FileNotFoundError(f"{Path(engines) / 'manifest.json'} not found: build engines first with "
                                "`python -m adadiff_export build`")
    steps = steps_for(sampler, steps)
    runtime = rt_mod.Runtime(str(engines), device="cpu")
    rows_per_sample = 2 if (num_classes > 0 and guidance != 1.0) else 1
    noise, labels = noise_and_labels(loaded_shape, num_classes, n, seed)
    images, layers = [], []
    start = time.perf_counter()
    # Under guidance each sample is two rows of the engines' batch.
    for k, sl in enumerate(tqdm(list(_chunks(n, max(1, runtime.max_batch // rows_per_sample))), desc="sample (rt)",
                                disable=not progress, leave=False)):
        y = None if labels is None else labels[sl].numpy()
        img, used = runtime.sample(noise[sl].numpy(), y, sampler=sampler, steps=steps, guidance=guidance,
                                   policy=policy.kind, threshold=policy.threshold, patience=policy.patience,
                                   granularity=policy.granularity, static_layer=policy.layer, seed=seed + k)
        images.append(torch.from_numpy(img))
        layers.append(torch.as_tensor(used, dtype=torch.int64))
    seconds = time.perf_counter() - start
    return GenerationResult(torch.cat(images), labels, torch.cat(layers, dim=1), seconds)


@dataclass
class EvalPoint:
    """Quality and cost of one setting; FD is in the shipped classifier's feature space (not Inception FID)."""

    threshold: Optional[float]
    accuracy: float
    fd: float
    mean_layers: float
    seconds: float
    layer: Optional[int] = None  # set on the static-exit points of `evaluate(layers=...)`

    def as_dict(self, with_threshold: bool = True) -> Dict[str, float]:
        d = {"accuracy": round(self.accuracy, 5), "fd": round(self.fd, 5), "mean_layers": round(self.mean_layers, 4)}
        if self.layer is not None:
            return {"layer": self.layer, **d}
        return {"threshold": self.threshold, **d} if with_threshold else d


def measure(clf: LoadedClassifier, result: GenerationResult, threshold: Optional[float],
            layer: Optional[int] = None) -> EvalPoint:
    """Accuracy (when conditional), FD to the real test set and mean layers of one generation."""
    acc = class_accuracy(clf, result.images, result.labels) if result.labels is not None else float("nan")
    return EvalPoint(threshold, acc, fd_to_test_set(clf, result.images), result.mean_layers, result.seconds, layer)


def evaluate(loaded: Loaded, clf: LoadedClassifier, n: int, thresholds: Sequence[float],
             policy: ExitPolicy = ExitPolicy("uem"), sampler: str = "dpm++", steps: Optional[int] = None,
             guidance: Optional[float] = None, seed: int = 0, batch_size: int = 100,
             progress: bool = True, layers: Sequence[int] = ()) -> Tuple[EvalPoint, List[EvalPoint]]:
    """Full depth, then `policy` at each threshold, then static exit at each of `layers` (points with
    `layer` set), all on the same noise and labels."""
    kw = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress)
    full = measure(clf, generate(loaded, n, FULL_DEPTH, desc="full depth", **kw), None)
    points = [measure(clf, generate(loaded, n, replace(policy, threshold=t), desc=f"threshold {t:g}", **kw), t)
              for t in thresholds]
    points += [measure(clf, generate(loaded, n, ExitPolicy("static", layer=k), desc=f"static L{k}", **kw), None, k)
               for k in layers]
    return full, points
