"""The trade-off benchmark and calibrate's command line on a tiny model: every policy fitted to each budget,
measured on the same samples, written as a table, JSON and pictures; adadiff_rt timing where it is built."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adadiff_export.cli import main
from adadiff_export.quality.classifier import ClassifierConfig, FashionClassifier, feature_stats, save_classifier


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(width=8, feature_dim=8)).eval()
    path = tmp_path / "clf.pt"
    save_classifier(clf, path, 0.1, feature_stats(clf, torch.rand(50, 1, 8, 8) * 2 - 1), {})
    return path


def test_tradeoff_fits_measures_and_writes_every_policy(tiny_checkpoint, classifier, tmp_path, capsys, request):
    timed = importlib.util.find_spec("adadiff_rt") is not None
    checkpoint, extra = tiny_checkpoint, ["--no-time"]
    if timed:  # the runtime tests' cached engines, with the very checkpoint they were built from (no rebuild)
        from conftest import tiny_model
        from runtime_engines import onnx_engines

        engines = onnx_engines(request.config.cache.mkdir("adadiff_rt_engines"), tiny_model(uem_gain=20.0), 16)
        checkpoint = Path(json.loads((engines / "manifest.json").read_text())["source"]["path"])
        extra = ["--engines", str(engines)]
    args = ["tradeoff", str(checkpoint), "--saved", "0.4", "--n", "8", "--cal-samples", "6",
            "--classifier", str(classifier), "--out", str(tmp_path / "out"), "--repeats", "1", "--time-batch", "2",
            *extra]
    assert main(args) == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    kinds = [r["kind"] for r in rec["rows"]]
    assert kinds[0] == "full" and {"static", "schedule", "uem-time", "uem", "saturation"} <= set(kinds)
    budget = 0.6 * 5
    fitted = [r for r in rec["rows"] if r["budget"] is not None]
    assert all(r["budget"] == budget for r in fitted)
    assert sorted(r["params"]["layer"] for r in rec["rows"] if r["kind"] == "static") == [3]
    sched = next(r for r in fitted if r["kind"] == "schedule")
    assert abs(sched["mean_layers"] - budget) <= 1.0  # the evaluation set meets the fitted budget within a layer
    assert (tmp_path / "out" / "tradeoff_layers.png").stat().st_size > 1000
    assert "| budget | policy |" in out and "not Inception FID" in out
    assert rec["final_x0"] is True and "returning its x0 prediction" in out
    from adadiff_export.bench.tradeoff import load as load_result

    old = dict(rec)
    del old["final_x0"]  # a result written before final_x0 existed was measured at t_eps
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_result(tmp_path / "old.json").final_x0 is False
    if timed:
        assert all(r["rt_ms"] > 0 for r in rec["rows"])
        assert (tmp_path / "out" / "tradeoff_time.png").exists()
        # --retime measures the same rows again, quality untouched; it refuses to time them with another last
        # step than they were measured with (the flag used to be ignored), before any work
        capsys.readouterr()
        assert main(args + ["--retime", "--no-final-x0"]) == 2
        assert "measured with --final-x0: drop --no-final-x0" in capsys.readouterr().err
        assert main(args + ["--retime", "--repeats", "1", "--final-x0"]) == 0
        again = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
        assert [(r["name"], r["fd"]) for r in again["rows"]] == [(r["name"], r["fd"]) for r in rec["rows"]]
        assert all(r["rt_ms"] > 0 for r in again["rows"])


def test_tradeoff_refuses_bad_budgets_before_work(tiny_checkpoint, capsys):
    assert main(["tradeoff", str(tiny_checkpoint), "--saved", "1.2", "--no-time"]) == 2
    assert "--saved" in capsys.readouterr().err


def test_calibrate_checkpoint_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cal.pt"
    rc = main(["calibrate", str(tiny_checkpoint), "--out", str(out), "--target-layers", "0.6", "--samples", "6",
               "--bins", "2", "--policies", "schedule,uem", "--default", "uem"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "default policy: uem" in text and "schedule" in text
    from adadiff_export.model.checkpoint import load
    from adadiff_export.sampling.generate import exit_defaults

    d = exit_defaults(load(out))
    assert d.schedule is not None and d.policy == "uem"  # --default overrides the lowest J
    assert load(out).raw["provenance"]["calibration"]["default"] == "uem"
    assert load(out).raw["provenance"]["calibration"]["final_x0"] is True
    rc = main(["sample", str(out), "--n", "2", "--steps", "3", "--out", str(tmp_path / "g.png"), "--json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["policy"] == d.policy


@pytest.mark.parametrize("argv,message", [
    (["--target-layers", "1.5"], "--target-layers"),
    (["--samples", "1"], "--samples"),
    (["--policies", "uem"], "schedule is always fitted"),
    (["--policies", "schedule,uem", "--default", "uem-time"], "--default uem-time is not among --policies"),
])
def test_calibrate_refuses_bad_flags_before_work(tiny_checkpoint, capsys, argv, message):
    assert main(["calibrate", str(tiny_checkpoint), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("final_x0", [True, False])
def test_calibration_runs_end_as_asked(tiny_checkpoint, final_x0):
    """Calibration samples end as the sampler will (final_x0 by default): a full-depth calibration run is the plain
    sampler's run with the same last step."""
    from adadiff_export.calibration.runs import CalibrationSet, StepRunner
    from adadiff_export.model.checkpoint import load
    from adadiff_export.sampling.samplers import guided, sample

    loaded = load(tiny_checkpoint)
    m = loaded.model
    cset = CalibrationSet.draw(loaded, 3, 2.0, steps=4, final_x0=final_x0)
    run = StepRunner(loaded, cset).run([m.depth] * 4)
    with torch.no_grad():
        ref = sample("dpm++", guided(lambda x, t, y: m(x, t, y), 2.0, m.config.num_classes), cset.noise.clone(),
                     loaded.schedule, 4, y=cset.labels, final_x0=final_x0)
        other = sample("dpm++", guided(lambda x, t, y: m(x, t, y), 2.0, m.config.num_classes), cset.noise.clone(),
                       loaded.schedule, 4, y=cset.labels, final_x0=not final_x0)
    torch.testing.assert_close(run.images, ref, rtol=1e-5, atol=1e-5)
    assert (run.images - other).abs().max() > 1e-3
