"""The serving batch handlers without a server: one dynamic batch of mixed requests against each request run
alone by the local Runtime, bad requests answered alone, the request checks, and the engines folder's default
exit policy for a request without a threshold (whatever that policy is)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from adadiff_export.serve.handlers import DenoiseHandler, SampleHandler, mean_layers
from adadiff_export.serve.protocol import ModelFacts, RequestError, parse_sample
from runtime_engines import import_runtime, rel_err
from runtime_engines import engines, model  # noqa: F401 (module fixtures)
from serve_requests import BAD_STRUCTURE, BAD_VALUES, SERVED_TOL, STEPS, assert_served_equals_local, \
    mixed_requests, noise, sample_request

adadiff_rt = import_runtime(need_openvino=True)


@pytest.fixture(scope="module")
def rt(engines):
    return adadiff_rt.Runtime(str(engines), threads=1)


@pytest.fixture(scope="module")
def facts(rt):
    return ModelFacts.of(rt)


def test_a_batch_of_mixed_requests_equals_each_request_alone(rt):
    requests = mixed_requests()
    results = SampleHandler(rt)(requests)
    layers = []
    for request, out in zip(requests, results):
        assert not isinstance(out, RequestError), out
        assert out["image"].shape == request["noise"].shape and out["layers"].shape == (request["noise"].shape[0], 1)
        assert out["image"].dtype == np.float32 and out["layers"].dtype == np.float32
        assert_served_equals_local(rt, request, out)
        layers += out["layers"].ravel().tolist()
    assert len(set(layers)) > 2  # rows of one batch left at different layers


def test_a_bad_request_is_answered_alone_and_the_rest_of_the_batch_runs(rt):
    good = sample_request(11, 3, steps=STEPS)
    results = SampleHandler(rt)([sample_request(10, 42, steps=STEPS), good, sample_request(12, 3, threshold=2.0)])
    assert isinstance(results[0], RequestError) and results[0].tensor == "label"
    assert isinstance(results[2], RequestError) and results[2].tensor == "threshold"
    assert_served_equals_local(rt, good, results[1])


def test_denoise_handler_equals_runtime_denoise(rt):
    x, t, y = noise(20, 5), np.linspace(0.05, 0.95, 5, dtype=np.float32), np.array([0, 3, 10, 7, 1])
    plain = {"x": x[:3], "t": t[:3, None], "label": y[:3, None]}
    with_threshold = {"x": x[3:], "t": t[3:, None], "label": y[3:, None], "threshold": np.full((2, 1), 0.7, np.float32)}
    out = DenoiseHandler(rt)([plain, with_threshold])
    eps, layer, _ = rt.denoise(x[:3], t[:3], y[:3], granularity="sample")
    assert rel_err(out[0]["eps"], eps) <= SERVED_TOL and (out[0]["exit_layer"][:, 0] == layer).all()
    eps, layer, _ = rt.denoise(x[3:], t[3:], y[3:], policy="uem", threshold=float(np.float32(0.7)), granularity="sample")
    assert rel_err(out[1]["eps"], eps) <= SERVED_TOL and (out[1]["exit_layer"][:, 0] == layer).all()



@pytest.mark.parametrize("case", sorted({**BAD_VALUES, **BAD_STRUCTURE}))
def test_parse_names_the_tensor_and_the_rule(case, facts):
    change, tensor, words = {**BAD_VALUES, **BAD_STRUCTURE}[case]
    with pytest.raises(RequestError) as e:
        parse_sample({**sample_request(0, 3), **change}, facts)
    assert e.value.tensor == tensor and words in str(e.value)


def test_a_request_without_threshold_takes_the_manifest_default_policy(engines, tmp_path):
    """The default is the engines folder's, not uem's: here a schedule (layer 1 at high noise, 3 later)."""
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder, ignore=shutil.ignore_patterns("openvino_cache"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["exit"].update(policy="schedule", schedule={"t_bounds": [0.5], "layers": [1, 3]})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rt = adadiff_rt.Runtime(str(folder), threads=1, cache_dir="")
    request = sample_request(90, 4, batch=2, steps=STEPS)
    out = SampleHandler(rt)([request, sample_request(91, 4, steps=STEPS, threshold=0.0)])
    images, layers = rt.sample(request["noise"], request["label"][:, 0], steps=STEPS, policy="schedule",
                               table={"t_bounds": [0.5], "layers": [1, 3]}, granularity="sample")
    assert rel_err(out[0]["image"], images) <= SERVED_TOL
    np.testing.assert_allclose(out[0]["layers"][:, 0], mean_layers(layers, 2), atol=1e-6)
    assert 1.0 < float(out[0]["layers"][0, 0]) < 3.0           # the schedule's layers, not uem's
    assert float(out[1]["layers"][0, 0]) == rt.depth           # threshold 0 is full depth


def test_served_max_batch_is_checked_before_the_server_starts(engines, facts, capsys):
    """--max-batch caps what Triton batches and accepts; a negative one or one the engines cannot hold is refused
    with the flag named, the first by the command line before any re-exec or Triton start."""
    from adadiff_export.cli import main
    from adadiff_export.serve.server import ServeError, ServeOptions

    assert ServeOptions(engines=engines).batch_limit(facts.max_batch) == facts.max_batch
    assert ServeOptions(engines=engines, max_batch=4).batch_limit(facts.max_batch) == 4
    with pytest.raises(ServeError, match="--max-batch 99 is above the engines' max batch"):
        ServeOptions(engines=engines, max_batch=99).batch_limit(facts.max_batch)
    assert main(["serve", str(engines), "--max-batch", "-1"]) == 2
    assert "--max-batch must be >= 0" in capsys.readouterr().err
