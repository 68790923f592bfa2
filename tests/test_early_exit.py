"""The reference early exit against an independent per-layer computation of the rule."""
from __future__ import annotations

from typing import List

import pytest
import torch

from adadiff_export.model.schedule import VPSchedule
from adadiff_export.sampling.early_exit import FULL_DEPTH, EarlyExitDenoiser, ExitPolicy, early_exit
from adadiff_export.sampling.exit_settings import TimeTable, step_bounds
from adadiff_export.sampling.samplers import guided, sample

from conftest import tiny_model

B = 8


@pytest.fixture(scope="module")
def spread():
    """A tiny model whose per-sample uncertainties differ a lot, inputs, and every layer's outputs."""
    model = tiny_model(seed=0, uem_gain=20.0)
    c = model.config
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    y = torch.randint(0, c.num_classes, (B,), generator=g)
    with torch.no_grad():
        outs = model.forward_all_layers(x, t, y)
    u = torch.stack([m.mean(dim=(1, 2, 3)) for m in outs.u_maps], dim=1)  # [B, N]
    return model, x, t, y, outs.eps_layers, u


def _first_exit(below: List[bool], patience: int) -> int:
    """1-based exit layer for a per-layer 'below threshold' list (the last layer always exits)."""
    run = 0
    for i, b in enumerate(below[:-1]):
        run = run + 1 if b else 0
        if run >= patience:
            return i + 1
    return len(below)


def _threshold_with_mixed_exits(u: torch.Tensor) -> float:
    """A threshold at which the samples of the batch exit at several different layers."""
    for q in (0.5, 0.4, 0.6, 0.3, 0.7):
        thr = float(torch.quantile(u[:, :-1].flatten(), q))
        layers = {_first_exit((u[j] < thr).tolist(), 1) for j in range(u.shape[0])}
        if len(layers) >= 3:
            return thr
    raise AssertionError("fixture does not spread exits; raise uem_gain")


def test_threshold_zero_and_static_zero_are_full_depth(spread):
    model, x, t, y, eps, _ = spread
    with torch.no_grad():
        full = model(x, t, y)
    for policy in (ExitPolicy("uem", threshold=0.0), FULL_DEPTH, ExitPolicy("saturation", threshold=0.0),
                   ExitPolicy("uem", threshold=0.0, granularity="batch")):
        r = early_exit(model, x, t, y, policy)
        assert r.exit_layer.tolist() == [model.depth] * B, policy
        torch.testing.assert_close(r.eps, full)


@pytest.mark.parametrize("layer", [1, 3, 5])
def test_static_exits_every_sample_at_its_layer(spread, layer):
    model, x, t, y, eps, _ = spread
    r = early_exit(model, x, t, y, ExitPolicy("static", layer=layer))
    assert r.exit_layer.tolist() == [layer] * B
    torch.testing.assert_close(r.eps, eps[layer - 1])
    assert torch.isnan(r.u).all()  # static computes no uncertainty


@pytest.mark.parametrize("patience", [1, 2])
def test_uem_per_sample_exits_follow_the_rule(spread, patience):
    model, x, t, y, eps, u = spread
    thr = _threshold_with_mixed_exits(u)
    r = early_exit(model, x, t, y, ExitPolicy("uem", threshold=thr, patience=patience))
    expect = [_first_exit((u[j] < thr).tolist(), patience) for j in range(B)]
    assert r.exit_layer.tolist() == expect
    if patience == 1:
        assert len(set(expect)) >= 3  # the batch really mixes exit layers
    for j in range(B):
        torch.testing.assert_close(r.eps[j], eps[expect[j] - 1][j], atol=1e-5, rtol=1e-5)
        k = min(expect[j], model.depth - 1)  # the last layer always exits: no UEM there
        torch.testing.assert_close(r.u[j, :k], u[j, :k], atol=1e-6, rtol=1e-5)  # u of every layer it ran
        assert torch.isnan(r.u[j, k:]).all()  # nothing computed after its exit


def test_compaction_equals_running_each_sample_alone(spread):
    model, x, t, y, _, u = spread
    policy = ExitPolicy("uem", threshold=_threshold_with_mixed_exits(u))
    r = early_exit(model, x, t, y, policy)
    for j in range(B):
        alone = early_exit(model, x[j:j + 1], t[j:j + 1], y[j:j + 1], policy)
        assert int(alone.exit_layer) == int(r.exit_layer[j])
        torch.testing.assert_close(alone.eps[0], r.eps[j], atol=1e-5, rtol=1e-5)


def test_batch_granularity_uses_the_batch_mean(spread):
    model, x, t, y, eps, u = spread
    thr = float(u[:, :-1].mean(dim=0).median())
    r = early_exit(model, x, t, y, ExitPolicy("uem", threshold=thr, granularity="batch"))
    layer = _first_exit((u.mean(dim=0) < thr).tolist(), 1)
    assert 1 <= layer < model.depth
    assert r.exit_layer.tolist() == [layer] * B
    torch.testing.assert_close(r.eps, eps[layer - 1], atol=1e-5, rtol=1e-5)


def _authors_exit(batch_u: List[float], thr: float) -> int:
    """The AdaDiff code's rule on the batch means: in blocks at the second trigger, later blocks at the first."""
    k = (len(batch_u) - 1) // 2
    triggers = 0
    for i, v in enumerate(batch_u[:-1]):
        trig = v < thr
        triggers += trig and i < k
        if (i < k and triggers >= 2) or (i >= k and trig):
            return i + 1
    return len(batch_u)


def test_uem_authors_follows_the_authors_rule(spread):
    model, x, t, y, eps, u = spread
    means = u.mean(dim=0)
    seen = set()
    for thr in sorted(float(v) + 1e-4 for v in means[:-1]):
        r = early_exit(model, x, t, y, ExitPolicy("uem-authors", threshold=thr, granularity="batch"))
        layer = _authors_exit(means.tolist(), thr)
        assert r.exit_layer.tolist() == [layer] * B, thr
        torch.testing.assert_close(r.eps, eps[layer - 1], atol=1e-5, rtol=1e-5)
        seen.add(layer)
    assert len(seen) >= 2
    # groups: each half of the rows decides on its own mean, as two calls would
    thr = float(means[:-1].median())
    r = early_exit(model, x, t, y, ExitPolicy("uem-authors", threshold=thr, granularity="batch"), groups=2)
    h = B // 2
    assert r.exit_layer.tolist() == ([_authors_exit(u[:h].mean(dim=0).tolist(), thr)] * h
                                     + [_authors_exit(u[h:].mean(dim=0).tolist(), thr)] * h)


def test_saturation_exits_when_the_hidden_state_stops_changing(spread):
    model, x, t, y, eps, _ = spread
    hs: List[torch.Tensor] = []
    with torch.no_grad():
        h0, _ = model.stem(x, t, y)
        model.run_layers(h0, lambda i, h: hs.append(h))
    prev = [h0] + hs[:-1]
    change = torch.stack([(h - p).flatten(1).norm(dim=1) / p.flatten(1).norm(dim=1) for h, p in zip(hs, prev)], dim=1)
    thr = float(change[:, :-1].median())
    r = early_exit(model, x, t, y, ExitPolicy("saturation", threshold=thr))
    expect = [_first_exit((change[j] < thr).tolist(), 1) for j in range(B)]
    assert r.exit_layer.tolist() == expect
    assert len(set(expect)) >= 2
    for j in range(B):
        torch.testing.assert_close(r.eps[j], eps[expect[j] - 1][j], atol=1e-5, rtol=1e-5)


def test_threshold_one_exits_after_the_first_layer(spread):
    model, x, t, y, eps, _ = spread
    r = early_exit(model, x, t, y, ExitPolicy("uem", threshold=1.0))
    assert r.exit_layer.tolist() == [1] * B
    torch.testing.assert_close(r.eps, eps[0], atol=1e-5, rtol=1e-5)


def test_policy_validation():
    for bad in (dict(kind="other"), dict(granularity="row"), dict(threshold=1.5), dict(patience=0),
                dict(kind="static", layer=-1), dict(kind="saturation", threshold=-0.1)):
        with pytest.raises(ValueError):
            ExitPolicy(**bad)


def test_denoiser_records_layers_under_guidance(spread):
    model, x, _, y, _, u = spread
    den = EarlyExitDenoiser(model, ExitPolicy("uem", threshold=_threshold_with_mixed_exits(u)))
    out = sample("dpm++", guided(den, 2.0, model.config.num_classes), x.clone(), VPSchedule(), 4, y=y)
    assert out.shape == x.shape
    lbs = den.layers_by_step()
    assert lbs.shape == (4, 2 * B)  # both halves of classifier-free guidance
    assert den.mean_layers() == pytest.approx(float(lbs.float().mean()))
    assert 1 <= int(lbs.min()) and int(lbs.max()) <= model.depth
    assert den.with_policy(FULL_DEPTH).history == []


def _bins_of(t: torch.Tensor, bounds) -> List[int]:
    return [sum(1 for b in bounds if float(v) < b) for v in t]


def test_schedule_exits_each_sample_at_its_bins_layer(spread):
    model, x, t, y, eps, _ = spread
    bounds, layers = (0.6, 0.3), (1, 3, 4)
    r = early_exit(model, x, t, y, ExitPolicy("schedule", table=TimeTable.schedule(bounds, layers)))
    expect = [layers[k] for k in _bins_of(t, bounds)]
    assert r.exit_layer.tolist() == expect and len(set(expect)) >= 2
    for j in range(B):
        torch.testing.assert_close(r.eps[j], eps[expect[j] - 1][j], atol=1e-5, rtol=1e-5)
    assert torch.isnan(r.u).all()  # a schedule computes no uncertainty


def test_uem_time_follows_each_bins_range_and_threshold(spread):
    model, x, t, y, eps, u = spread
    bounds, lows, highs = (0.5,), (2, 1), (4, 3)
    taus = (float(torch.quantile(u[:, 1:3].flatten(), 0.5)), float(torch.quantile(u[:, 0:2].flatten(), 0.5)))
    table = TimeTable(bounds, lows, highs, taus)
    r = early_exit(model, x, t, y, ExitPolicy("uem-time", table=table))
    expect = []
    for j, k in enumerate(_bins_of(t, bounds)):
        below = [lows[k] <= i + 1 and float(u[j, i]) < taus[k] for i in range(model.depth)]
        expect.append(min(_first_exit(below, 1), highs[k]))
    assert r.exit_layer.tolist() == expect
    for j in range(B):
        torch.testing.assert_close(r.eps[j], eps[expect[j] - 1][j], atol=1e-5, rtol=1e-5)


def test_a_one_bin_uem_time_table_is_the_paper_rule(spread):
    """min layer 1, max layer N, one threshold: uem-time is exactly the paper's uem."""
    model, x, t, y, _, u = spread
    thr = _threshold_with_mixed_exits(u)
    a = early_exit(model, x, t, y, ExitPolicy("uem", threshold=thr))
    b = early_exit(model, x, t, y, ExitPolicy("uem-time", table=TimeTable((), (1,), (model.depth,), (thr,))))
    assert a.exit_layer.tolist() == b.exit_layer.tolist()
    torch.testing.assert_close(a.eps, b.eps)


def test_table_policy_validation():
    sched = TimeTable.schedule((0.5,), (1, 2))
    uemt = TimeTable((0.5,), (1, 1), (2, 3), (0.1, 0.2))
    for bad in (dict(kind="schedule"), dict(kind="uem-time"), dict(kind="schedule", table=uemt),
                dict(kind="uem-time", table=sched), dict(kind="uem", table=sched),
                dict(kind="uem-time", table=uemt, granularity="batch")):
        with pytest.raises(ValueError):
            ExitPolicy(**bad)
    with pytest.raises(ValueError, match="1 <= min <= max <= 5"):
        early_exit(tiny_model(), torch.zeros(1, 1, 8, 8), torch.ones(1) * 0.5, torch.zeros(1, dtype=torch.int64),
                   ExitPolicy("schedule", table=TimeTable.schedule((0.5,), (1, 9))))


def test_time_table_round_trip_and_bins():
    t = TimeTable((0.7, 0.2), (1, 2, 3), (2, 4, 5), (0.1, 0.2, 0.3))
    assert TimeTable.from_dict(t.to_dict()) == t
    s = TimeTable.schedule((0.5,), (2, 4))
    assert s.to_dict() == {"t_bounds": [0.5], "layers": [2, 4]} and TimeTable.from_dict(s.to_dict()) == s
    assert [t.bin_of(v) for v in (1.0, 0.7, 0.69, 0.2, 0.1)] == [0, 0, 1, 1, 2]
    assert step_bounds([1.0, 0.8, 0.6, 0.4], 2) == (0.7,)
    with pytest.raises(ValueError, match="malformed"):
        TimeTable.from_dict({"layers": [1]})
