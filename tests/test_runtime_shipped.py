"""adadiff_rt (OpenVINO, fp32) against the PyTorch oracle on the SHIPPED checkpoint.

Issue 4's acceptance: the same exit layer for every sample and eps within 1e-4 relative, for the
uem and static policies, both granularities, batches 1, 7 and 64 (max_batch), including batches
whose samples exit at different layers; and `sample` against the Python samplers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_export.model import checkpoint as ckpt
from adadiff_export.sampling.early_exit import EarlyExitDenoiser, ExitPolicy
from adadiff_export.sampling.generate import default_threshold
from adadiff_export.sampling.samplers import guided, sample as py_sample
from runtime_engines import import_runtime, TOL, assert_parity, inputs, mixed_threshold, onnx_engines, rel_err

adadiff_rt = import_runtime(need_openvino=True)

MAX_BATCH = 64


@pytest.fixture(scope="module")
def shipped():
    return ckpt.load()


@pytest.fixture(scope="module")
def model(shipped):
    return shipped.model


@pytest.fixture(scope="module")
def rt(request, model) -> "adadiff_rt.Runtime":
    folder: Path = onnx_engines(request.config.cache.mkdir("adadiff_rt_shipped_engines"), model, MAX_BATCH)
    return adadiff_rt.Runtime(str(folder), threads=2)


@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_uem_matches_oracle(rt, shipped, model, batch, granularity):
    x, t, y = inputs(model, batch, seed=batch)
    thr = mixed_threshold(model, x, t, y, granularity) if batch > 1 else default_threshold(shipped)
    layers = assert_parity(rt, model, x, t, y, threshold=thr, granularity=granularity)
    if batch > 1 and granularity == "sample":
        assert len(np.unique(layers)) >= 2, "the batch should exit at different layers"


@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_static_matches_oracle(rt, model, batch, granularity):
    x, t, y = inputs(model, batch, seed=100 + batch)
    assert_parity(rt, model, x, t, y, policy="static", static_layer=7, granularity=granularity)


def test_sample_matches_python_sampler(rt, shipped):
    model, schedule = shipped.model, shipped.schedule
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 1, 28, 28, generator=g)
    y = torch.tensor([0, 1, 7, 9])
    thr = default_threshold(shipped)
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler="dpm++", steps=8, guidance=2.0, threshold=thr)
    den = EarlyExitDenoiser(model, ExitPolicy(threshold=thr))
    ref = py_sample("dpm++", guided(den, 2.0, model.config.num_classes), noise.clone(), schedule, 8, y=y)
    np.testing.assert_array_equal(used, den.layers_by_step().numpy())
    assert rel_err(images, ref.numpy()) <= TOL
