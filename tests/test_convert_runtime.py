"""Checkpoints of the authors' code build, verify and run on adadiff_rt as the oracle runs them.

Two random models in the authors' layout (tests/authors_format.py): an unconditional AdaDiff model built
straight from its .pth (converted in memory), and a class-conditional one with a null class, converted first
(`convert --null-class last --scale 1`). The authors' exit rule (`uem-authors`) runs chained in adadiff_rt
(the OpenVINO exit graph declines it) and must give the oracle's exits and eps; under guidance the two halves
decide apart, as the authors' two calls do.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_export.cli import main
from adadiff_export.export.build import build_engines
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.sampling.early_exit import EarlyExitDenoiser, ExitPolicy, early_exit, per_layer_uncertainty
from adadiff_export.sampling.samplers import guided, sample as py_sample
from authors_format import authors_state_dict
from runtime_engines import TOL, import_runtime, rel_err

adadiff_rt = import_runtime(need_openvino=True)

UNCOND = dict(img=8, chans=3, patch=2, width=64, k=2, rows=0, lte=True)  # width 64: heads from D / 64
COND = dict(img=8, chans=3, patch=4, width=32, k=3, rows=4, lte=True)    # --heads 2 --null-class last
MAX_BATCH = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    log = []
    src = root / "nnet_ema.pth"
    torch.save(authors_state_dict(**UNCOND, seed=7, lte_gain=6.0), src)
    build_engines(src, root / "uncond", max_batch=MAX_BATCH, tensorrt="off", log=log.append)
    src2 = root / "cond_authors.pth"
    torch.save({"model": authors_state_dict(**COND, seed=8, lte_gain=6.0)}, src2)
    assert main(["convert", str(src2), "-o", str(root / "cond.pt"), "--heads", "2", "--null-class", "last",
                 "--scale", "1"]) == 0
    build_engines(root / "cond.pt", root / "cond", max_batch=MAX_BATCH, tensorrt="off", log=lambda _m: None)
    models = {"uncond": ckpt.load(src).model, "cond": ckpt.load(root / "cond.pt").model}
    return root, log, models


def test_build_takes_the_authors_file_and_verify_passes(built, capsys):
    root, log, _ = built
    assert any("detected: AdaDiff" in line for line in log), log
    manifest = json.loads((root / "uncond" / "manifest.json").read_text())
    assert manifest["exit"]["policy"] == "uem-authors" and manifest["exit"]["threshold"] == pytest.approx(0.1)
    assert manifest["model"]["token_order"] == "label_first" and manifest["model"]["time_scale"] == 999.0
    for folder in ("uncond", "cond"):
        assert main(["verify", str(root / folder)]) == 0
        out = capsys.readouterr().out
        assert "vs PyTorch" in out and "OK" in out, out
    rt = adadiff_rt.Runtime(str(root / "cond"), threads=1)
    assert rt.default_exit["guidance"] == pytest.approx(2.0)  # the authors' s = 1 is our w = 2


def _inputs(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.rand(n, generator=g) * 0.98 + 0.01
    y = torch.randint(0, c.num_classes + 1, (n,), generator=g) if c.num_classes else None
    return x, t, y


def _thresholds(model, x, t, y):
    """Midpoints between the layers' batch-mean uncertainties: each exits the batch somewhere else."""
    means = sorted(float(v) for v in per_layer_uncertainty(model, x, t, y).mean(dim=0)[:-1])
    return [0.5 * (a + b) for a, b in zip(means, means[1:])]


@pytest.mark.parametrize("which", ["uncond", "cond"])
@pytest.mark.parametrize("batch", [1, 5, MAX_BATCH])
def test_uem_authors_denoise_matches_oracle(built, which, batch):
    root, _, models = built
    model = models[which]
    rt = adadiff_rt.Runtime(str(root / which), threads=1)
    x, t, y = _inputs(model, batch, seed=batch)
    seen = set()
    for thr in _thresholds(model, x, t, y):
        eps, layer, u = rt.denoise(x.numpy(), t.numpy(), None if y is None else y.numpy(), policy="uem-authors",
                                   threshold=thr)
        ref = early_exit(model, x, t, y, ExitPolicy("uem-authors", threshold=thr, granularity="batch"))
        np.testing.assert_array_equal(layer, ref.exit_layer.numpy())
        assert rel_err(eps, ref.eps.numpy()) <= TOL
        np.testing.assert_array_equal(np.isnan(u), np.isnan(ref.u.numpy()))
        assert rt.engine_calls >= 2 + int(layer.max())  # chained: the exit graph declines this rule
        seen.add(int(layer[0]))
    assert len(seen) >= 2, seen


@pytest.mark.parametrize("which,guidance", [("uncond", None), ("cond", 2.0)])
def test_uem_authors_sampling_matches_oracle(built, which, guidance):
    root, _, models = built
    model = models[which]
    c = model.config
    rt = adadiff_rt.Runtime(str(root / which), threads=1)
    noise = torch.randn(3, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 2, 1]) if c.num_classes else None
    steps = 6
    x, t, yy = _inputs(model, 3, seed=4)
    best = None
    for thr in _thresholds(model, x, t, yy):
        den = EarlyExitDenoiser(model, ExitPolicy("uem-authors", threshold=thr, granularity="batch"))
        fn = den if y is None else guided(den, guidance, c.num_classes)
        ref = py_sample("dpm++", fn, noise.clone(), ckpt.load(root / "cond.pt").schedule, steps, y=y)
        used = den.layers_by_step().numpy()
        # spread exits; under guidance, steps where the two halves exit at different layers
        score = (int((used[:, 0] != used[:, -1]).sum()), len(np.unique(used)))
        if best is None or score > best[0]:
            best = (score, thr, ref.numpy(), used)
    _, thr, ref, ref_used = best
    images, used = rt.sample(noise.numpy(), None if y is None else y.numpy(), sampler="dpm++", steps=steps,
                             guidance=guidance, policy="uem-authors", threshold=thr)
    assert used.shape == ref_used.shape and len(np.unique(used)) >= 2, used
    np.testing.assert_array_equal(used, ref_used)
    assert rel_err(images, ref) <= TOL
    for row in used:  # one decision per batch, or per half under guidance (the authors' two calls)
        assert len(np.unique(row[:3])) == 1 and len(np.unique(row[-3:])) == 1
    if y is not None:
        assert (used[:, 0] != used[:, 3]).any(), used


def test_unconditional_folder_samples_with_the_manifest_defaults(built):
    """No guidance for an unconditional model: the manifest's default is 1, so a call that names nothing samples."""
    root, _, models = built
    rt = adadiff_rt.Runtime(str(root / "uncond"), threads=1)
    assert rt.default_exit["guidance"] == 1.0 and rt.default_exit["policy"] == "uem-authors"
    c = models["uncond"].config
    noise = np.random.default_rng(0).standard_normal((2, c.in_chans, c.img_size, c.img_size)).astype(np.float32)
    images, used = rt.sample(noise, None, steps=2)
    assert images.shape == noise.shape and np.isfinite(images).all() and used.shape == (2, 2)
    with pytest.raises(ValueError, match="unconditional"):
        rt.sample(noise, None, steps=2, guidance=2.0)


def test_uem_authors_is_refused_per_sample(built):
    root, _, models = built
    rt = adadiff_rt.Runtime(str(root / "uncond"), threads=1)
    x, t, _ = _inputs(models["uncond"], 2, seed=1)
    with pytest.raises(ValueError, match="granularity 'batch'"):
        rt.denoise(x.numpy(), t.numpy(), None, policy="uem-authors", threshold=0.1, granularity="sample")
    with pytest.raises(ValueError, match="patience"):
        rt.denoise(x.numpy(), t.numpy(), None, policy="uem-authors", threshold=0.1, patience=2)


def test_sample_command_runs_the_authors_file_on_both_backends_alike(built, capsys, tmp_path):
    """Unconditional, straight from the .pth (converted in memory), the authors' rule by default, Euler-Maruyama:
    torch and adadiff_rt give the same exits and images (the same noise for the same seed and batch size)."""
    root, _, _ = built
    runs = {}
    for backend in ("torch", "rt"):
        assert main(["sample", str(root / "nnet_ema.pth"), "--n", "6", "--steps", "4", "--sampler", "euler",
                     "--batch-size", "6", "--seed", "1", "--json", "--backend", backend, "--engines",
                     str(root / "uncond"), "--out", str(tmp_path / f"{backend}.png")]) == 0
        out = capsys.readouterr().out
        assert "detected: AdaDiff" in out
        runs[backend] = json.loads(out.strip().splitlines()[-1])
    assert runs["torch"]["policy"] == "uem-authors" and runs["torch"]["granularity"] == "batch"
    assert runs["rt"]["layers_by_step"] == runs["torch"]["layers_by_step"]
    assert runs["rt"]["image_mean"] == pytest.approx(runs["torch"]["image_mean"], abs=1e-4)
    assert runs["rt"]["image_std"] == pytest.approx(runs["torch"]["image_std"], abs=1e-4)
    assert main(["sample", str(root / "nnet_ema.pth"), "--guidance", "2", "--n", "2", "--steps", "1",
                 "--out", str(tmp_path / "g.png")]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_uvit_without_certainty_modules_at_depth_13_builds_verifies_and_samples_as_the_oracle(tmp_path, capsys):
    """The original U-ViT release's layout (no certainty modules, 13 blocks, classes without a null row): `build`
    takes the .pth directly (fresh UEMs, said so), `verify` passes, and adadiff_rt samples as the oracle at full
    depth and with a static exit."""
    src = tmp_path / "uvit.pth"
    torch.save(authors_state_dict(img=8, chans=3, patch=2, width=64, k=6, rows=3, lte=False, seed=9), src)
    log = []
    build_engines(src, tmp_path / "eng", max_batch=4, tensorrt="off", log=log.append)
    assert any("U-ViT" in line for line in log) and any("fresh" in line.lower() for line in log), log
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert manifest["model"]["depth"] == 13 and manifest["model"]["token_order"] == "label_first"
    assert main(["verify", str(tmp_path / "eng")]) == 0
    assert "OK" in capsys.readouterr().out
    model = ckpt.load(src).model
    c = model.config
    rt = adadiff_rt.Runtime(str(tmp_path / "eng"), threads=1)
    noise = torch.randn(3, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 2, 1])
    schedule = ckpt.load(src).schedule
    for kw in (dict(policy="uem", threshold=0.0), dict(policy="static", static_layer=6)):
        images, used = rt.sample(noise.numpy(), y.numpy(), sampler="dpm++", steps=4, guidance=1.0, **kw)
        den = EarlyExitDenoiser(model, ExitPolicy(kw["policy"], threshold=kw.get("threshold", 0.0),
                                                  layer=kw.get("static_layer", 0)))
        ref = py_sample("dpm++", den, noise.clone(), schedule, 4, y=y)
        np.testing.assert_array_equal(used, den.layers_by_step().numpy())
        assert rel_err(images, ref.numpy()) <= TOL, kw
