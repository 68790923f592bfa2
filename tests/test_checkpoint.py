"""Checkpoints: round trip, the half-precision shipped payload, and every refusal."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from adadiff_export.model import checkpoint as ckpt
from adadiff_export.model.config import ModelConfig, preset
from adadiff_export.model.schedule import VPSchedule

from conftest import tiny_model


class Payload:  # a custom class: unpickling it would need to run this module's code
    def __init__(self) -> None:
        self.x = 1


def _inputs(model):
    c = model.config
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, c.in_chans, c.img_size, c.img_size, generator=g), torch.tensor([0.2, 0.7]),
            torch.tensor([1, 10]))


def _payload(model, **extra):
    return {"config": model.config.to_dict(), "schedule": VPSchedule(beta_max=19.0).to_dict(),
            "ema": model.state_dict(), **extra}


def test_round_trip_keeps_weights_schedule_and_defaults(tmp_path: Path):
    model = tiny_model(seed=4)
    path = tmp_path / "c.pt"
    ckpt.save(_payload(model, defaults={"threshold": 0.2, "guidance": 3.0}), path)
    loaded = ckpt.load(path)
    assert loaded.model.config == model.config
    assert loaded.schedule == VPSchedule(beta_max=19.0)
    assert loaded.defaults == {"threshold": 0.2, "guidance": 3.0}
    assert not loaded.model.training
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, y), model(x, t, y))
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_shipped_payload_is_half_precision_and_loads(tmp_path: Path):
    model = tiny_model(seed=4)
    raw = {**_payload(model), "model": model.state_dict(), "optimizer": {"state": {}}, "step": 7}
    path = tmp_path / "ship.pt"
    ckpt.save(ckpt.shipped_payload(raw, {"threshold": 0.1}, {"command": "test"}), path)
    raw2 = ckpt.read_raw(path)
    assert "model" not in raw2 and "optimizer" not in raw2
    assert all(v.dtype == torch.float16 for v in raw2["ema"].values() if v.is_floating_point())
    loaded = ckpt.load(path)
    x, t, y = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), model(x, t, y), atol=2e-2, rtol=2e-2)


def test_refuses_a_checkpoint_that_needs_code_to_unpickle(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "payload": Payload()}, path)
    with pytest.raises(ckpt.CheckpointError, match="needs code to unpickle"):
        ckpt.load(path)
    path2 = tmp_path / "evil2.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "d": collections.OrderedDict(a=Payload())}, path2)
    with pytest.raises(ckpt.CheckpointError, match="refusing"):
        ckpt.read_raw(path2)


def test_refuses_truncated_and_missing_files(tmp_path: Path):
    good = tmp_path / "good.pt"
    ckpt.save(_payload(tiny_model()), good)
    data = good.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{n}.pt"
        bad.write_bytes(data[:n])
        with pytest.raises(ckpt.CheckpointError, match=str(bad.name)):
            ckpt.load(bad)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nothing.pt")


def test_refuses_foreign_files_and_versions(tmp_path: Path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ckpt.CheckpointError, match="not an adadiff checkpoint"):
        ckpt.load(plain)
    future = tmp_path / "future.pt"
    torch.save({"format": ckpt.FORMAT, "version": 99}, future)
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        ckpt.load(future)


def test_refuses_config_weights_mismatch(tmp_path: Path):
    model = tiny_model()
    wrong = ModelConfig(**{**preset("tiny").to_dict(), "embed_dim": 48, "num_heads": 2})
    path = tmp_path / "mismatch.pt"
    ckpt.save({**_payload(model), "config": wrong.to_dict()}, path)
    with pytest.raises(ckpt.CheckpointError, match="do not match"):
        ckpt.load(path)
    bad_cfg = tmp_path / "badcfg.pt"
    ckpt.save({**_payload(model), "config": {**model.config.to_dict(), "depth": 4}}, bad_cfg)
    with pytest.raises(ckpt.CheckpointError, match="bad config"):
        ckpt.load(bad_cfg)
    no_weights = tmp_path / "empty.pt"
    ckpt.save({"config": model.config.to_dict()}, no_weights)
    with pytest.raises(ckpt.CheckpointError, match="no weights"):
        ckpt.load(no_weights)
