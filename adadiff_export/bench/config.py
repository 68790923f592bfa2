"""What one bench run measures (`BenchConfig`), and the reduced `--quick` variant."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple


@dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures; `quick()` is the few-minutes variant."""

    checkpoint: Optional[Path] = None
    out: Path = Path("bench_out")
    denoise_batches: Tuple[int, ...] = (1, 8, 64)
    sample_batches: Tuple[int, ...] = (1, 8, 64)
    sweep_batches: Tuple[int, ...] = (8,)         # sample-workload batches that also time the sweep
    steps: int = 50
    repeats: int = 3
    warmup: int = 1
    n_quality: int = 256
    sweep: Tuple[float, ...] = (0.5, 1.0, 2.0)      # thresholds as multiples of the default
    guidance: Optional[float] = None               # None: the checkpoint's
    threshold: Optional[float] = None              # None: the checkpoint's default
    cifar: bool = True
    cifar_batches: Tuple[int, ...] = (1, 4)
    threads: int = 0
    seed: int = 0
    engines_candidates: Tuple[Path, ...] = (Path("engines"),)  # reused when built from the same checkpoint
    peers: Tuple[str, ...] = ("torch-eager", "torch-compile", "onnxruntime", "openvino")  # full-depth peers

    @staticmethod
    def quick(**kw) -> "BenchConfig":
        base = dict(denoise_batches=(1, 64), sample_batches=(1, 64), sweep_batches=(64,), repeats=2,
                    n_quality=64, sweep=(1.0, 2.0), cifar_batches=(1,))
        base.update(kw)
        return BenchConfig(**base)
