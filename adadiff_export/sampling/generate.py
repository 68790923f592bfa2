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
from .exit_settings import ExitDefaults
from .samplers import CounterNormal, Denoiser, guided, sample, steps_for
MAX_RT_SEED = 2 ** 64 - 1  # adadiff_rt's sample() takes its seed as uint64
THRESHOLD_POLICIES = ("uem", "saturation", "uem-authors")  # one threshold, which --sweep varies


@dataclass
class GenerationResult:
    images: Tensor          # [n, C, H, W] in [-1, 1]
    labels: Optional[Tensor]  # [n] int64 (None for an unconditional model)
    layers: Tensor          # [steps, B_eff] exit layer of every denoiser row (both CFG halves)
    seconds: float          # wall time of the sampling itself
    chunk: int = 0          # samples per sampler run (chunk k of the run draws its noise with seed + k)

    @property
    def layers_by_step(self) -> List[float]:
        """Mean exit layer per step over the batch (both halves under guidance)."""
        return [float(v) for v in self.layers.float().mean(dim=1)]

    @property
    def mean_layers(self) -> float:
        return float(self.layers.float().mean())


def exit_defaults(loaded: Loaded) -> ExitDefaults:
    """The checkpoint's stored exit settings (`defaults`: policy, threshold, guidance, tables), checked
    against its depth; what it does not store takes ExitDefaults' values. An unconditional model's
    guidance is 1 whatever was stored (checkpoints trained before `train` knew that stored 2), so a
    manifest built from it lets adadiff_rt sample with its defaults."""
    d = ExitDefaults.from_dict(loaded.defaults, f"checkpoint {loaded.path} defaults").check(loaded.model.depth)
    return d if loaded.model.config.num_classes else replace(d, guidance=1.0)


def default_guidance(loaded: Loaded) -> float:
    """The checkpoint's stored guidance scale, else 2.0."""
    return exit_defaults(loaded).guidance


def default_threshold(loaded: Loaded) -> float:
    """The checkpoint's stored exit threshold, else 0.1 (a random or unfinished checkpoint)."""
    return exit_defaults(loaded).threshold


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
             batch_size: int = 100, progress: bool = True, desc: str = "sample",
             final_x0: bool = True) -> GenerationResult:
    """Sample `n` images (labels i % classes) with the reference early exit, in batches of `batch_size`.

    Guidance defaults to the checkpoint's; full depth is `FULL_DEPTH` (or a uem threshold of 0);
    `final_x0` is the samplers' (the last step returns its x0 prediction). Stochastic samplers draw
    adadiff_rt's noise (`samplers.CounterNormal`) with seed `seed + k` for batch k, as `generate_rt` does
    for its chunk k: the two agree when their batches are the same size.
    """
    from tqdm import tqdm

    model, c = loaded.model, loaded.model.config
    steps = steps_for(sampler, steps)
    w = default_guidance(loaded) if guidance is None else float(guidance)
    if not 0 <= seed <= MAX_RT_SEED - n:
        raise ValueError(f"seed must be in 0..{MAX_RT_SEED - n} (an unsigned 64-bit seed per batch), got {seed}")
    noise, labels = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, n, seed)
    parts = list(_chunks(n, batch_size))
    bar = tqdm(total=len(parts) * steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    images, layers = [], []
    start = time.perf_counter()
    for k, sl in enumerate(parts):
        den = EarlyExitDenoiser(model, policy)
        fn: Denoiser = den if labels is None else guided(den, w, c.num_classes)
        y = None if labels is None else labels[sl]
        images.append(sample(sampler, _counting(fn, lambda: bar.update(1)), noise[sl].clone(), loaded.schedule,
                             steps, y=y, generator=CounterNormal(seed + k), final_x0=final_x0))
        layers.append(den.layers_by_step())
    seconds = time.perf_counter() - start
    bar.close()
    return GenerationResult(torch.cat(images), labels, torch.cat(layers, dim=1), seconds, min(n, batch_size))


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
                guidance: float = ExitDefaults.guidance, seed: int = 0, progress: bool = True,
                final_x0: bool = True, batch_size: Optional[int] = None) -> GenerationResult:
    """The same job on the C++ runtime (adadiff_rt, OpenVINO on CPU), in chunks of `batch_size` samples
    (default and at most: what the engines' max_batch holds, half of it under guidance).

    Chunk k of the run samples with seed `seed + k`: the runtime's generator takes an unsigned 64-bit seed.
    An unconditional model samples without guidance whatever `guidance` says.
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
    if num_classes == 0:
        guidance = 1.0
    rows_per_sample = 2 if guidance != 1.0 else 1
    chunk = max(1, runtime.max_batch // rows_per_sample)  # under guidance each sample is two rows
    chunk = min(chunk, batch_size) if batch_size else chunk
    noise, labels = noise_and_labels(loaded_shape, num_classes, n, seed)
    images, layers = [], []
    start = time.perf_counter()
    for k, sl in enumerate(tqdm(list(_chunks(n, chunk)), desc="sample (rt)", disable=not progress, leave=False)):
        y = None if labels is None else labels[sl].numpy()
        img, used = runtime.sample(noise[sl].numpy(), y, sampler=sampler, steps=steps, guidance=guidance,
                                   seed=seed + k, final_x0=final_x0, **policy.runtime_kwargs())
        images.append(torch.from_numpy(img))
        layers.append(torch.as_tensor(used, dtype=torch.int64))
    seconds = time.perf_counter() - start
    return GenerationResult(torch.cat(images), labels, torch.cat(layers, dim=1), seconds, min(n, chunk))


def policy_label(policy: ExitPolicy) -> str:
    """A short name for a policy in tables: `uem 0.1`, `static L6`, `schedule`, `full`, ..."""
    if policy.kind == "static":
        return "full" if policy.layer == 0 else f"static L{policy.layer}"
    if policy.kind in THRESHOLD_POLICIES:
        return f"{policy.kind} {policy.threshold:g}"
    return policy.kind


@dataclass
class EvalPoint:
    """Quality and cost of one policy; FD is in the shipped classifier's feature space (not Inception FID)."""

    policy: ExitPolicy
    accuracy: float
    fd: float
    mean_layers: float
    seconds: float

    @property
    def name(self) -> str:
        return policy_label(self.policy)

    def as_dict(self) -> Dict[str, object]:
        p = self.policy
        d: Dict[str, object] = {"name": self.name, "policy": p.kind}
        if p.kind in THRESHOLD_POLICIES:
            d["threshold"] = p.threshold
        if p.kind == "static":
            d["layer"] = p.layer
        acc = None if self.accuracy != self.accuracy else round(self.accuracy, 5)  # NaN: not measured
        return {**d, "accuracy": acc, "fd": round(self.fd, 5),
                "mean_layers": round(self.mean_layers, 4)}


def measure(clf: LoadedClassifier, result: GenerationResult, policy: ExitPolicy, accuracy: bool = True) -> EvalPoint:
    """Accuracy (when conditional and `accuracy`; else NaN), FD to the real test set and mean layers of one
    generation."""
    acc = (class_accuracy(clf, result.images, result.labels) if accuracy and result.labels is not None
           else float("nan"))
    return EvalPoint(policy, acc, fd_to_test_set(clf, result.images), result.mean_layers, result.seconds)


def evaluate(loaded: Loaded, clf: LoadedClassifier, n: int, policies: Sequence[ExitPolicy], sampler: str = "dpm++",
             steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0, batch_size: int = 100,
             progress: bool = True, final_x0: bool = True,
             accuracy: bool = True) -> Tuple[EvalPoint, List[EvalPoint]]:
    """Full depth, then each policy, all on the same noise and labels (`accuracy`: measure class accuracy)."""
    kw = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress,
              final_x0=final_x0)
    full = measure(clf, generate(loaded, n, FULL_DEPTH, desc="full depth", **kw), FULL_DEPTH, accuracy)
    return full, [measure(clf, generate(loaded, n, p, desc=policy_label(p), **kw), p, accuracy) for p in policies]
