"""The bench's measuring pieces against the oracle and hand computation; a --quick smoke on the tiny config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_export.bench import contenders, harness, report
from adadiff_export.bench.config import BenchConfig
from adadiff_export.bench.run import run as run_bench
from adadiff_export.calibration.search import match_threshold
from adadiff_export.sampling.early_exit import ExitPolicy, early_exit

from conftest import tiny_model


def _inputs(model, b: int = 12, seed: int = 0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.linspace(0.05, 1.0, b)
    y = torch.arange(b) % c.num_classes
    return x, t, y


def test_authors_peer_is_the_batch_rule_of_the_oracle():
    m = tiny_model(uem_gain=20.0)
    x, t, y = _inputs(m)
    for thr in (0.2, 0.5, 0.8):
        peer = contenders.AuthorsEarlyExit(m, thr)
        eps = peer(x, t, y)
        ref = early_exit(m, x, t, y, ExitPolicy("uem", threshold=thr, granularity="batch"))
        assert peer.layers[-1] == int(ref.exit_layer[0])
        torch.testing.assert_close(eps, ref.eps, rtol=1e-5, atol=1e-6)


def test_match_threshold_finds_the_oracle_saturation_threshold_for_a_layer_budget():
    m = tiny_model()
    x, t, y = _inputs(m)

    def mean_layers(th: float) -> float:
        return float(early_exit(m, x, t, y, ExitPolicy("saturation", threshold=th)).exit_layer.float().mean())

    achievable = {mean_layers(th) for th in np.linspace(0.0, 3.0, 301)}
    for target in (1.5, 2.5, 3.2):
        thr = match_threshold(mean_layers, target)
        best = min(abs(a - target) for a in achievable)
        # bisection lands on a threshold at least as close to the budget as a fine grid does
        assert abs(mean_layers(thr) - target) <= best + 1e-9, (target, thr, mean_layers(thr))


def test_match_threshold_by_hand():
    # a step function: 4 layers below 0.1, 3 below 0.5, 2 below 2.0, then 1; brackets grow past 1.0
    steps = [(0.1, 4.0), (0.5, 3.0), (2.0, 2.0)]
    layers = lambda th: next((v for edge, v in steps if th < edge), 1.0)  # noqa: E731
    assert layers(match_threshold(layers, 3.0)) == 3.0
    assert layers(match_threshold(layers, 1.0)) == 1.0
    assert layers(match_threshold(layers, 2.2)) == 2.0


def test_ideal_speedup_by_hand():
    costs = harness.SegmentCosts(batch=4, stem=1.0, layers=[2.0, 2.0, 2.0, 2.0], head=1.0)
    assert harness.ideal_speedup(np.full(4, 4), costs) == pytest.approx(1.0)
    # two rows stop after layer 2, two run all 4: stem + head + 2 + 2 + 0.5*2 + 0.5*2 = 8 of 10
    assert harness.ideal_speedup(np.array([2, 2, 4, 4]), costs) == pytest.approx(10 / 8)
    # two calls of a sampling run: one at full depth, one all exiting at layer 1
    assert harness.ideal_speedup(np.array([[4, 4], [1, 1]]), costs) == pytest.approx(20 / (10 + 4))


def test_interleaved_timing_rotates_and_takes_medians():
    order = []

    def make(name, layers):
        return harness.Case(harness.Row("m", "denoise", 1, name, "full", "-", None, 0.0, 0.0),
                            lambda: (order.append(name), (torch.zeros(1), np.array(layers)))[1])

    cases = [make("a", [3]), make("b", [1, 2])]
    harness.time_interleaved(cases, repeats=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(c.times) == 3 and c.row.ms == sorted(c.times)[1] for c in cases)
    assert cases[1].row.mean_layers == pytest.approx(1.5)


def test_rotating_times_rotates_who_goes_first():
    order = []
    times = harness.rotating_times([lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")], 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(t) for t in times] == [3, 3, 3] and all(x >= 0 for t in times for x in t)


def test_markdown_and_json_rows_have_the_promised_fields():
    r = harness.Row("small", "sample", 64, "adadiff_rt", "uem", "sample", 0.1, 12.5, 7.25, speedup=1.8,
                  ideal_speedup=1.9, efficiency=0.95, fd=3.0, accuracy=0.9, default=True)
    info = {"cpu": "test cpu", "logical_cpus": 2, "torch": "x", "torch_threads": 2}
    rows = report.to_json([r], info)
    need = {"engine", "policy", "granularity", "batch", "threshold", "workload", "ms", "speedup", "mean_layers",
            "ideal_speedup", "efficiency", "fd", "accuracy", "default", "machine"}
    assert need <= set(rows[0]) and rows[0]["pred_mse"] is None
    json.dumps(rows)
    md = report.markdown([r], info, "cmd")
    assert "| 64 | adadiff_rt | uem **(default)** |" in md and "test cpu" in md


def _have_runtime() -> bool:
    try:
        import adadiff_rt  # noqa: F401
        from adadiff_export.export import build  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_runtime(), reason="needs the compiled adadiff_rt module and the exporter's build")
def test_quick_bench_on_the_tiny_config(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    from adadiff_export.model import checkpoint as ckpt
    from adadiff_export.quality import metrics

    raw = ckpt.read_raw(tiny_checkpoint)  # a calibrated default: a schedule by time
    raw["defaults"].update(policy="schedule", schedule={"t_bounds": [0.5], "layers": [2, 4]})
    ckpt.write_atomic(raw, tiny_checkpoint)

    clf_path = Path(metrics.SHIPPED_CLASSIFIER) if hasattr(metrics, "SHIPPED_CLASSIFIER") else None
    if clf_path is not None and not clf_path.exists():
        pytest.skip("the shipped classifier is not there yet")
    cfg = BenchConfig.quick(checkpoint=tiny_checkpoint, out=tmp_path / "out", denoise_batches=(3,),
                            sample_batches=(2,), sweep_batches=(2,), steps=3, repeats=1, warmup=0,
                            n_quality=8, sweep=(1.0, 2.0), cifar=False)
    res = run_bench(cfg, "test", json_path=tmp_path / "rows.json", progress=False)
    rows = json.loads((tmp_path / "rows.json").read_text())
    engines = {r["engine"] for r in rows}
    assert {"torch-eager", "torch-compile", "onnxruntime", "openvino", "torch-authors", "adadiff_rt"} <= engines
    assert {"full", "uem", "static", "saturation", "schedule"} <= {r["policy"] for r in rows}
    assert {r["workload"] for r in rows} == {"denoise", "sample"}
    defaults = [r for r in rows if r["default"]]
    assert defaults and all(r["policy"] == "schedule" and r["engine"] == "adadiff_rt" for r in defaults)
    # the schedule's layers: 2 at t >= 0.5, 4 below; a 3-step run's times are 1.0, ~0.5 and t_eps
    assert all(2.0 <= r["mean_layers"] <= 4.0 for r in defaults)
    compiled = [r for r in rows if r["engine"] == "torch-compile"]
    assert compiled and all(r["pred_mse"] < 1e-8 for r in compiled)  # torch.compile computes full depth
    full_rt = [r for r in rows if r["engine"] == "adadiff_rt" and r["policy"] == "full"]
    # threshold 0 runs every layer and matches PyTorch full depth
    assert all(r["mean_layers"] == 5 and r["pred_mse"] < 1e-8 for r in full_rt)
    assert all(Path(p).exists() for p in res.figures.values())
