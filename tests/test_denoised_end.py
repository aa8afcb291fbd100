"""The end of sampling: ``fm.sample(denoise=True)`` (the default of most solvers) returns x̂₀ = E[x₀ | u_{t_min}], False the state."""

from __future__ import annotations

import pytest
import torch

import fastmdm as fm
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.sampling import sample

F64 = torch.float64
DIFFUSIONS = {"vpsde": fm.vpsde, "cld": fm.cld, "malda3": lambda: fm.malda(3)}


def _start(diff, batch: int, seed: int) -> torch.Tensor:
    """A float64 prior draw u_T (B, K, 3)."""
    return diff.prior_sample((batch, 3), generator=torch.Generator().manual_seed(seed), dtype=F64)


class LastState:
    """Callback keeping the last report."""

    def __call__(self, info: dict) -> None:
        self.info = info


def _gaussian() -> GaussianMixture:
    """One component: x₀ ~ N(μ, 0.3² I) in d = 3 (a non-zero mean)."""
    return GaussianMixture([1.0], torch.tensor([[0.7, -1.2, 0.4]], dtype=F64), [0.3])


@pytest.mark.parametrize("name", list(DIFFUSIONS))
@pytest.mark.parametrize("prediction", ["eps", "score", "x0"])
def test_denoised_end_is_the_exact_posterior_mean(name, prediction):
    """Gaussian data, exact model: the returned x is E[x₀ | u] at t_min of the last state, in float64."""
    diff, data = DIFFUSIONS[name](), _gaussian()
    last = LastState()
    x = sample(exact_score_model(data, diff, prediction), diff, x_T=_start(diff, 64, 0), steps=6, callback=last,
               prediction=prediction, denoise=True)
    assert x.dtype == F64 and last.info["t"] == diff.t_min
    exact = data.posterior_mean(diff, last.info["u"], diff.t_min)
    torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10)


def test_vp_denoised_end_closed_form():
    """VP: E[x₀ | x] = μ + s² α/(α² s² + σ²)(x − α μ) with α² = e^{−τ}, σ² = 1 − e^{−τ} at t_min."""
    diff, data = fm.vpsde(), _gaussian()
    last = LastState()
    x = sample(exact_score_model(data, diff), diff, x_T=_start(diff, 64, 1), steps=5, callback=last,
               solver="ancestral", generator=torch.Generator().manual_seed(1))
    tau = float(diff.tau(torch.tensor(diff.t_min, dtype=F64)))
    a2 = torch.exp(torch.tensor(-tau, dtype=F64))
    alpha, var = a2.sqrt(), 1 - a2
    mu = data.means[0]
    exact = mu + 0.09 * alpha / (a2 * 0.09 + var) * (last.info["u"][:, 0] - alpha * mu)
    torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10)


def test_denoise_false_returns_the_state():
    diff = fm.cld()
    model = exact_score_model(_gaussian(), diff)
    last = LastState()
    state = sample(model, diff, (8, 3), steps=4, denoise=False, callback=last,
                   generator=torch.Generator().manual_seed(2))
    assert torch.equal(state, last.info["u"][:, 0])
    denoised = sample(model, diff, (8, 3), steps=4, denoise=True, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(state, denoised)  # the same run, one Tweedie step apart


@pytest.mark.parametrize("solver,options,per_step", [
    ("ei-ode", {}, 1), ("ancestral", {}, 1), ("euler-maruyama", {}, 1), ("sscs", {}, 1), ("heun", {}, 2),
    ("ancestral", {"corrector": "langevin", "corrector_steps": 2}, 3),
])
@pytest.mark.parametrize("denoise", [True, False])
def test_nfe_is_steps_times_per_step_plus_one(solver, options, per_step, denoise):
    """NFE = steps × NFE per step (+ corrector calls) + 1 with denoise; the callback's "nfe" leaves out
    the denoising call."""
    diff = fm.vpsde()
    exact = exact_score_model(_gaussian(), diff)
    calls = []

    def model(u, t):
        calls.append(t)
        return exact(u, t)

    last = LastState()
    sample(model, diff, x_T=_start(diff, 4, 3), steps=5, solver=solver, denoise=denoise, callback=last,
           generator=torch.Generator().manual_seed(3), **options)
    assert len(calls) == 5 * per_step + denoise
    assert last.info["nfe"] == 5 * per_step
    if denoise:
        assert float(calls[-1][0]) == pytest.approx(diff.t_min, rel=1e-12)


def _calls_of_default_end(name: str, solver: str) -> int:
    diff = DIFFUSIONS[name]()
    exact = exact_score_model(_gaussian(), diff)
    calls = []

    def model(u, t):
        calls.append(t)
        return exact(u, t)

    sample(model, diff, x_T=_start(diff, 4, 5), steps=3, solver=solver)
    return len(calls)


@pytest.mark.parametrize("name,expected", [("vpsde", True), ("cld", False), ("malda3", False)])
def test_default_end_denoises_only_where_it_changes_the_sample(name, expected):
    """VP-SDE's Σ_xx(t_min) is ~1e-4: the default spends the Tweedie call; CLD's and MALDA's are
    ≤ 1e-8, where the state's x is the denoised end already: the default returns it (no extra call)."""
    assert _calls_of_default_end(name, "ancestral") == 3 + expected


@pytest.mark.parametrize("solver", ["ei-ode", "ei-data"])
@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_few_step_multisteps_end_on_the_state(name, solver):
    """"ei-ode" and "ei-data" end on the state by default, VP-SDE included: their last step beats the
    Tweedie call at equal NFE (benchmarks/results/quality-2026-12-01.md)."""
    assert _calls_of_default_end(name, solver) == 3


def test_denoise_must_be_a_bool():
    diff = fm.vpsde()
    with pytest.raises(TypeError, match="denoise"):
        sample(exact_score_model(_gaussian(), diff), diff, (2, 3), steps=2, denoise="yes")


def test_velocity_only_score_ends_on_the_state():
    """CLD-SGM's velocity score gives only D·s, not x̂₀: its default end is the state (denoise=False)."""
    diff = fm.cld()
    adapter = fm.adapters.from_cld_sgm(lambda uc, t: uc[:, :3])
    last = LastState()
    x = sample(adapter, diff, x_T=_start(diff, 4, 5), steps=3, solver="sscs", callback=last)
    assert torch.equal(x, last.info["u"][:, 0])
