"""experiments/exit_graph_probe.py: the forms it times compute the model, and it refuses to time one that does not.

The probe's figures in BENCHMARKS.md are only worth something if each stitched form is the same model as
`full`; the script checks that before timing, and these tests check the check.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import tiny_model
from runtime_engines import onnx_engines

pytest.importorskip("openvino", reason="the probe compiles with the openvino Python package")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "exit_graph_probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("exit_graph_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engines(request) -> Path:
    # the same model and cache as test_runtime.py and test_cli.py, so the folder is built once
    return onnx_engines(request.config.cache.mkdir("adadiff_rt_engines"), tiny_model(uem_gain=20.0), 16)


@pytest.mark.parametrize("batch", [1, 3])
def test_every_form_matches_full_and_is_timed(engines: Path, batch: int, capsys):
    probe = _probe()
    assert probe.main(["--engines", str(engines), "--batch", str(batch), "--rounds", "2", "--compiles", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[0].strip() for line in out.splitlines() if "|" in line]
    assert rows[1:] == list(probe.FORMS)
    assert "UEMs alone" in out


def test_a_miswired_form_is_refused_before_timing(engines: Path, monkeypatch):
    probe = _probe()
    wired = probe.Stitcher.layer_inputs

    def skip_from_the_wrong_layer(self, i, h, temb, saved):
        feeds = wired(self, i, h, temb, saved)
        if "skip" in feeds:
            feeds["skip"] = h
        return feeds

    monkeypatch.setattr(probe.Stitcher, "layer_inputs", skip_from_the_wrong_layer)
    with pytest.raises(SystemExit, match="stitched differs from full"):
        probe.main(["--engines", str(engines), "--rounds", "1", "--compiles", "1"])


def test_nodes_lists_the_uem_and_nothing_of_the_layer(engines: Path, capsys):
    probe = _probe()
    assert probe.main(["--engines", str(engines), "--rounds", "2", "--compiles", "1", "--nodes", "layer_2"]) == 0
    out = capsys.readouterr().out
    listing = out.split("UEM node by node", 1)[1].splitlines()[1:]
    types = {line.split()[0] for line in listing if line.strip()}
    # the UEM's product and mean; the layer's own LayerNorm (MVN) and attention are not the UEM's
    assert {"Slice", "FullyConnected", "ReduceMean"} <= types
    assert "MVN" not in types and "Transpose" not in types


def test_nodes_refuses_a_segment_that_is_not_a_layer(engines: Path):
    with pytest.raises(SystemExit) as e:
        _probe().main(["--engines", str(engines), "--rounds", "1", "--compiles", "1", "--nodes", "stem"])
    assert e.value.code == 2


def _head_probe():
    spec = importlib.util.spec_from_file_location("head_conv_probe", SCRIPT.parent / "head_conv_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_probe_times_both_forms_at_each_batch(tiny_checkpoint: Path, capsys):
    assert _head_probe().main(["--checkpoint", str(tiny_checkpoint), "--batches", "1", "3", "--rounds", "2"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line][1:]
    assert [int(r[0]) for r in rows] == [1, 3]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[-1]) <= 1e-5 for r in rows)


def test_head_probe_refuses_forms_that_differ(tiny_checkpoint: Path, monkeypatch):
    from adadiff_export.export import segments

    monkeypatch.setattr(segments, "head", lambda model, h: model.head(h) * 1.01)
    with pytest.raises(SystemExit, match="differ"):
        _head_probe().main(["--checkpoint", str(tiny_checkpoint), "--batches", "1", "--rounds", "1"])
