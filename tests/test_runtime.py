"""adadiff_rt with OpenVINO on CPU against the PyTorch oracle (adadiff_export.sampling.early_exit / samplers).

fp32 parity: the same exit layer for every sample, eps within 1e-4 relative, u equal where computed.
The engines folder is a real build (build_engines) of a random tiny model, cached in pytest's cache.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_export.model.schedule import VPSchedule
from adadiff_export.sampling.early_exit import EarlyExitDenoiser, ExitPolicy
from adadiff_export.sampling.samplers import guided, sample as py_sample
from runtime_engines import MAX_BATCH, TOL, assert_parity, import_runtime, inputs, mixed_threshold, oracle, rel_err
from runtime_engines import engines, model, rt, rt_chained  # noqa: F401 (module fixtures)

adadiff_rt = import_runtime(need_openvino=True)


def exit_graph_runs(batch: int, granularity: str) -> bool:
    """Where the OpenVINO engine runs uem as one exit graph: whole-batch exit, or at most 2 rows."""
    return granularity == "batch" or batch <= 2


def assert_engine_calls(runtime, layer: np.ndarray, batch: int, granularity: str, fused: bool = True) -> None:
    """One engine call where the exit graph runs; otherwise the stem, one call per layer up to the
    deepest exit, and at least one head."""
    if fused and exit_graph_runs(batch, granularity):
        assert runtime.engine_calls == 1
    else:
        assert runtime.engine_calls >= 2 + layer.max()


@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("fused", [True, False], ids=["exit-graph", "chained"])
def test_uem_matches_oracle(rt, rt_chained, model, batch, granularity, fused):
    x, t, y = inputs(model, batch, seed=batch)
    thr = mixed_threshold(model, x, t, y, granularity)
    runtime = rt if fused else rt_chained
    layer = assert_parity(runtime, model, x, t, y, policy="uem", threshold=thr, granularity=granularity)
    assert_engine_calls(runtime, layer, batch, granularity, fused)


@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
def test_uem_authors_matches_oracle_chained(rt, model, batch):
    """The authors' rule (one decision for the batch, in blocks at the second trigger): the exit graph
    declines it, the chain decides as the oracle does."""
    x, t, y = inputs(model, batch, seed=30 + batch)
    _, _, u_all = oracle(model, x, t, y, threshold=0.0)
    means = np.sort(np.nanmean(u_all[:, :-1], axis=0))
    seen = set()
    for thr in (means[:-1] + means[1:]) / 2:
        layer = assert_parity(rt, model, x, t, y, policy="uem-authors", threshold=float(thr), granularity="batch")
        assert rt.engine_calls >= 2 + layer.max()
        seen.add(int(layer[0]))
    assert len(seen) >= 2, seen


@pytest.mark.parametrize("patience", [1, 2])
@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_exit_graph_two_rows(rt, rt_chained, model, patience, granularity):
    """Two rows (batch-1 sampling under guidance) in one exit graph: with granularity sample each
    row leaves at its own layer while the other runs on, with the oracle's decisions and eps."""
    x, t, y = inputs(model, 2, seed=20 + patience)
    t[:] = [0.9, 0.05]  # far apart in noise level, so their uncertainties part early
    thr = mixed_threshold(model, x, t, y, granularity, patience)
    layer = assert_parity(rt, model, x, t, y, threshold=thr, patience=patience, granularity=granularity)
    assert rt.engine_calls == 1
    if granularity == "sample":
        assert layer[0] != layer[1], f"threshold {thr} did not part the rows: {layer}"
    else:
        assert layer[0] == layer[1]
    _, chained_layer, _ = rt_chained.denoise(x, t, y, threshold=thr, patience=patience, granularity=granularity)
    np.testing.assert_array_equal(layer, chained_layer)


def test_exit_graph_threshold_is_an_input(rt, model):
    """One compiled exit graph serves every threshold: each exits where the oracle does."""
    x, t, y = inputs(model, 1, seed=30)
    _, _, u = oracle(model, x, t, y, threshold=0.0)
    thresholds = [0.0, *(np.unique(u[np.isfinite(u)]) + 1e-4), 1.0]
    layers = {int(assert_parity(rt, model, x, t, y, threshold=float(thr))[0]) for thr in thresholds}
    assert rt.engine_calls == 1
    assert len(layers) >= 3, layers


@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
@pytest.mark.parametrize("static_layer", [0, 2, 3])
@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_static_matches_oracle(rt, rt_chained, model, batch, static_layer, granularity, fused):
    x, t, y = inputs(model, batch, seed=10 + batch)
    runtime = rt if fused else rt_chained
    layer = assert_parity(runtime, model, x, t, y, policy="static", static_layer=static_layer, granularity=granularity)
    assert (layer == (static_layer or model.depth)).all()


def test_static_sample_matches_python_samplers(rt, model):
    """The fused static graph inside the C++ sampling loop, guidance doubling the rows."""
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([2, 5, 0])
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler="dpm++", steps=4, guidance=2.0, policy="static",
                             static_layer=2)
    den = EarlyExitDenoiser(model, ExitPolicy(kind="static", layer=2))
    ref = py_sample("dpm++", guided(den, 2.0, model.config.num_classes), noise.clone(), VPSchedule(), 4, y=y)
    assert (used == 2).all() and used.shape == (4, 6)
    assert rel_err(images, ref.numpy()) <= TOL


@pytest.mark.parametrize("patience", [1, 2])
def test_samples_exit_at_different_layers(rt, model, patience):
    """A batch whose samples leave at different layers (compaction of hidden, skip and temb rows)."""
    x, t, y = inputs(model, MAX_BATCH, seed=3)
    thr = mixed_threshold(model, x, t, y, "sample", patience)
    layer = assert_parity(rt, model, x, t, y, threshold=thr, patience=patience)
    assert len(np.unique(layer)) >= 3, f"threshold {thr} did not split the batch: {layer}"


def test_saturation_matches_oracle(rt, model):
    x, t, y = inputs(model, 7, seed=4)
    layer = assert_parity(rt, model, x, t, y, policy="saturation", threshold=1e9)
    assert (layer == 1).all()
    assert_parity(rt, model, x, t, y, policy="saturation", threshold=0.0)


def test_threshold_zero_is_full_depth_and_matches_full_graph(rt, model):
    x, t, y = inputs(model, 5, seed=5)
    eps, layer, _ = rt.denoise(x, t, y, threshold=0.0)
    assert (layer == model.depth).all()
    full = rt.full(x, t, y)
    ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).detach().numpy()
    assert rel_err(full, ref) <= TOL and rel_err(eps, ref) <= TOL


def test_default_threshold_comes_from_manifest(rt, model, engines):
    x, t, y = inputs(model, 7, seed=6)
    default = json.loads((engines / "manifest.json").read_text())["exit"]["threshold"]
    assert rt.default_threshold == default
    a = rt.denoise(x, t, y)
    b = rt.denoise(x, t, y, threshold=default)
    np.testing.assert_array_equal(a[1], b[1])
    # not bit for bit: a batch size's third call switches it to a static-batch compilation, whose kernels
    # may round differently from the dynamic model's (an ulp in the head's fused multiply-adds)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler,steps,guidance", [("dpm++", 6, 2.0), ("ddim", 5, 1.0), ("dpm++", 4, 1.0)])
def test_sample_matches_python_samplers(rt, model, sampler, steps, guidance):
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    y = torch.tensor([1, 4, 9])
    x, t, yy = inputs(model, 3)
    thr = 0.5
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler=sampler, steps=steps, guidance=guidance,
                             threshold=thr)
    den = EarlyExitDenoiser(model, ExitPolicy(threshold=thr))
    fn = guided(den, guidance, model.config.num_classes)
    ref = py_sample(sampler, fn, noise.clone(), VPSchedule(), steps, y=y)
    hist = den.layers_by_step().numpy()
    assert used.shape == (steps, 6 if guidance != 1 else 3)
    np.testing.assert_array_equal(used, hist)
    assert rel_err(images, ref.numpy()) <= TOL
    assert images.min() >= -1 and images.max() <= 1


def test_exit_graphs_past_the_cap_fall_back_to_the_chain(engines, model):
    """Each batch size compiles its own exit graph; past 8 of them the runtime chains the segments,
    with the same results."""
    runtime = adadiff_rt.Runtime(str(engines), threads=1)
    for batch in range(1, 11):
        x, t, y = inputs(model, batch, seed=40 + batch)
        assert_parity(runtime, model, x, t, y, threshold=0.0, granularity="batch")
        assert runtime.engine_calls == (1 if batch <= 8 else 2 + model.depth)


@pytest.mark.parametrize("patience", [1, 2])
def test_batch_one_guided_sampling_through_the_exit_graph(rt, model, patience):
    """Batch 1 under guidance is 2 rows per step (class and null class), the exit graph's per-row
    case: one engine call per step, the oracle's layers by step and its images."""
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    y = torch.tensor([3])
    steps = 8

    def reference(thr: float):
        den = EarlyExitDenoiser(model, ExitPolicy(threshold=thr, patience=patience))
        ref = py_sample("dpm++", guided(den, 2.0, model.config.num_classes), noise.clone(), VPSchedule(), steps, y=y)
        return ref.numpy(), den.layers_by_step().numpy()

    # the threshold that spreads the exits most (over steps and between the two rows)
    thr = max(np.linspace(0.02, 0.98, 25), key=lambda v: len(np.unique(reference(float(v))[1])))
    ref, ref_used = reference(float(thr))
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler="dpm++", steps=steps, guidance=2.0,
                             threshold=float(thr), patience=patience)
    assert rt.engine_calls == steps
    assert used.shape == (steps, 2) and len(np.unique(used)) >= 2, used
    np.testing.assert_array_equal(used, ref_used)
    assert rel_err(images, ref) <= TOL


def test_stochastic_samplers_are_reproducible_per_seed(rt, model):
    noise = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 3])
    a, _ = rt.sample(noise, y, sampler="euler", steps=5, guidance=1.0, seed=11)
    b, _ = rt.sample(noise, y, sampler="euler", steps=5, guidance=1.0, seed=11)
    c, _ = rt.sample(noise, y, sampler="euler", steps=5, guidance=1.0, seed=12)
    d, _ = rt.sample(noise, y, sampler="ddim", steps=5, guidance=1.0, eta=1.0, seed=11)
    e, _ = rt.sample(noise, y, sampler="ddim", steps=5, guidance=1.0, eta=0.0, seed=11)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(d, e)


@pytest.mark.parametrize("sampler,kw", [("euler", {}), ("ddim", {"eta": 1.0})])
def test_stochastic_samplers_match_python_given_the_runtime_noise(rt, model, sampler, kw):
    """samplers.CounterNormal(seed) draws adadiff_rt's normals: the same exits and images for the same seed."""
    from adadiff_export.sampling.samplers import CounterNormal

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([2, 7, 0])
    steps, thr = 6, 0.5
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler=sampler, steps=steps, guidance=2.0, threshold=thr,
                             seed=123, **kw)
    den = EarlyExitDenoiser(model, ExitPolicy(threshold=thr))
    ref = py_sample(sampler, guided(den, 2.0, model.config.num_classes), noise.clone(), VPSchedule(), steps, y=y,
                    generator=CounterNormal(123), **kw)
    np.testing.assert_array_equal(used, den.layers_by_step().numpy())
    assert rel_err(images, ref.numpy()) <= TOL


@pytest.mark.parametrize("granularity", ["sample", "batch"], ids=["chained", "exit-graph"])
def test_four_threads_each_with_a_runtime_match_one(engines, model, granularity):
    x, t, y = inputs(model, MAX_BATCH, seed=8)
    thr = mixed_threshold(model, x, t, y, granularity)
    single = adadiff_rt.Runtime(str(engines), threads=1)
    want = [single.denoise(x, t, y, threshold=thr, granularity=granularity) for _ in range(3)]
    assert_engine_calls(single, want[0][1], MAX_BATCH, granularity)
    runtimes = [adadiff_rt.Runtime(str(engines), threads=1) for _ in range(4)]
    got, errors = {}, []

    def work(i):
        try:
            got[i] = [runtimes[i].denoise(x, t, y, threshold=thr, granularity=granularity) for _ in range(3)]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i in range(4):
        for (e1, l1, u1), (e2, l2, u2) in zip(got[i], want):
            np.testing.assert_array_equal(l1, l2)
            np.testing.assert_array_equal(e1, e2)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under AddressSanitizer the allocator's quarantine grows RSS by design")
def test_ten_thousand_calls_keep_memory_flat(rt, model):
    x, t, y = inputs(model, 1, seed=9)
    for _ in range(2000):  # batch 1 runs the exit graph: OpenVINO settles its memory over the first calls
        rt.denoise(x, t, y, threshold=0.5)
    assert rt.engine_calls == 1
    before = _rss_kib()
    for _ in range(10_000):
        rt.denoise(x, t, y, threshold=0.5)
    grown = _rss_kib() - before
    assert grown < 4096, f"resident memory grew by {grown} KiB over 10,000 calls"


def test_bf16_on_request_runs_close(engines, model):
    rt = adadiff_rt.Runtime(str(engines), precision="bf16", cache_dir="")
    x, t, y = inputs(model, 4, seed=12)
    eps, _, _ = rt.denoise(x, t, y, threshold=0.0)
    ref, _, _ = oracle(model, x, t, y, threshold=0.0)
    assert rel_err(eps, ref) < 0.1


def test_compiled_model_cache(engines, tmp_path, model):
    cache = tmp_path / "ovcache"
    adadiff_rt.Runtime(str(engines), cache_dir=str(cache))
    assert cache.is_dir() and any(cache.iterdir())
    again = adadiff_rt.Runtime(str(engines), cache_dir=str(cache))
    x, t, y = inputs(model, 2)
    assert_parity(again, model, x, t, y, threshold=0.0)
