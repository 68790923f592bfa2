"""Checkpoints: a plain dict of tensors and primitives, always loaded with `weights_only=True`.

Layout: {"format": "adadiff-checkpoint", "version": 1, "config": {...}, "schedule": {...},
"ema": state_dict, "model": state_dict (training only), "optimizer": ..., "step": int,
"defaults": {"threshold": float, "guidance": float}, "provenance": {...}}.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import UserError
from ..files import write_atomically
from .config import ModelConfig
from .schedule import VPSchedule
from .uvit import UViT

FORMAT = "adadiff-checkpoint"
VERSION = 1
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "weights"
SHIPPED_CHECKPOINT = PACKAGE_DATA / "fashion_small.pt"
SHIPPED_CLASSIFIER = PACKAGE_DATA / "fashion_classifier.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged, unsafe or does not match its config."""


@dataclass
class Loaded:
    model: UViT
    schedule: VPSchedule
    defaults: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


def read_weights_only(path: Path) -> Any:
    """torch.load with weights_only=True; a missing, unsafe or damaged file becomes one CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} needs code to unpickle (or is corrupt); refusing to load it: {e}".splitlines()[0]
        ) from None
    except Exception as e:  # zip/EOF/struct errors of truncated or corrupt files
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {type(e).__name__}: {e}") from None
    return raw


def read_raw(path: Path) -> Dict[str, Any]:
    """Read a checkpoint dict safely; every failure becomes one CheckpointError naming the file."""
    path = Path(path)
    raw = read_weights_only(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an adadiff checkpoint (missing format {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {raw.get('version')}, this code reads {VERSION}")
    return raw


def load(path: Optional[Path] = None, use_ema: bool = True) -> Loaded:
    """Load a checkpoint (the shipped one when `path` is None) into an eval-mode float32 model."""
    path = Path(path) if path is not None else SHIPPED_CHECKPOINT
    raw = read_raw(path)
    try:
        config = ModelConfig.from_dict(raw["config"])
        schedule = VPSchedule.from_dict(raw.get("schedule", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has a bad config: {e}") from None
    key = "ema" if use_ema and "ema" in raw else "model"
    if key not in raw:
        raise CheckpointError(f"checkpoint {path} holds no weights ('ema' or 'model')")
    model = UViT(config)
    state = {k: v.float() for k, v in raw[key].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"checkpoint {path}: weights do not match its config {config}: {' '.join(first)}") from None
    model.eval()
    return Loaded(model, schedule, dict(raw.get("defaults", {})), raw, path)


def require_finite(loaded: Loaded) -> None:
    """Raise CheckpointError naming the first weight tensor that holds NaN or Inf (and how many do).

    A model with such a weight computes NaN wherever it flows; exported, it would surface much later as a
    parity failure of some segment rather than as what it is.
    """
    bad = [(name, int((~torch.isfinite(t)).sum()), t.numel())
           for name, t in loaded.model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        name, count, total = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint {loaded.path}: weight {name} holds {count} NaN or Inf values of {total}"
                              f"{more}; a model with non-finite weights cannot be exported")


def save(payload: Dict[str, Any], path: Path) -> None:
    """Write atomically (temporary file + rename) so a crash never leaves half a checkpoint."""
    write_atomic({"format": FORMAT, "version": VERSION, **payload}, path)


def save_untrained(config: ModelConfig, path: Path, seed: int = 0) -> Path:
    """A checkpoint of `config` with random weights, for timing (speed does not depend on the weights); kept when
    it already exists."""
    path = Path(path)
    if not path.exists():
        torch.manual_seed(seed)
        model = UViT(config)
        save({"config": config.to_dict(), "schedule": VPSchedule().to_dict(), "ema": model.state_dict()}, path)
    return path


def write_atomic(payload: Dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def shipped_payload(raw: Dict[str, Any], defaults: Dict[str, Any], provenance: Dict[str, Any]) -> Dict[str, Any]:
    """The small file we ship: EMA weights in half precision, config, schedule, defaults, provenance."""
    return {
        "config": raw["config"],
        "schedule": raw.get("schedule", VPSchedule().to_dict()),
        "ema": {k: v.half() if v.is_floating_point() else v for k, v in raw["ema"].items()},
        "step": raw.get("step", 0),
        "defaults": defaults,
        "provenance": provenance,
    }
