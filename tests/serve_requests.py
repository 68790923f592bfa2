"""Requests for the served models and the check that a served answer equals the local runtime's (shared by
tests/test_serve_handlers.py, which calls the batch handlers directly, and tests/test_serve.py, which goes through
a real server)."""
from __future__ import annotations

import numpy as np
import pytest

from adadiff_export.serve.handlers import mean_layers
from adadiff_export.serve.protocol import MAX_STEPS
from runtime_engines import MAX_BATCH, rel_err

SERVED_TOL = 1e-5        # served image against the local Runtime's: max |a - b| / max |b|
STEPS = 12               # short sampling runs keep the suite quick; the default (50) is used by one request


def noise(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 8, 8), dtype=np.float32)


def sample_request(seed: int, label, batch: int = 1, **params) -> dict:
    """An adadiff_sample request: noise, label and the optional [b, 1] parameters given (threshold, steps, guidance)."""
    r = {"noise": noise(seed, batch), "label": np.full((batch, 1), label, np.int64)}
    dtypes = {"threshold": np.float32, "steps": np.int32, "guidance": np.float32}
    r.update({k: np.full((batch, 1), v, dtypes[k]) for k, v in params.items() if v is not None})
    return r


def local_sample(rt, request: dict, row: int):
    """What `Runtime.sample` gives for one row of a request on its own: (image [C,H,W], mean layers)."""
    kw = {}
    if "threshold" in request:
        kw = {"policy": "uem", "threshold": float(request["threshold"][row, 0])}
    steps = int(request["steps"][row, 0]) if "steps" in request else None
    guidance = float(request["guidance"][row, 0]) if "guidance" in request else None
    images, layers = rt.sample(request["noise"][row:row + 1], request["label"][row:row + 1, 0], steps=steps,
                               guidance=guidance, granularity="sample", **kw)
    return images[0], float(mean_layers(layers, 1)[0])


def assert_served_equals_local(rt, request: dict, out: dict) -> None:
    for row in range(request["noise"].shape[0]):
        image, layers = local_sample(rt, request, row)
        assert rel_err(out["image"][row], image) <= SERVED_TOL
        assert float(out["layers"][row, 0]) == pytest.approx(layers, abs=1e-6)


def mixed_requests():
    """Requests whose rows differ in every parameter: the default policy, full depth, uem thresholds, steps,
    guidance, the null class, and a request of 3 rows."""
    return [sample_request(0, 3, steps=STEPS), sample_request(1, 7, steps=STEPS, threshold=0.0),
            sample_request(2, 1, steps=STEPS, threshold=0.7), sample_request(3, 10, steps=STEPS),
            sample_request(4, 5, batch=3, steps=STEPS), sample_request(5, 2, steps=STEPS + 3),
            sample_request(6, 4, steps=STEPS, guidance=1.0), sample_request(7, 9, steps=STEPS, guidance=3.5),
            sample_request(8, 0, steps=STEPS, threshold=0.7)]


BAD_VALUES = {  # name -> (request change, tensor named, words of the rule)
    "label out of range": ({"label": np.array([[11]], np.int64)}, "label", "outside 0..10"),
    "negative label": ({"label": np.array([[-1]], np.int64)}, "label", "outside 0..10"),
    "NaN in noise": ({"noise": np.full((1, 1, 8, 8), np.nan, np.float32)}, "noise", "NaN or Inf"),
    "threshold above 1": ({"threshold": np.array([[1.5]], np.float32)}, "threshold", "outside [0, 1]"),
    "negative threshold": ({"threshold": np.array([[-0.1]], np.float32)}, "threshold", "outside [0, 1]"),
    "NaN threshold": ({"threshold": np.array([[np.nan]], np.float32)}, "threshold", "outside [0, 1]"),
    "zero steps": ({"steps": np.array([[0]], np.int32)}, "steps", f"outside 1..{MAX_STEPS}"),
    "too many steps": ({"steps": np.array([[MAX_STEPS + 1]], np.int32)}, "steps", f"outside 1..{MAX_STEPS}"),
    "negative guidance": ({"guidance": np.array([[-1.0]], np.float32)}, "guidance", "finite number >= 0"),
}
BAD_STRUCTURE = {  # what Triton refuses before the model sees it; the handler refuses it too
    "wrong shape": ({"noise": np.zeros((1, 1, 7, 8), np.float32)}, "noise", "shape"),
    "wrong dtype": ({"noise": np.zeros((1, 1, 8, 8), np.float64)}, "noise", "float32"),
    "batch above the limit": ({"noise": np.zeros((MAX_BATCH + 1, 1, 8, 8), np.float32),
                               "label": np.zeros((MAX_BATCH + 1, 1), np.int64),
                               "steps": np.full((MAX_BATCH + 1, 1), STEPS, np.int32)}, "noise", f"1..{MAX_BATCH}"),
}


