"""Objectives, importance sampling and bits/dim on problems with exact answers."""

import math

import pytest
import torch

import fastmdm as fm
from fastmdm.importance import importance_normaliser, importance_pdf, sample_time
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.objectives import dsm_weight, prior_cross_entropy


def gaussian_prior_kl(diff, mu, s2, d):
    """KL(q(u_T) ‖ π) for x ~ N(μ, s² I_d): q(u_T) = N(a μ, s² a aᵀ + Σ_T) per coordinate."""
    tk = diff.transition(torch.tensor([diff.T], dtype=torch.float64))
    a, cov = tk.mean_coef[0, :, 0], tk.cov[0]
    C = s2 * torch.outer(a, a) + cov
    var = diff.stationary_var
    kl = 0.5 * ((torch.diagonal(C) / var).sum() + (a * a * mu * mu / var).sum() - diff.K
                + var.log().sum() - torch.logdet(C))
    return float(kl) * d


@pytest.mark.parametrize("name", ["vpsde", "cld", "malda3"])
@pytest.mark.parametrize("objective", ["dsm", "ism"])
def test_elbo_of_gaussian_data_with_exact_score_is_tight(name, objective):
    """E[ELBO − log p] = −KL(q_T ‖ π) for the exact score (the t_min decoder adds ~Σ/s² ≪ SE).

    Checked within 4 standard errors of the per-sample estimates: a sign or factor error in any
    term (prior, offset, entropy, importance weight, integrand) shifts the mean by ≫ 4 SE.
    """
    torch.set_default_dtype(torch.float64)
    diff = {"vpsde": fm.vpsde, "cld": fm.cld, "malda3": lambda: fm.malda(3)}[name]()
    mu, s2, d, n = 0.5, 0.3, 2, 6000
    data = GaussianMixture([1.0], [[mu] * d], [math.sqrt(s2)])
    g = torch.Generator().manual_seed(7)
    x = data.sample(n, generator=g)
    model = exact_score_model(data, diff, "eps")
    if objective == "dsm":
        neg = fm.dsm_elbo(model, diff, x, generator=g)
    else:
        neg = fm.ism_elbo(model, diff, x, probes=1, generator=g).detach()
    gap = -neg - data.log_prob(x)
    se = gap.std() / math.sqrt(n)
    expected = -gaussian_prior_kl(diff, mu, s2, d)
    assert abs(gap.mean() - expected) < 4 * se, (gap.mean().item(), expected, se.item())


def test_elbo_with_a_wrong_score_is_lower():
    torch.set_default_dtype(torch.float64)
    diff = fm.cld()
    data = GaussianMixture([1.0], [[0.5, 0.5]], [0.5])
    g = torch.Generator().manual_seed(3)
    x = data.sample(4000, generator=g)
    exact = exact_score_model(data, diff, "score")
    good = -fm.dsm_elbo(exact, diff, x, prediction="score", generator=torch.Generator().manual_seed(1))
    bad = -fm.dsm_elbo(lambda u, t: 1.5 * exact(u, t), diff, x, prediction="score",
                       generator=torch.Generator().manual_seed(1))
    diff_mean = (good - bad).mean()
    assert diff_mean > 5 * (good - bad).std() / math.sqrt(len(x))


def test_predictions_give_the_same_elbo():
    """eps, score and x0 parameterisations of the same exact model give the same DSM ELBOs.

    x0 prediction is ill-conditioned at t_min for ALDA: s = −Σ⁻¹(u − a x̂₀) with Σ_xx ≈ 1e-21
    amplifies the rounding of x̂₀ (measured 5e-5 relative), hence its looser tolerance.
    """
    torch.set_default_dtype(torch.float64)
    diff = fm.alda()
    data = GaussianMixture([0.4, 0.6], [[-1.0, 0.0], [1.0, 0.5]], [0.4, 0.3])
    x = data.sample(64, generator=torch.Generator().manual_seed(0))
    vals = [fm.dsm_elbo(exact_score_model(data, diff, p), diff, x, prediction=p,
                        generator=torch.Generator().manual_seed(9)) for p in ("eps", "score", "x0")]
    assert torch.allclose(vals[0], vals[1], rtol=1e-9) and torch.allclose(vals[0], vals[2], rtol=2e-4)


def test_noise_prediction_loss_of_zero_predictor_is_chi_square():
    """With ε̂ = 0 the loss is ‖ε‖² ~ χ²(K d): mean K d within 5 SE (variance 2 K d)."""
    diff = fm.malda(3)
    x = torch.randn(5000, 4, generator=torch.Generator().manual_seed(0))
    loss = fm.noise_prediction_loss(lambda u, t: torch.zeros_like(u), diff, x,
                                    generator=torch.Generator().manual_seed(1))
    kd = 3 * 4
    assert loss.shape == (5000,)
    assert abs(loss.mean() - kd) < 5 * math.sqrt(2 * kd / 5000)


def test_objectives_reject_bad_input():
    diff = fm.cld()
    x = torch.randn(4, 3)
    model = lambda u, t: torch.zeros_like(u)  # noqa: E731
    with pytest.raises(ValueError, match="prediction must be one of"):
        fm.dsm_elbo(model, diff, x, prediction="v")
    with pytest.raises(ValueError, match="NaN"):
        fm.dsm_elbo(model, diff, x.masked_fill(x > 1, float("nan")) if (x > 1).any() else x * float("nan"))
    with pytest.raises(ValueError, match="model output must have the state's shape"):
        fm.dsm_elbo(lambda u, t: u[:, 0], diff, x)
    with pytest.raises(TypeError, match="LinearDiffusion"):
        fm.noise_prediction_loss(model, "cld", x)
    with pytest.raises(ValueError, match="probes"):
        fm.ism_elbo(model, diff, x, probes=0)


def test_importance_density_normaliser_cdf_and_weights():
    diff = fm.vpsde()
    assert abs(importance_normaliser(diff) - 14.21) < 5e-3  # docs/math.md §4
    t = torch.linspace(diff.t_min, diff.T, 200001, dtype=torch.float64)
    pdf = importance_pdf(diff, t)
    assert abs(torch.trapezoid(pdf, t) - 1) < 1e-4
    tau = diff.tau(t)
    assert torch.allclose(diff.tau_inverse(tau), t, rtol=1e-12)
    n = 20000
    ts, p = sample_time(diff, n, generator=torch.Generator().manual_seed(0))
    assert ts.min() >= diff.t_min and ts.max() <= diff.T
    # empirical CDF vs F(t) by quadrature: Kolmogorov–Smirnov at the 0.1% level, 1.95/sqrt(n)
    cdf = torch.cumulative_trapezoid(pdf, t)
    grid = t[1:]
    emp = torch.searchsorted(ts.sort().values, grid).double() / n
    assert (emp - cdf).abs().max() < 1.95 / math.sqrt(n)
    w = 1 / p  # E[1/p(t)] = T − t_min
    assert abs(w.mean() - (diff.T - diff.t_min)) < 5 * w.std() / math.sqrt(n)


def test_prior_cross_entropy_matches_monte_carlo():
    diff = fm.alda()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = 20000
    xs = x.repeat_interleave(n, 0)
    u, _ = diff.perturb(xs, diff.T, generator=torch.Generator().manual_seed(1))
    mc = -diff.prior_log_prob(u).view(2, n)
    exact = prior_cross_entropy(diff, x)
    assert ((mc.mean(1) - exact).abs() < 5 * mc.std(1) / math.sqrt(n)).all()


def test_bits_per_dim_bounds_the_discrete_entropy():
    """On a toy 4-level law, E[bpd] of any model ≥ H(P) in bits (cross-entropy ≥ entropy),
    and a good model (a mixture at the bin centres) comes close."""
    torch.set_default_dtype(torch.float64)
    levels = 4
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    entropy_bits = float(-(probs * probs.log2()).sum())
    g = torch.Generator().manual_seed(0)
    n = 6000
    k = torch.multinomial(probs, n, replacement=True, generator=g)
    x = (k.double() / (levels - 1))[:, None]
    x_tilde = fm.dequantize(x, levels, generator=g)
    assert ((x_tilde * levels).floor() == k[:, None]).all()
    diff = fm.vpsde()
    model_law = GaussianMixture(probs, ((torch.arange(levels) + 0.5) / levels)[:, None],
                                [0.6 / levels] * levels)
    neg = fm.dsm_elbo(exact_score_model(model_law, diff, "eps"), diff, x_tilde, generator=g)
    bpd = fm.bits_per_dim(neg, x_tilde.shape, levels=levels)
    se = bpd.std() / math.sqrt(n)
    assert bpd.mean() >= entropy_bits - 4 * se
    assert bpd.mean() <= entropy_bits + 0.5


def test_logit_transform_log_det_and_bpd_arithmetic():
    x = torch.rand(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, ldj = fm.logit_transform(x)
    eps = 1e-6
    numeric = ((fm.logit_transform(x + eps)[0] - fm.logit_transform(x - eps)[0]) / (2 * eps)).log()
    assert torch.allclose(ldj, numeric.flatten(1).sum(1), rtol=1e-6)
    d = 12
    bpd = fm.bits_per_dim(torch.full((5,), d * math.log(2)), x.shape, torch.zeros(5), levels=256)
    assert torch.allclose(bpd, torch.full((5,), 9.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="neg_elbo must have shape"):
        fm.bits_per_dim(torch.zeros(4), x.shape)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fm.dequantize(x + 1, 256)


def test_triton_backend_objectives_regenerate_the_noise():
    """On the Triton backend the noise loss and DSM ELBO run on the seeded perturbation (ε never
    stored): χ²(K d) mean for ε̂ = 0, the same ELBO as the torch backend in expectation (within
    4 SE, for any model: here ε̂ = c·u), and gradients reach the network."""
    from triton_support import require_triton_kernels

    require_triton_kernels()
    diff, n, d = fm.malda(3), 64, 8
    fm.set_backend("triton")
    zero = fm.noise_prediction_loss(lambda u, t: torch.zeros_like(u), diff, torch.randn(n, d),
                                    generator=torch.Generator().manual_seed(0))
    assert abs(zero.mean() - 3 * d) < 5 * math.sqrt(2 * 3 * d / n)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    scale = torch.full((), 0.5, requires_grad=True)
    fast = fm.dsm_elbo(lambda u, t: scale * u, diff, x, generator=torch.Generator().manual_seed(2))
    fast.mean().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad != 0
    fm.set_backend("torch")
    plain = fm.dsm_elbo(lambda u, t: 0.5 * u, diff, x, generator=torch.Generator().manual_seed(3))
    se = math.sqrt((fast.var() + plain.var()).item() / n)
    assert abs((fast.mean() - plain.mean()).item()) < 4 * se


LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("objective, prediction", [("dsm", "eps"), ("dsm", "score"), ("dsm", "x0"),
                                                    ("ism", "eps"), ("ism", "x0"), ("noise", "eps")])
def test_low_precision_data_gives_finite_objectives_close_to_float32(dtype, objective, prediction):
    """float16/bfloat16 data and network: the K×K maps (L⁻ᵀ ≈ 1e6 at t_min) run in float32, so the
    objectives are finite and within 8 eps of the float32 ones relative to the size of their terms:
    the data, u_t and each layer of the network round once (eps/2 each) and the losses are quadratic
    in the output. The DSM integrand is the difference of two terms of size ½ tr(W_t) d / p(t), so
    that is its scale (plus |ELBO| and 1); the t_min decoder offset, where float16 overflowed, is
    in every ELBO."""
    torch.manual_seed(0)
    diff = fm.cld()
    net = fm.MLPScore((2,), 2, hidden=32, layers=2, time_dim=16)
    low = fm.MLPScore((2,), 2, hidden=32, layers=2, time_dim=16)
    low.load_state_dict(net.state_dict())
    low = low.to(dtype)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    x_low = x.to(dtype)

    def run(model, data):
        g = torch.Generator().manual_seed(2)
        t = torch.linspace(0.05, diff.T, data.shape[0], dtype=torch.float64)
        if objective == "noise":
            return fm.noise_prediction_loss(model, diff, data, t=t, generator=g)
        fn = fm.dsm_elbo if objective == "dsm" else fm.ism_elbo
        return fn(model, diff, data, prediction=prediction, t=t, generator=g)

    with torch.no_grad():
        ref, got = run(net, x_low.float()), run(low, x_low)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    scale = ref.abs().double().clamp_min(1.0)
    if objective == "dsm":
        t = torch.linspace(0.05, diff.T, x.shape[0], dtype=torch.float64)
        W = dsm_weight(diff, t, diff.transition_f64(t, "hybrid"))
        scale = scale + torch.diagonal(W, dim1=-2, dim2=-1).sum(-1) * x[0].numel() * (diff.T - diff.t_min)
    err = ((got - ref).abs() / scale).max().item()
    assert err <= 8 * torch.finfo(dtype).eps, err


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("start", ["hybrid", "full"])
def test_low_precision_perturb_rounds_the_float32_result_once(dtype, start):
    diff = fm.cld()
    g = torch.Generator().manual_seed(3)
    x = torch.randn((64, 2, 3) if start == "full" else (64, 3), generator=g).to(dtype)
    noise = torch.randn(64, 2, 3, generator=g).to(dtype)
    t = torch.linspace(diff.t_min, diff.T, 64, dtype=torch.float64)
    u, eps = diff.perturb(x, t, start=start, noise=noise)
    u32, _ = diff.perturb(x.float(), t, start=start, noise=noise.float())
    assert u.dtype == dtype and eps is noise and torch.isfinite(u).all()
    assert torch.equal(u, u32.to(dtype))  # one rounding of the float32 value
