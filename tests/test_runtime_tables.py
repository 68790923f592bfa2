"""The time-table policies (schedule, uem-time) in adadiff_rt against the PyTorch oracle, and the
manifest's exit defaults: fused and chained, rows of one batch in different time bins, the C++
sampling loop, and the errors a bad table or a folder without one gives."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from adadiff_export.model.schedule import VPSchedule
from adadiff_export.sampling.early_exit import EarlyExitDenoiser, ExitPolicy
from adadiff_export.sampling.exit_settings import TimeTable
from adadiff_export.sampling.samplers import guided, sample as py_sample
from runtime_engines import MAX_BATCH, TOL, assert_parity, import_runtime, inputs, oracle, rel_err
from runtime_engines import engines, model, rt, rt_chained  # noqa: F401 (module fixtures)

adadiff_rt = import_runtime(need_openvino=True)

# Bins over t: t >= 0.6 exits early, 0.6 > t >= 0.2 in the middle, below 0.2 late.
BOUNDS = [0.6, 0.2]
SCHEDULE = {"t_bounds": BOUNDS, "layers": [1, 3, 4]}


def spread_times(batch: int, seed: int) -> np.ndarray:
    """Times that cover every bin of BOUNDS (and fall on neither bound)."""
    g = np.random.default_rng(seed)
    t = g.uniform(0.02, 0.98, batch).astype(np.float32)
    t[: min(batch, 3)] = np.array([0.9, 0.4, 0.05], dtype=np.float32)[: min(batch, 3)]
    return t


def uem_time_table(model, x, t, y) -> dict:
    """A uem-time table whose thresholds split the rows of each bin (midpoints of the oracle's u)."""
    _, _, u = oracle(model, x, t, y, threshold=0.0)
    finite = np.sort(u[np.isfinite(u)])
    taus = [float(np.quantile(finite, q)) for q in (0.3, 0.5, 0.7)]
    return {"t_bounds": BOUNDS, "min_layers": [1, 2, 2], "max_layers": [3, 4, 5], "thresholds": taus}


@pytest.mark.parametrize("batch", [1, 2, 7, MAX_BATCH])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_schedule_matches_oracle(rt, rt_chained, model, batch, fused):
    x, _, y = inputs(model, batch, seed=50 + batch)
    t = spread_times(batch, batch)
    runtime = rt if fused else rt_chained
    layer = assert_parity(runtime, model, x, t, y, policy="schedule", table=SCHEDULE)
    table = TimeTable.from_dict(SCHEDULE)
    assert list(layer) == [table.layer_of(v) for v in t]
    if fused and batch == 1:
        assert runtime.engine_calls == 1  # one row, one layer: the fused static graph


def test_schedule_rows_in_one_bin_run_fused(rt, model):
    x, _, y = inputs(model, 7, seed=60)
    t = np.full(7, 0.4, dtype=np.float32)
    layer = assert_parity(rt, model, x, t, y, policy="schedule", table=SCHEDULE)
    assert (layer == 3).all() and rt.engine_calls == 1


@pytest.mark.parametrize("batch", [1, 2, 7, MAX_BATCH])
@pytest.mark.parametrize("fused", [True, False], ids=["exit-graph", "chained"])
def test_uem_time_matches_oracle(rt, rt_chained, model, batch, fused):
    x, _, y = inputs(model, batch, seed=70 + batch)
    t = spread_times(batch, 70 + batch)
    table = uem_time_table(model, x, t, y)
    runtime = rt if fused else rt_chained
    layer = assert_parity(runtime, model, x, t, y, policy="uem-time", table=table)
    k = np.array([TimeTable.from_dict(table).bin_of(v) for v in t])
    lo, hi = np.array(table["min_layers"])[k], np.array(table["max_layers"])[k]
    assert ((layer >= lo) & (layer <= hi)).all()
    if fused and batch <= 2:
        assert runtime.engine_calls == 1


def test_uem_time_mixes_exit_layers(rt, model):
    """A batch of one bin whose rows leave at different layers inside the bin's range."""
    x, _, y = inputs(model, MAX_BATCH, seed=80)
    t = np.full(MAX_BATCH, 0.4, dtype=np.float32)
    table = uem_time_table(model, x, t, y)
    layer = assert_parity(rt, model, x, t, y, policy="uem-time", table=table)
    assert len(np.unique(layer)) >= 2, layer


def test_uem_time_with_patience_takes_the_chain(rt, model):
    x, _, y = inputs(model, 2, seed=81)
    t = spread_times(2, 81)
    table = uem_time_table(model, x, t, y)
    layer = assert_parity(rt, model, x, t, y, policy="uem-time", table=table, patience=2)
    assert rt.engine_calls >= 2 + layer.max()


@pytest.mark.parametrize("policy,table", [("schedule", SCHEDULE), ("uem-time", None)])
def test_table_policies_in_the_sampling_loop(rt, model, policy, table):
    """The C++ sampler with a time table: the oracle's layers by step and its images."""
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(90))
    y = torch.tensor([1, 4, 9])
    if table is None:
        x, _, yy = inputs(model, 4, seed=91)
        table = uem_time_table(model, x, spread_times(4, 91), yy)
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler="dpm++", steps=6, guidance=2.0, policy=policy,
                             table=table)
    den = EarlyExitDenoiser(model, ExitPolicy(policy, table=TimeTable.from_dict(table)))
    ref = py_sample("dpm++", guided(den, 2.0, model.config.num_classes), noise.clone(), VPSchedule(), 6, y=y)
    np.testing.assert_array_equal(used, den.layers_by_step().numpy())
    assert rel_err(images, ref.numpy()) <= TOL
    assert len(np.unique(used.mean(axis=1))) >= 2  # the steps' times fall in different bins


def test_final_x0_matches_python_samplers(rt, model):
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(92))
    y = torch.tensor([3, 7])
    for sampler in ("dpm++", "ddim"):
        images, _ = rt.sample(noise.numpy(), y.numpy(), sampler=sampler, steps=5, guidance=2.0, policy="static",
                              static_layer=0, final_x0=True)
        den = EarlyExitDenoiser(model, ExitPolicy("static"))
        ref = py_sample(sampler, guided(den, 2.0, model.config.num_classes), noise.clone(), VPSchedule(), 5, y=y,
                        final_x0=True)
        plain, _ = rt.sample(noise.numpy(), y.numpy(), sampler=sampler, steps=5, guidance=2.0, policy="static",
                             static_layer=0, final_x0=False)
        default, _ = rt.sample(noise.numpy(), y.numpy(), sampler=sampler, steps=5, guidance=2.0, policy="static",
                               static_layer=0)
        assert rel_err(images, ref.numpy()) <= TOL
        assert rel_err(images, plain) > 1e-4  # the last step changed something
        assert rel_err(default, ref.numpy()) <= TOL  # final_x0 is the default, as in the Python samplers


@pytest.mark.parametrize("table,message", [
    ({"t_bounds": [0.2, 0.6], "layers": [1, 2, 3]}, "strictly decrease"),
    ({"t_bounds": [0.5], "layers": [1, 99]}, "1 <= min <= max <= 5"),
    ({"t_bounds": [0.5], "layers": [1]}, "one value fewer than the bins"),
    ({"t_bounds": [1.5], "layers": [1, 2]}, r"lie in \(0, 1\)"),
    ({"t_bounds": [0.5], "min_layers": [1, 2], "max_layers": [2, 3], "thresholds": [0.1, 1.5]}, r"\[0, 1\]"),
])
def test_bad_tables_are_refused(rt, model, table, message):
    x, t, y = inputs(model, 2, seed=93)
    policy = "uem-time" if "thresholds" in table else "schedule"
    with pytest.raises(ValueError, match=message):
        rt.denoise(x, t, y, policy=policy, table=table)
    with pytest.raises(ValueError, match=message):
        oracle(model, x, t, y, policy=policy, table=table)


def test_table_policy_without_a_table_names_calibrate(rt, model):
    x, t, y = inputs(model, 2, seed=94)
    with pytest.raises(ValueError, match="calibrate"):
        rt.denoise(x, t, y, policy="schedule")
    with pytest.raises(ValueError, match="takes a table with t_bounds and layers"):
        rt.denoise(x, t, y, policy="schedule", table={"t_bounds": [], "min_layers": [1], "max_layers": [1],
                                                      "thresholds": [0.5]})


def _edit(folder, fn):
    p = folder / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


@pytest.fixture
def folder_copy(engines, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(engines, dst, ignore=shutil.ignore_patterns("openvino_cache"))
    return dst


def test_manifest_default_policy_and_table_are_used(folder_copy, model):
    _edit(folder_copy, lambda d: d["exit"].update(policy="schedule", schedule=SCHEDULE))
    runtime = adadiff_rt.Runtime(str(folder_copy), threads=1, cache_dir="")
    assert runtime.default_policy == "schedule"
    assert runtime.default_exit["schedule"] == SCHEDULE
    x, _, y = inputs(model, 7, seed=95)
    t = spread_times(7, 95)
    _, layer, u = runtime.denoise(x, t, y)
    _, ref_layer, _ = oracle(model, x, t, y, policy="schedule", table=SCHEDULE)
    np.testing.assert_array_equal(layer, ref_layer)
    assert np.isnan(u).all()


def test_manifest_default_static_layer_and_patience_are_used(folder_copy, model):
    _edit(folder_copy, lambda d: d["exit"].update(policy="static", layer=2))
    runtime = adadiff_rt.Runtime(str(folder_copy), threads=1, cache_dir="")
    x, t, y = inputs(model, 3, seed=96)
    assert (runtime.denoise(x, t, y)[1] == 2).all()


def test_version_1_manifest_still_loads(folder_copy, model):
    def to_v1(d):
        d["version"] = 1
        for k in ("layer", "schedule", "uem_time"):
            d["exit"].pop(k, None)
    _edit(folder_copy, to_v1)
    runtime = adadiff_rt.Runtime(str(folder_copy), threads=1, cache_dir="")
    assert runtime.default_policy == "uem" and runtime.default_exit["schedule"] is None
    from adadiff_export.export.manifest import load
    m = load(folder_copy, check=True)
    assert m.version == 1 and m.exit.schedule is None


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["exit"].update(policy="schedule"), "exit.schedule is absent"),
    (lambda d: d["exit"].update(policy="bogus"), "unknown policy"),
    (lambda d: d["exit"].update(schedule={"t_bounds": [0.5], "layers": [1, 9]}), "exit.schedule"),
])
def test_bad_exit_section_is_refused_by_runtime_and_loader(folder_copy, edit, message):
    _edit(folder_copy, edit)
    with pytest.raises(RuntimeError, match=message):
        adadiff_rt.Runtime(str(folder_copy), threads=1, cache_dir="")
    from adadiff_export.export.manifest import ManifestError, load
    with pytest.raises(ManifestError, match=message.replace("exit.schedule is absent", "schedule is absent")):
        load(folder_copy, check=False)
