"""The command line: help texts, `sample --json` and `evaluate --json` on a tiny random checkpoint, errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from adadiff_export.cli import build_parser, main
from adadiff_export.quality.classifier import ClassifierConfig, FashionClassifier, feature_stats, save_classifier

from conftest import tiny_model

SAMPLE_KEYS = {"mean_layers", "layers_by_step", "seconds", "image_mean", "image_std", "threshold", "sampler",
               "steps", "n", "backend"}


def _run(capsys, *argv: str):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("cmd", [[], ["sample"], ["evaluate"], ["train"], ["classifier"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(cmd + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m adadiff_export" in text
    if cmd == ["evaluate"]:
        assert "NOT Inception FID" in text
    if cmd == ["sample"]:
        assert "--threshold" in text and "--backend" in text and "--granularity" in text


def test_sample_json_on_a_tiny_checkpoint(tiny_checkpoint: Path, tmp_path: Path, capsys):
    png = tmp_path / "grid.png"
    rc, out, _ = _run(capsys, "sample", str(tiny_checkpoint), "--n", "12", "--steps", "3", "--seed", "1",
                      "--out", str(png), "--json")
    assert rc == 0
    rec = _last_json(out)
    assert set(rec) >= SAMPLE_KEYS
    assert rec["threshold"] == 0.5  # the checkpoint's stored default
    assert rec["steps"] == 3 and len(rec["layers_by_step"]) == 3 and rec["n"] == 12 and rec["backend"] == "torch"
    assert 1.0 <= rec["mean_layers"] <= 5.0
    assert rec["mean_layers"] == pytest.approx(sum(rec["layers_by_step"]) / 3, abs=1e-2)
    assert "layers used: mean" in out and "by step:" in out
    with Image.open(png) as img:
        assert img.width > 0 and img.height > 0
    rc, out2, _ = _run(capsys, "sample", str(tiny_checkpoint), "--n", "12", "--steps", "3", "--seed", "1",
                       "--out", str(png), "--json")
    again = _last_json(out2)
    assert (again["image_mean"], again["layers_by_step"]) == (rec["image_mean"], rec["layers_by_step"])


@pytest.mark.parametrize("flags,layers", [(["--threshold", "0"], 5.0), (["--policy", "static", "--layer", "2"], 2.0),
                                          (["--threshold", "1", "--granularity", "batch"], 1.0)])
def test_sample_layers_follow_the_policy(tiny_checkpoint: Path, tmp_path: Path, capsys, flags, layers):
    rc, out, _ = _run(capsys, "sample", str(tiny_checkpoint), "--n", "4", "--steps", "2", "--sampler", "ddim",
                      "--out", str(tmp_path / "g.png"), "--json", *flags)
    assert rc == 0
    rec = _last_json(out)
    assert rec["mean_layers"] == layers and rec["layers_by_step"] == [layers, layers]


def test_sample_errors(tiny_checkpoint: Path, tmp_path: Path, capsys):
    rc, _, err = _run(capsys, "sample", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "g.png"))
    assert rc == 2 and err.startswith("error:") and "does not exist" in err
    rc, _, err = _run(capsys, "sample", str(tiny_checkpoint), "--policy", "saturation", "--out", str(tmp_path / "g.png"))
    assert rc == 2 and "--threshold" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--seed", "-5", "--backend", "rt"], "--seed must be >= 0, got -5"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out", "{tmp}/grid.jpgx"], ".jpgx is not an image format"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/afile/grid.png"], "is a file, not a folder"),
])
def test_sample_refuses_bad_flags_before_any_work(tmp_path: Path, capsys, flags, message):
    # the checkpoint does not exist: an error about the flag proves the flag was checked before any loading,
    # let alone minutes of sampling
    (tmp_path / "afile").write_text("")
    argv = ["sample", str(tmp_path / "missing.pt"), "--engines", str(tmp_path / "no_engines"),
            *[f.format(tmp=tmp_path) for f in flags]]
    if "--out" not in flags:
        argv += ["--out", str(tmp_path / "g.png")]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_evaluate_refuses_steps_0_before_any_work(tmp_path: Path, capsys):
    rc, _, err = _run(capsys, "evaluate", str(tmp_path / "missing.pt"), "--steps", "0")
    assert rc == 2 and "--steps must be >= 1" in err


def test_a_step_count_of_0_is_refused_not_taken_for_the_default():
    from adadiff_export.sampling.samplers import DEFAULT_STEPS, steps_for

    assert steps_for("ddim", None) == DEFAULT_STEPS["ddim"] and steps_for("ddim", 7) == 7
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        steps_for("dpm++", 0)


def test_generate_rt_refuses_a_seed_the_runtime_cannot_take(tmp_path: Path):
    from adadiff_export.sampling.early_exit import ExitPolicy
    from adadiff_export.sampling.generate import generate_rt

    for seed in (-5, 2 ** 64):
        with pytest.raises(ValueError, match="seed must be in 0.."):  # before the engines folder is even looked at
            generate_rt(tmp_path / "no_engines", (1, 8, 8), 10, 4, ExitPolicy(), seed=seed)


@pytest.mark.skipif(importlib.util.find_spec("adadiff_rt") is not None, reason="adadiff_rt is built here")
def test_sample_rt_backend_without_the_runtime_says_how_to_build_it(tiny_checkpoint: Path, tmp_path: Path, capsys):
    rc, _, err = _run(capsys, "sample", str(tiny_checkpoint), "--backend", "rt", "--engines", str(tmp_path),
                      "--out", str(tmp_path / "g.png"))
    assert rc == 2 and "adadiff_rt" in err and "pip install ." in err


def test_evaluate_json_and_sweep(tiny_checkpoint: Path, tmp_path: Path, capsys):
    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(img_size=8, width=8, feature_dim=8)).eval()
    clf_path = tmp_path / "clf.pt"
    save_classifier(clf, clf_path, 0.1, feature_stats(clf, torch.rand(50, 1, 8, 8) * 2 - 1), {})
    rc, out, _ = _run(capsys, "evaluate", str(tiny_checkpoint), "--n", "20", "--steps", "2", "--batch-size", "8",
                      "--classifier", str(clf_path), "--sweep", "0.3,1", "--layers", "2,5", "--json")
    assert rc == 0
    assert [(p["layer"], p["mean_layers"]) for p in _last_json(out)["static"]] == [(2, 2.0), (5, 5.0)]
    # static at full depth is full depth: the same images, so the same quality
    assert _last_json(out)["static"][1]["fd"] == pytest.approx(_last_json(out)["full"]["fd"], rel=1e-6)
    rec = _last_json(out)
    assert rec["full"]["name"] == "full" and rec["full"]["layer"] == 0
    assert set(rec["exit"]) == {"name", "policy", "threshold", "accuracy", "fd", "mean_layers"}
    assert rec["exit"]["policy"] == "uem" and rec["exit"]["name"] == "uem 0.5"
    assert rec["full"]["mean_layers"] == 5.0 and rec["exit"]["threshold"] == 0.5
    assert [p["threshold"] for p in rec["sweep"]] == [0.3, 0.5, 1.0]
    assert rec["sweep"][-1]["mean_layers"] == 1.0
    assert all(0.0 <= p["accuracy"] <= 1.0 and p["fd"] >= 0 for p in rec["sweep"])
    assert "not Inception FID" in out


@pytest.mark.skipif(importlib.util.find_spec("adadiff_rt") is None, reason="adadiff_rt is not built (pip install .)")
def test_sample_rt_backend_matches_torch(tiny_checkpoint: Path, tmp_path: Path, capsys, request):
    from runtime_engines import onnx_engines

    # The same model as tiny_checkpoint, built once and cached with the runtime tests' engines.
    engines = onnx_engines(request.config.cache.mkdir("adadiff_rt_engines"), tiny_model(uem_gain=20.0), 16)
    common = [str(tiny_checkpoint), "--n", "20", "--steps", "4", "--seed", "2", "--json"]
    runs = {}
    for backend in ("torch", "rt"):
        rc, out, _ = _run(capsys, "sample", *common, "--backend", backend, "--engines", str(engines),
                          "--out", str(tmp_path / f"{backend}.png"))
        assert rc == 0
        runs[backend] = _last_json(out)
    assert runs["rt"]["layers_by_step"] == runs["torch"]["layers_by_step"]  # same exit decisions
    assert runs["rt"]["image_mean"] == pytest.approx(runs["torch"]["image_mean"], abs=1e-4)
    assert runs["rt"]["image_std"] == pytest.approx(runs["torch"]["image_std"], abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("adadiff_rt") is None, reason="adadiff_rt is not built (pip install .)")
def test_euler_maruyama_agrees_between_backends_at_the_same_batch_size(tiny_checkpoint: Path, tmp_path: Path,
                                                                        capsys, request):
    from runtime_engines import onnx_engines

    engines = onnx_engines(request.config.cache.mkdir("adadiff_rt_engines"), tiny_model(uem_gain=20.0), 16)
    common = [str(tiny_checkpoint), "--n", "12", "--steps", "5", "--sampler", "euler", "--seed", "3", "--json",
              "--engines", str(engines)]
    runs = {}
    for backend in ("torch", "rt"):  # under guidance the engines (max_batch 16) hold 8 samples a run
        rc, out, _ = _run(capsys, "sample", *common, "--backend", backend, "--batch-size", "8",
                          "--out", str(tmp_path / f"{backend}.png"))
        assert rc == 0
        runs[backend] = _last_json(out)
    assert runs["rt"]["layers_by_step"] == runs["torch"]["layers_by_step"]
    assert runs["rt"]["image_mean"] == pytest.approx(runs["torch"]["image_mean"], abs=1e-4)
    assert runs["rt"]["image_std"] == pytest.approx(runs["torch"]["image_std"], abs=1e-4)
    rc, out, _ = _run(capsys, "sample", *common, "--backend", "rt", "--out", str(tmp_path / "rt.png"))
    assert rc == 0 and "chunks of 8 samples" in out and "--batch-size 8" in out
