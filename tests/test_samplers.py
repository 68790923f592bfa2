"""Samplers against cases with a known answer: the exact eps of a one-point and a Gaussian data set."""
from __future__ import annotations

import pytest
import torch

from adadiff_export.model.schedule import VPSchedule
from adadiff_export.sampling.samplers import SAMPLERS, guided, sample, time_grid

SCHEDULE = VPSchedule()
STEPS = {"dpm++": 25, "ddim": 50, "euler": 1000}  # few steps suffice for the exact one-point eps


def point_eps(x0: torch.Tensor):
    """Exact eps for data that is the single point x0: eps = (x - alpha x0) / sigma."""
    def fn(x, t, y):
        a = SCHEDULE.alpha(t.double()).view(-1, 1, 1, 1).to(x.dtype)
        s = SCHEDULE.sigma(t.double()).view(-1, 1, 1, 1).to(x.dtype)
        return (x - a * x0) / s
    return fn


def gaussian_eps(m: float, sd: float):
    """Exact E[eps | x_t] for data ~ N(m, sd^2) per pixel: sigma (x - alpha m) / (alpha^2 sd^2 + sigma^2)."""
    def fn(x, t, y):
        a = SCHEDULE.alpha(t.double()).view(-1, 1, 1, 1)
        s = SCHEDULE.sigma(t.double()).view(-1, 1, 1, 1)
        return (s * (x.double() - a * m) / (a * a * sd * sd + s * s)).to(x.dtype)
    return fn


def test_time_grid():
    ts = time_grid(SCHEDULE, 4)
    assert ts.shape == (5,) and float(ts[0]) == 1.0 and float(ts[-1]) == pytest.approx(SCHEDULE.t_eps)
    with pytest.raises(ValueError):
        time_grid(SCHEDULE, 0)


def test_time_grid_spacing():
    lam = torch.tensor([SCHEDULE.lambda_(float(t)) for t in time_grid(SCHEDULE, 10)], dtype=torch.float64)
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), rtol=1e-9)
    ts = time_grid(SCHEDULE, 10, "uniform")
    assert torch.allclose(ts.diff(), ts.diff()[0].expand(10), rtol=1e-9)
    with pytest.raises(ValueError):
        time_grid(SCHEDULE, 10, "cosine")


def test_schedule_lambda_inverse():
    for t in (0.01, 0.3, 0.9):
        assert SCHEDULE.t_of_lambda(SCHEDULE.lambda_(t)) == pytest.approx(t, rel=1e-9)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_single_point_data_lands_on_the_exact_ode_solution(name):
    # With the exact eps of one-point data, the x0 prediction is x0 at every step, and both
    # deterministic samplers integrate the probability-flow ODE exactly: the output is
    # alpha(t_eps) x0 + sigma(t_eps) eps_1, with eps_1 the noise direction at t = 1 (final_x0=False);
    # by default the last step returns its x0 prediction, which is x0 itself.
    x0 = torch.tensor([0.5, -0.25, 0.0, 0.75]).view(1, 1, 2, 2).double()
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(name, point_eps(x0), noise.clone(), SCHEDULE, STEPS[name], final_x0=False)
    eps1 = (noise - SCHEDULE.alpha(1.0) * x0) / SCHEDULE.sigma(1.0)
    exact = SCHEDULE.alpha(SCHEDULE.t_eps) * x0 + SCHEDULE.sigma(SCHEDULE.t_eps) * eps1
    assert (out - exact).abs().max() < 1e-9, name
    assert (out - x0).abs().max() < 5 * SCHEDULE.sigma(SCHEDULE.t_eps)
    default = sample(name, point_eps(x0), noise.clone(), SCHEDULE, STEPS[name])
    assert (default - x0.expand_as(default)).abs().max() < 1e-9, name


@pytest.mark.parametrize("name,kw", [("euler", {}), ("ddim", {"eta": 1.0})])
def test_single_point_data_stochastic_samplers(name, kw):
    x0 = torch.tensor([0.5, -0.25, 0.0, 0.75]).view(1, 1, 2, 2).double()
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(name, point_eps(x0), noise, SCHEDULE, STEPS[name], generator=torch.Generator().manual_seed(1), **kw)
    assert (out - x0).abs().max() < 0.05, name
    assert float((out - x0).abs().mean()) < 0.02, name


@pytest.mark.parametrize("name,steps,kw", [("ddim", 1000, {}), ("dpm++", 200, {}), ("euler", 1000, {}),
                                           ("ddim", 1000, {"eta": 1.0})])
def test_gaussian_data_distribution_is_recovered(name, steps, kw):
    # Data ~ N(0.3, 0.2^2): every sampler, given the exact eps and enough steps, reproduces it.
    # The starting noise is the normal distribution's quantiles, so its moments are exact and a
    # small sample measures the sampler, not Monte Carlo error (the SDE adds its own noise).
    m, sd = 0.3, 0.2
    n = 4000
    noise = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n).view(n, 1, 1, 1)
    out = sample(name, gaussian_eps(m, sd), noise, SCHEDULE, steps, generator=torch.Generator().manual_seed(1), **kw)
    tol = 0.004 if name == "dpm++" or not kw and name == "ddim" else 0.01
    assert float(out.mean()) == pytest.approx(m, abs=tol), name
    assert float(out.std()) == pytest.approx(sd, abs=tol), name


def test_guidance_combines_conditional_and_unconditional():
    def den(x, t, y):
        return y.double().view(-1, 1, 1, 1).expand_as(x)  # eps = class index: uncond (null=10) -> 10

    x = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    y = torch.tensor([2, 4])
    out = guided(den, 3.0, 10)(x, torch.ones(2), y)
    # uncond + w (cond - uncond) = 10 + 3 (y - 10)
    assert out.flatten().tolist() == [10 + 3 * (2 - 10), 10 + 3 * (4 - 10)]
    assert guided(den, 1.0, 10) is den
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("heun", den, x, SCHEDULE, 2)


@pytest.mark.parametrize("name", ["dpm++", "ddim", "euler"])
def test_final_x0_returns_the_last_steps_data_prediction(name):
    """final_x0: the same run up to the last step, which returns (x - sigma eps) / alpha at that step's time."""
    from adadiff_export.sampling.samplers import time_grid

    schedule = VPSchedule()
    seen = []

    def denoiser(x, t, y):  # the exact noise of data that is the constant 0.2
        seen.append((x.clone(), float(t[0])))
        return (x - schedule.alpha(t[0]) * 0.2) / schedule.sigma(t[0])

    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](denoiser, x.clone(), schedule, 6, generator=torch.Generator().manual_seed(1), final_x0=True)
    xl, tl = seen[-1]
    spacing = "uniform" if name == "euler" else "logsnr"
    assert tl == pytest.approx(float(time_grid(schedule, 6, spacing)[-2]))
    eps = (xl - schedule.alpha(tl) * 0.2) / schedule.sigma(tl)
    x0 = (xl - schedule.sigma(tl) * eps) / schedule.alpha(tl)
    torch.testing.assert_close(out, x0.clamp(-1, 1))
    torch.testing.assert_close(out, torch.full_like(out, 0.2), atol=1e-4, rtol=0)
    plain = SAMPLERS[name](denoiser, x.clone(), schedule, 6, generator=torch.Generator().manual_seed(1),
                           final_x0=False)
    assert not torch.allclose(out, plain)
    default = SAMPLERS[name](denoiser, x.clone(), schedule, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(default, out, atol=0, rtol=0)  # final_x0 is the default
