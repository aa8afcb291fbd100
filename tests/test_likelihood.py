"""Probability-flow drift and ODE likelihood (fastmdm.likelihood, docs/math.md §6) with exact scores."""

import math

import pytest
import torch

import fastmdm as fm
from fastmdm.bpd import bits_per_dim, dequantize, logit_transform
from fastmdm.fields import probability_flow_drift
from fastmdm.likelihood import ode_bits_per_dim, ode_log_likelihood
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.objectives import dsm_elbo, ism_elbo
from fastmdm.parameterization import get_parameterization

F64 = torch.float64
# T large enough that the law at T is π = N(0, Σ∞) to ~1e-6 (VP: mean factor e^{−τ(T)/2}),
# so that with the exact score the ODE's log p_{t_min} is the exact marginal's.
VP = dict(beta_max=50.0)
CLD = dict(beta_max=40.0)
GAUSS = GaussianMixture([1.0], [[0.3, -0.5, 1.0]], [1.5])


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(F64)
    fm.set_backend("torch")


class TinyNet(torch.nn.Module):
    """A small smooth network over the state; returns the state's shape or only x's (x0 head)."""

    def __init__(self, K, d, data_only=False):
        super().__init__()
        torch.manual_seed(0)
        self.K, self.d, self.data_only = K, d, data_only
        self.lin1 = torch.nn.Linear(K * d + 1, 16)
        self.lin2 = torch.nn.Linear(16, d if data_only else K * d)

    def forward(self, u, t):
        h = torch.tanh(self.lin1(torch.cat([u.flatten(1), t[:, None]], 1)))
        out = self.lin2(h)
        return out.view(u.shape[0], self.d) if self.data_only else out.view(u.shape)


@pytest.mark.parametrize("prediction,data_only",
                         [("eps", False), ("score", False), ("x0", False), ("x0", True)])
def test_probability_flow_drift_and_its_exact_divergence(prediction, data_only):
    """h = β(A u − D s) with s from the parameterisation; ∇·h equals the dense Jacobian's trace."""
    diff = fm.cld()
    B, K, d = 2, 2, 3
    net = TinyNet(K, d, data_only)
    flow = probability_flow_drift(net, diff, prediction)
    u = torch.randn(B, K, d)
    t = torch.tensor([0.05, 0.7])
    tk = diff.transition_f64(t)
    param = get_parameterization(prediction)
    s = param.score(param.output(net(u, t), u), u, tk)
    beta = diff.beta(t)[:, None, None]
    want = (beta * diff.A) @ u - (beta * diff.D) @ s
    torch.testing.assert_close(flow(u, t), want, rtol=1e-12, atol=1e-12)
    h, div = flow.with_divergence(u, t, exact=True)
    jac = torch.autograd.functional.jacobian(lambda z: flow(z, t), u)
    trace = torch.stack([torch.diagonal(jac[b, :, :, b].reshape(K * d, K * d)).sum() for b in range(B)])
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, trace, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["score", "eps"])
def test_vp_ode_likelihood_of_gaussian_data_is_exact(prediction):
    """K = 1, exact score: log p_{t_min}(x) through the ODE = the data law's log-density (≤ 1e-3)."""
    diff = fm.vpsde(**VP)
    x = GAUSS.sample(3, generator=torch.Generator().manual_seed(0))
    logp, nfe = ode_log_likelihood(exact_score_model(GAUSS, diff, prediction), diff, x, prediction,
                                   exact_divergence=True)
    want = GAUSS.log_prob(x)
    assert nfe > 0 and logp.shape == (3,) and logp.dtype == F64
    assert ((logp - want).abs() <= 1e-3 * want.abs()).all()
    tight = GAUSS.marginal_log_prob(diff, x.unsqueeze(1), diff.t_min)  # the law at t_min itself
    assert ((logp - tight).abs() <= 1e-4 * tight.abs()).all()


def aux_draw(generator, B, K, d, aux_var):
    """The v₀ that ode_log_likelihood draws first from ``generator``."""
    return torch.randn((B, K - 1, d), generator=generator) * math.sqrt(aux_var)


def test_cld_ode_likelihood_with_aux_marginalisation():
    """K = 2: per draw, log p_{t_min}(x, v₀) − log q(v₀) exactly; aux_samples=S is the IW bound."""
    diff = fm.cld(**CLD)
    model = exact_score_model(GAUSS, diff, "score")
    x = GAUSS.sample(2, generator=torch.Generator().manual_seed(1))
    S, B, d = 3, 2, 3
    logw, _ = ode_log_likelihood(model, diff, x.repeat(S, 1), "score", exact_divergence=True,
                                 generator=torch.Generator().manual_seed(5))
    v0 = aux_draw(torch.Generator().manual_seed(5), S * B, 2, d, diff.init_aux_var)
    u0 = torch.cat([x.repeat(S, 1).unsqueeze(1), v0], 1)
    log_q = torch.distributions.Normal(0.0, math.sqrt(diff.init_aux_var)).log_prob(v0).sum((1, 2))
    want = GAUSS.marginal_log_prob(diff, u0, diff.t_min) - log_q
    assert ((logw - want).abs() <= 1e-3 * want.abs()).all()
    # the importance-weighted bound is log-mean-exp over the S draws (same draws, cheap solver)
    options = dict(exact_divergence=True, method="euler", steps=3)
    per_draw, _ = ode_log_likelihood(model, diff, x.repeat(S, 1), "score",
                                     generator=torch.Generator().manual_seed(5), **options)
    iw, _ = ode_log_likelihood(model, diff, x, "score", aux_samples=S,
                               generator=torch.Generator().manual_seed(5), **options)
    want_iw = torch.logsumexp(per_draw.view(S, B), 0) - math.log(S)
    torch.testing.assert_close(iw, want_iw, rtol=1e-12, atol=1e-12)


def test_hutchinson_ode_likelihood_is_unbiased():
    """Gaussian probes fixed along each solve: the mean over solves equals the exact-divergence value."""
    diff = fm.vpsde(**VP)
    model = exact_score_model(GAUSS, diff, "score")
    R = 48
    x = GAUSS.sample(1, generator=torch.Generator().manual_seed(2)).expand(R, -1)
    options = dict(method="rk4", steps=12)
    exact, _ = ode_log_likelihood(model, diff, x[:1], "score", exact_divergence=True, **options)
    est, nfe = ode_log_likelihood(model, diff, x, "score", probes=2, distribution="gaussian",
                                  generator=torch.Generator().manual_seed(3), **options)
    assert nfe == 4 * 12
    assert est.std() > 0
    assert (est.mean() - exact).abs() <= 5 * est.std() / math.sqrt(R)


def test_elbos_are_not_above_the_ode_likelihood():
    """Exact score, one Gaussian data point: DSM and ISM ELBOs agree and are not above log p(x).

    The one-draw ELBO estimators have a per-sample std of ~20 nats here (the t-integrand near
    t_min), larger than the bound's gap (~0.3 nats), so this checks the order only within 4 SE.
    """
    diff = fm.vpsde(**VP)
    model = exact_score_model(GAUSS, diff, "eps")
    R = 512
    x = GAUSS.sample(1, generator=torch.Generator().manual_seed(4))
    logp, _ = ode_log_likelihood(model, diff, x, "eps", exact_divergence=True)
    xs = x.expand(R, -1)
    dsm = -dsm_elbo(model, diff, xs, generator=torch.Generator().manual_seed(6))
    ism = -ism_elbo(model, diff, xs, probes=1, generator=torch.Generator().manual_seed(7))
    for elbo in (dsm, ism):
        assert elbo.mean() - 4 * elbo.std() / math.sqrt(R) <= logp
    assert (dsm.mean() - ism.mean()).abs() <= 5 * math.sqrt((dsm.var() + ism.var()) / R)
    bpd = bits_per_dim(torch.stack([dsm.mean(), ism.mean()]).neg(), (2, 3), levels=None)
    assert torch.isfinite(bpd).all()


def test_ism_elbo_trains_through_the_batched_divergence():
    diff = fm.cld()
    net = TinyNet(2, 3)
    x = torch.randn(4, 3)
    loss = ism_elbo(net, diff, x, probes=3, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("alpha", [None, 0.05])
def test_ode_bits_per_dim_composes_dequantisation_and_logit(alpha):
    diff = fm.vpsde(**VP)
    model = exact_score_model(GAUSS, diff, "score")
    levels = 17
    x = torch.randint(0, levels, (2, 3), generator=torch.Generator().manual_seed(0)).to(F64) / (levels - 1)
    options = dict(prediction="score", exact_divergence=True, method="rk4", steps=6)
    bpd, nfe = ode_bits_per_dim(model, diff, x, levels, alpha, generator=torch.Generator().manual_seed(8),
                                **options)
    g = torch.Generator().manual_seed(8)
    x_tilde = dequantize(x, levels, g)
    y, ldj = (x_tilde, 0.0) if alpha is None else logit_transform(x_tilde, alpha)
    logp, _ = ode_log_likelihood(model, diff, y, generator=g, **options)
    torch.testing.assert_close(bpd, bits_per_dim(-logp, x.shape, ldj, levels), rtol=1e-12, atol=1e-12)
    assert nfe == 24


def test_bad_input():
    diff = fm.vpsde()
    model = exact_score_model(GAUSS, diff, "score")
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="method"):
        ode_log_likelihood(model, diff, x, method="rk23")
    with pytest.raises(ValueError, match="steps"):
        ode_log_likelihood(model, diff, x, method="rk4")
    with pytest.raises(ValueError, match="aux_samples"):
        ode_log_likelihood(model, diff, x, aux_samples=0)
    with pytest.raises(ValueError, match="prediction"):
        ode_log_likelihood(model, diff, x, prediction="v")
    with pytest.raises(ValueError, match="NaN"):
        ode_log_likelihood(model, diff, torch.full((2, 3), float("nan")))
    with pytest.raises(TypeError, match="LinearDiffusion"):
        probability_flow_drift(model, "vp")
