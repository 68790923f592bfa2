"""Shared test setup: the repository root on sys.path and small fixtures (tiny config, 8x8 images)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests use tiny tensors: threads only add overhead on a busy machine

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adadiff_export.model import checkpoint as ckpt  # noqa: E402
from adadiff_export.model.config import preset  # noqa: E402
from adadiff_export.model.schedule import VPSchedule  # noqa: E402
from adadiff_export.model.uvit import UViT  # noqa: E402


def tiny_model(seed: int = 0, uem_gain: float = 1.0) -> UViT:
    """A random tiny U-ViT (8x8x1, depth 5); `uem_gain` scales the UEM weights to spread u across samples."""
    torch.manual_seed(seed)
    model = UViT(preset("tiny")).eval()
    with torch.no_grad():
        for uem in model.uems:
            uem.proj.weight.mul_(uem_gain)
    return model


@pytest.fixture
def model() -> UViT:
    return tiny_model()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A random tiny checkpoint with stored defaults (guidance 2, threshold 0.5)."""
    m = tiny_model(uem_gain=20.0)
    path = tmp_path / "tiny.pt"
    ckpt.save({"config": m.config.to_dict(), "schedule": VPSchedule().to_dict(), "ema": m.state_dict(),
               "defaults": {"guidance": 2.0, "threshold": 0.5}}, path)
    return path
