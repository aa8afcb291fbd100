"""Samplers under large β: every solver stays finite, the default one accurate (docs/math.md §7–8).

For β_max = 1000 the data is forgotten by τ ≈ 17 of τ(T) = 500: the named grids start at the effective
horizon (fastmdm.solvers.effective_horizon), where p_t is the prior to 1e-6, instead of spending
nearly every step where nothing happens with huge reverse-time expansions e^{Δτ} per step.

Accuracy bound (the default sampler within 2× the exact-sample floor at 50 network evaluations):
per-mode W2 as in benchmarks/quality.py's ExactLaw, d = 2, four modes, n = 2000 samples. The W2 of
n exact samples is the floor f ≈ 0.018 with a relative standard deviation of 0.15 between draws
(measured over 20 seeds: 0.0176 ± 0.0027); we average 5 draws. The sampler's systematic error δ adds
in quadrature, √(f² + δ²); measured over 4 seeds δ ≲ 0.7 f (ratios 0.9–1.5), so exceeding 2 f needs
the sampling noise alone to reach √(4 − 0.5) f ≈ 1.9 f, over 5 standard deviations from the mean:
the bound is safe for any seed and BLAS, yet fails for the old behaviour (W2 ≥ 13× the floor).
More samples would shrink f (∝ 1/√n) but not δ, so n is kept where f and δ are comparable.
"""

import sys
from pathlib import Path

import pytest
import torch

import fastmdm as fm
from fastmdm.mixtures import exact_score_model
from fastmdm.solvers import HORIZON_TOL, effective_horizon, flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import ExactLaw, make_mixture  # noqa: E402

BETAS = (10.0, 100.0, 1000.0)
DIFFUSIONS = {"vpsde": fm.vpsde, "cld": fm.cld, "malda3": lambda **kw: fm.malda(3, **kw)}
STEPS = {"ei-ode": 50, "ancestral": 50, "sscs": 50, "heun": 25, "euler-maruyama": 200, "rk45": None}


@pytest.fixture(scope="module")
def mixture():
    return make_mixture(2)


@pytest.mark.parametrize("beta_max", BETAS)
@pytest.mark.parametrize("name", sorted(DIFFUSIONS))
def test_every_solver_is_finite(mixture, name, beta_max):
    """Float32 state, exact score: every registered solver returns finite samples and none but Heun
    diverges (the old default reached |x| = 6.3e3 at β_max = 100). Heun is explicit: on the flow near
    the prior, a rotation at rate τ‖QΣ∞⁻¹‖ in ρ = log τ, it is weakly unstable unless each step keeps
    Δτ‖QΣ∞⁻¹‖ ≲ 1, so at large β it needs more steps (CLD, β_max = 100: 7× the floor at 50 steps,
    1.5× at 100)."""
    diffusion = DIFFUSIONS[name](beta_max=beta_max)
    model = exact_score_model(mixture, diffusion)
    for solver in fm.SOLVERS:
        x = fm.sample(model, diffusion, (64, 2), steps=STEPS.get(solver), solver=solver,
                      generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all(), (name, beta_max, solver)
        if solver != "heun":
            assert x.abs().max() < 30, (name, beta_max, solver, float(x.abs().max()))  # data within 3


@pytest.mark.parametrize("beta_max", BETAS)
@pytest.mark.parametrize("name", ["vpsde", "cld"])
def test_default_sampler_within_twice_the_floor(mixture, name, beta_max):
    diffusion = DIFFUSIONS[name](beta_max=beta_max)
    law = ExactLaw(mixture, diffusion)
    floor = sum(law.metrics(law.sample(2000, torch.Generator().manual_seed(100 + i)))[0]
                for i in range(5)) / 5
    x = fm.sample(exact_score_model(mixture, diffusion), diffusion, (2000, 2), steps=50,
                  generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    w2 = law.metrics(x)[0]
    assert w2 < 2 * floor, (name, beta_max, w2 / floor)


@pytest.mark.parametrize("name", sorted(DIFFUSIONS))
def test_effective_horizon(name):
    """T while the data is remembered at T; else the data is forgotten from t_eff on, not before."""
    assert effective_horizon(DIFFUSIONS[name]()) == 1.0  # β_max = 10: unchanged grids
    diffusion = DIFFUSIONS[name](beta_max=1000.0)
    t_eff = effective_horizon(diffusion)
    assert diffusion.t_min < t_eff < 0.3
    scale = diffusion.stationary_var.sqrt()
    tau = diffusion.tau(torch.linspace(t_eff, 1.0, 200, dtype=torch.float64))
    after = flow(diffusion, tau, torch.zeros_like(tau)) * scale / scale[:, None]
    assert torch.linalg.matrix_norm(after, ord=2).max() <= HORIZON_TOL
    before = diffusion.tau(torch.tensor([0.9 * t_eff], dtype=torch.float64))
    M = flow(diffusion, before, torch.zeros_like(before)) * scale / scale[:, None]
    assert torch.linalg.matrix_norm(M, ord=2).max() > HORIZON_TOL
