"""Training: a few steps on synthetic 8x8 data, resume, the plain loss, DDP under torchrun, data errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_export.cli import main
from adadiff_export.data import DataError, load_dataset
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.training.losses import LossConfig
from adadiff_export.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 32))
    return path


def _cfg(npz: Path, out: Path, **kw) -> TrainConfig:
    base = dict(out=out, config="tiny", data=str(npz), steps=2, batch_size=4, warmup=1, sample_every=0,
                save_every=100, log_every=1, threads=1)
    return TrainConfig(**{**base, **kw})


def test_joint_training_saves_a_loadable_checkpoint_and_resumes(npz: Path, tmp_path: Path):
    out = tmp_path / "run"
    path = train(_cfg(npz, out))
    raw = ckpt.read_raw(path)
    assert raw["step"] == 2 and set(raw) >= {"model", "ema", "optimizer", "config", "defaults"}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]
    assert all(np.isfinite([r["simple"], r["u"], r["ual"], r["total"]]).all() for r in logs)
    first = ckpt.load(path).model.state_dict()
    train(_cfg(npz, out, steps=4, resume=True))
    raw2 = ckpt.read_raw(path)
    assert raw2["step"] == 4
    later = ckpt.load(path).model.state_dict()
    assert any(not torch.equal(first[k], later[k]) for k in first)


def test_plain_loss_then_fine_tune_with_init(npz: Path, tmp_path: Path):
    plain = train(_cfg(npz, tmp_path / "plain", loss=LossConfig("simple")))
    logs = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert set(logs[-1]) >= {"simple", "total"} and "ual" not in logs[-1]
    tuned = train(_cfg(npz, tmp_path / "tuned", init=plain, steps=1))
    assert ckpt.read_raw(tuned)["step"] == 1


def test_reset_uems_refits_only_the_uncertainty_modules(npz: Path, tmp_path: Path):
    from adadiff_export.model.uvit import UViT
    from adadiff_export.training.train import reset_uems

    model = UViT(ckpt.load(train(_cfg(npz, tmp_path / "run"))).model.config)
    with torch.no_grad():
        for p in model.uems.parameters():
            p.fill_(40.0)  # a saturated UEM: sigmoid ~1 everywhere, no gradient left
    ema = UViT(model.config)
    opt = torch.optim.AdamW(model.parameters())
    model.uems[0].proj.weight.sum().backward()
    opt.step()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("uems.")}
    reset_uems(model, ema, opt)
    assert all(float(p.abs().max()) < 40.0 for p in model.uems.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert all(torch.equal(a, b) for a, b in zip(model.uems.state_dict().values(), ema.uems.state_dict().values()))
    assert not any(p in opt.state for p in model.uems.parameters())
    # and through the command line, after a resume
    out = tmp_path / "cli"
    train(_cfg(npz, out))
    assert main(["train", "--config", "tiny", "--data", str(npz), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--sample-every", "0", "--threads", "1", "--resume", "--reset-uems", "--gamma-layer", "0.1"]) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "layer" in logs[-1] and ckpt.read_raw(out / "ckpt.pt")["step"] == 3


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("ADADIFF_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    assert main(["train", "--config", "tiny", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_data_errors(tmp_path: Path):
    with pytest.raises(DataError, match="neither"):
        load_dataset(str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((2, 8, 8)))
    with pytest.raises(DataError, match="no array named 'images'"):
        load_dataset(str(bad))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="shape"):
        train(_cfg(wrong, tmp_path / "w"))


def test_ddp_two_processes_under_torchrun(npz: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "adadiff_export", "train", "--config", "tiny", "--data", str(npz), "--steps", "3",
           "--batch-size", "4", "--warmup", "1", "--sample-every", "0", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = ckpt.read_raw(out / "ckpt.pt")
    assert raw["step"] == 3
    assert ckpt.load(out / "ckpt.pt").model.config.depth == 5


def _colour_npz(path: Path, size: int, n: int = 16, classes: int = 0) -> Path:
    rng = np.random.default_rng(1)
    arrays = {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}  # [N, H, W, C]
    if classes:
        arrays["labels"] = rng.integers(0, classes, n)
    np.savez(path, **arrays)
    return path


def test_a_custom_shape_from_the_command_line(tmp_path: Path):
    data = _colour_npz(tmp_path / "c.npz", 8)
    out = tmp_path / "run"
    assert main(["train", "--img-size", "8", "--channels", "3", "--patch", "2", "--width", "16", "--depth", "3",
                 "--heads", "2", "--classes", "0", "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--sample-every", "0", "--threads", "1"]) == 0
    raw = ckpt.read_raw(out / "ckpt.pt")
    c = raw["config"]
    assert (c["img_size"], c["in_chans"], c["patch_size"], c["embed_dim"], c["depth"], c["num_heads"],
            c["num_classes"]) == (8, 3, 2, 16, 3, 2, 0)
    assert raw["defaults"]["guidance"] == 1.0  # an unconditional model has no guidance to store
    from adadiff_export.sampling.generate import exit_defaults

    older = tmp_path / "older.pt"  # as `train` wrote it before: guidance 2 whatever the model
    ckpt.save({**raw, "defaults": {"guidance": 2.0}}, older)
    assert exit_defaults(ckpt.load(older)).guidance == 1.0  # what build writes into the manifest
    # resuming takes the saved shape without the flags
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--sample-every", "0", "--threads", "1", "--resume"]) == 0
    assert ckpt.read_raw(out / "ckpt.pt")["step"] == 3


def test_fine_tune_a_converted_authors_checkpoint_at_32x32x3(tmp_path: Path, capsys):
    """The paper's recipe: a pre-trained U-ViT of the authors' code (no certainty modules), converted, then
    trained with the joint loss at its own shape on 32x32 colour images; also straight from the .pth."""
    from authors_format import authors_state_dict

    src = tmp_path / "cifar10_uvit_small.pth"
    torch.save(authors_state_dict(img=32, chans=3, patch=4, width=16, k=1, rows=0, lte=False), src)
    conv = tmp_path / "converted.pt"
    assert main(["convert", str(src), "-o", str(conv), "--heads", "2"]) == 0
    data = _colour_npz(tmp_path / "cifar.npz", 32)
    out = tmp_path / "tuned"
    assert main(["train", "--init", str(conv), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--warmup", "1", "--sample-every", "0", "--threads", "1"]) == 0
    before, after = ckpt.load(conv), ckpt.load(out / "ckpt.pt")
    assert after.model.config == before.model.config and after.model.config.img_size == 32
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite([r["simple"], r["u"], r["ual"]]).all() for r in logs)
    changed = [k for k, v in before.model.state_dict().items() if not torch.equal(v, after.model.state_dict()[k])]
    assert any(k.startswith("uems.") for k in changed) and any(k.startswith("blocks.") for k in changed)
    # a shape flag that contradicts the --init checkpoint is named
    capsys.readouterr()
    assert main(["train", "--init", str(conv), "--width", "32", "--data", str(data), "--out", str(tmp_path / "x"),
                 "--steps", "1", "--sample-every", "0"]) == 2
    assert "embed_dim 16" in capsys.readouterr().err
    # the authors' file itself, converted in memory, says what it detected
    wide = tmp_path / "wide.pth"
    torch.save(authors_state_dict(img=32, chans=3, patch=4, width=64, k=1, rows=0, lte=False), wide)
    assert main(["train", "--init", str(wide), "--data", str(data), "--out", str(tmp_path / "direct"), "--steps", "1",
                 "--batch-size", "2", "--sample-every", "0", "--threads", "1"]) == 0
    assert "freshly initialised" in capsys.readouterr().out
