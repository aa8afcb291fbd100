"""Noise schedules (fastmdm.schedules) and LinearDiffusion on them."""

from __future__ import annotations

import pytest
import torch

import fastmdm as fm
from fastmdm.noise_frame import diffusion_key
from fastmdm.schedules import LinearBeta, TabulatedTau, sigma_from_tau, tau_from_sigma


def _table(n: int = 7, seed: int = 0) -> TabulatedTau:
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(n, generator=g, dtype=torch.float64) + 0.1, 0)
    taus = torch.cumsum(torch.rand(n, generator=g, dtype=torch.float64) + 0.05, 0)
    return TabulatedTau(times, taus)


def test_tabulated_tau_interpolates_and_inverts():
    table = _table()
    torch.testing.assert_close(table.tau(table.times), table.taus, rtol=1e-15, atol=0)
    t = table.times[0] + (table.times[-1] - table.times[0]) * torch.rand(50, dtype=torch.float64)
    torch.testing.assert_close(table.tau_inverse(table.tau(t)), t, rtol=1e-13, atol=0)
    # β is the slope of τ on each segment: a central difference inside a segment matches it
    k = torch.arange(table.times.numel() - 1)
    mid = (table.times[k] + table.times[k + 1]) / 2
    h = 1e-6
    torch.testing.assert_close(table.beta(mid), (table.tau(mid + h) - table.tau(mid - h)) / (2 * h),
                               rtol=1e-7, atol=0)
    assert (table.beta(mid) > 0).all()


def test_linear_beta_is_the_default_and_keeps_every_number():
    diff = fm.vpsde()
    assert isinstance(diff.schedule, LinearBeta) and diff.beta_min == 0.1 and diff.beta_max == 10.0
    t = torch.rand(20, dtype=torch.float64)
    torch.testing.assert_close(diff.tau(t), 0.1 * t + 0.5 * 9.9 * t * t, rtol=0, atol=0)
    torch.testing.assert_close(diff.beta(t), 0.1 + 9.9 * t, rtol=0, atol=0)
    torch.testing.assert_close(diff.tau_inverse(diff.tau(t)), t, rtol=1e-14, atol=1e-16)


def test_diffusion_on_a_tabulated_schedule():
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.05, 40, dtype=torch.float64), 0)
    diff = fm.vpsde(schedule=TabulatedTau.from_alphas_cumprod(abar), t_min=0.0)
    tk = diff.transition(torch.arange(40, dtype=torch.float64) / 39)
    torch.testing.assert_close(tk.mean_coef[:, 0, 0] ** 2, abar, rtol=1e-13, atol=0)
    torch.testing.assert_close(tk.cov[:, 0, 0], 1 - abar, rtol=1e-12, atol=0)
    other = fm.vpsde(schedule=TabulatedTau.from_alphas_cumprod(abar.sqrt()), t_min=0.0)
    assert diffusion_key(diff) != diffusion_key(other)  # the plan cache tells the schedules apart
    x = fm.sample(lambda u, t: torch.zeros_like(u), diff, (3, 2), steps=4)
    assert x.shape == (3, 2) and torch.isfinite(x).all()


def test_sigma_tau_round_trip():
    sigma = torch.tensor([1e-3, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_from_tau(tau_from_sigma(sigma)), sigma, rtol=1e-14, atol=0)


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="times"):
        TabulatedTau([0.0, 0.0, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="taus"):
        TabulatedTau([0.0, 0.5, 1.0], [0.1, 0.3, 0.2])
    with pytest.raises(ValueError, match="taus"):
        TabulatedTau([0.0, 1.0], [0.0, 0.2])
    with pytest.raises(ValueError, match="same number"):
        TabulatedTau([0.0, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="alphas_cumprod"):
        TabulatedTau.from_alphas_cumprod([0.9, 0.5, 0.0])
    with pytest.raises(TypeError, match="schedule"):
        fm.vpsde(schedule="linear")
    with pytest.raises(ValueError, match="t_min"):
        fm.vpsde(t_min=0.0)  # τ(0) = 0 on the linear schedule: the data itself



class UnitRate:
    """A user's schedule with only beta, tau, tau_inverse and key: β = 1, τ = t."""

    key = ("unit",)

    def beta(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def tau(self, t):
        return torch.as_tensor(t, dtype=torch.float64)

    def tau_inverse(self, tau):
        return torch.as_tensor(tau, dtype=torch.float64)


def test_beta_min_and_max_of_any_schedule():
    """A table's β at its ends (its first and last rates); a schedule without them: a clear TypeError."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.05, 40, dtype=torch.float64), 0)
    diff = fm.vpsde(schedule=TabulatedTau.from_alphas_cumprod(abar), t_min=0.0)
    rates = (abar[:-1] / abar[1:]).log() * 39
    assert diff.beta_min == pytest.approx(float(rates[0]), rel=1e-12)
    assert diff.beta_max == pytest.approx(float(rates[-1]), rel=1e-12)
    custom = fm.vpsde(schedule=UnitRate())
    for name in ("beta_min", "beta_max"):
        with pytest.raises(TypeError, match=f"{name} is not defined for the schedule"):
            getattr(custom, name)
