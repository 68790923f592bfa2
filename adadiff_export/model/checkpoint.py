"""Checkpoints: a plain dict of tensors and primitives, always loaded with `weights_only=True`.

Layout: {"format": "adadiff-checkpoint", "version": 1, "config": {...}, "schedule": {...},
"ema": state_dict, "model": state_dict (training only), "optimizer": ..., "step": int,
"defaults": {"threshold": float, "guidance": float}, "provenance": {...}}.

`load` also takes a state dict saved by the authors' code (U-ViT, AdaDiff) and converts it in memory
(`model/convert.py`); `Loaded.note` then says what it detected.
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
    note: str = ""  # what was detected when the file was converted in memory (lines), else ""


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
    return _check_format(read_weights_only(path), path)


def _check_format(raw: Any, path: Path) -> Dict[str, Any]:
    if not is_adadiff(raw):
        raise CheckpointError(f"{path} is not an adadiff checkpoint (missing format {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {raw.get('version')}, this code reads {VERSION}")
    return raw


def is_adadiff(raw: Any) -> bool:
    """Whether what torch.load returned claims to be an adadiff checkpoint."""
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def read_or_convert(path: Path, options=None):
    """(raw adadiff checkpoint dict, note): the file itself, or a state dict of the authors' code converted in
    memory (`convert.ConvertOptions` `options`), with what was detected as the note."""
    from ..files import sha256_file
    from .convert import ConvertError, ConvertOptions, NotAUViT, convert_raw

    path = Path(path)
    raw = read_weights_only(path)
    if is_adadiff(raw):
        return _check_format(raw, path), ""
    try:
        conv = convert_raw(raw, path, sha256_file(path), options or ConvertOptions())
    except NotAUViT:
        raise CheckpointError(f"{path} is not an adadiff checkpoint (missing format {FORMAT!r}) nor a state dict "
                              "of the authors' U-ViT or AdaDiff code") from None
    except ConvertError as e:
        hint = ""
        if "--" in str(e):  # a flag of `convert`, which this in-memory conversion cannot take
            hint = (f" (the flag is `convert`'s: `python -m adadiff_export convert {path} -o OUT.pt` with it, then "
                    "pass OUT.pt)")
        raise CheckpointError(f"{path}: {e}{hint}") from None
    return conv.payload, f"{path.name}: converted in memory (save it with `python -m adadiff_export convert`)\n" \
        + conv.describe()


def load(path: Optional[Path] = None, use_ema: bool = True, convert_options=None) -> Loaded:
    """Load a checkpoint (the shipped one when `path` is None) into an eval-mode float32 model.

    A state dict of the authors' code is converted in memory (`convert_options`: `convert.ConvertOptions`);
    `Loaded.note` says what was detected.
    """
    path = Path(path) if path is not None else SHIPPED_CHECKPOINT
    raw, note = read_or_convert(path, convert_options)
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
    return Loaded(model, schedule, dict(raw.get("defaults", {})), raw, path, note)


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
