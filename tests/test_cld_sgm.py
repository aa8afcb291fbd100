"""CLD-SGM interop: its SDE parameters, its velocity-only score networks and its SSCS sampler.

The references here are small independent implementations of CLD-SGM's published conventions
(Dockhorn et al., ICLR 2022, and their code's config names): β(t) = beta0 + beta1 t, m_inv = 1/M,
critical friction f = 2/sqrt(m_inv), the perturbation kernel in closed form with numerical_eps on the
diagonal, noise_multiplier = −sqrt(Σ_xx / det Σ), and the SSCS step in reverse time s = 1 − t.
"""

import math

import pytest
import torch

import fastmdm as fm
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.parameterization import get_parameterization
from fastmdm.solvers import sscs_plan, transition_at

TOY = dict(beta0=4.0, beta1=0.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)  # its toy config


class CLDSGMReference:
    """CLD-SGM's kernel and SSCS in closed form, float64 (written from its equations)."""

    def __init__(self, beta0, beta1, m_inv, gamma, numerical_eps):
        self.beta0, self.beta1, self.m_inv, self.gamma, self.eps = beta0, beta1, m_inv, gamma, numerical_eps
        self.f = 2.0 / math.sqrt(m_inv)
        self.g = 1.0 / self.f

    def beta(self, t):
        return self.beta0 + self.beta1 * t

    def beta_int(self, t):
        return self.beta0 * t + 0.5 * self.beta1 * t**2

    def var(self, t, var0v):
        """(Σ_xx, Σ_xv, Σ_vv) of u_t given x₀ (v₀ ~ N(0, var0v)), numerical_eps on the diagonal."""
        B, g, f = self.beta_int(t), self.g, self.f
        e = math.exp(-4 * B * g)
        xx = (math.exp(4 * B * g) - 1 - 4 * B * g - 8 * B**2 * g**2 + 16 * g**4 * B**2 * var0v) * e
        xv = (4 * g**2 * B * var0v + 4 * g * B**2 - 8 * g**3 * B**2 * var0v) * e
        vv = (f**2 * (math.exp(4 * B * g) - 1) / 4 + f * B - 4 * g * B * var0v + 4 * g**2 * B**2 * var0v
              + var0v - 2 * B**2) * e
        return xx + self.eps, xv, vv + self.eps

    def noise_multiplier(self, t, var0v):
        xx, xv, vv = self.var(t, var0v)
        return -math.sqrt(xx / (xx * vv - xv**2))

    def half_step(self, B):
        """Mean matrix and covariance of the exact OU-plus-Hamiltonian part, B = ∫β over the half step
        in its reverse time (negative)."""
        g, f = self.g, self.f
        c = math.exp(2 * g * B)
        mean = torch.tensor([[c * (1 - 2 * g * B), c * 4 * g**2 * B], [-c * B, c * (1 + 2 * g * B)]],
                            dtype=torch.float64)
        c2 = c * c
        cov = torch.tensor([[c2 * (1 / c2 - 1 + 4 * g * B - 8 * g**2 * B**2), -c2 * 4 * g * B**2],
                            [-c2 * 4 * g * B**2, c2 * (-f**2 * (1 - 1 / c2) / 4 - f * B - 2 * B**2)]],
                           dtype=torch.float64)
        return mean, cov

    def sscs_mean_path(self, u, times, score):
        """SSCS without its noise: reverse times s_i = 1 − t_i, score(u, t) the velocity score."""
        for t_from, t_to in zip(times[:-1], times[1:], strict=True):
            dt = t_from - t_to  # reverse-time step
            B = self.beta_int(t_from - dt / 2) - self.beta_int(t_from)  # < 0: its first half, both halves
            mean, _ = self.half_step(B)
            u = torch.einsum("kl,bl...->bk...", mean, u)
            v = u[:, 1] + 2 * self.f * (score(u, t_from) + self.m_inv * u[:, 1]) * self.beta(t_from) * dt
            u = torch.einsum("kl,bl...->bk...", mean, torch.stack([u[:, 0], v], 1))
        return u


def _diffusion(cfg):
    return fm.cld_sgm(mass=1 / cfg["m_inv"], beta0=cfg["beta0"], beta1=cfg["beta1"], gamma=cfg["gamma"])


def _mixture():
    means = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=torch.float64)
    return GaussianMixture([0.3, 0.3, 0.4], means, [0.2, 0.3, 0.25])


def _cld_sgm_network(mixture, diffusion, ref, var0v, dtype=torch.float64):
    """A CLD-SGM-style network: input cat(x, v) (B, 2d), output y with s_v = noise_multiplier · y."""
    full = exact_score_model(mixture, diffusion, "score")

    def net(uc, t):
        d = uc.shape[1] // 2
        u = torch.stack([uc[:, :d], uc[:, d:]], 1)
        ell = torch.tensor([ref.noise_multiplier(float(s), var0v) for s in t], dtype=uc.dtype)
        return full(u, t)[:, 1] / ell[:, None]

    return net


def test_constructor_is_cld_sgm_sde():
    """Drift [[0, M⁻¹β], [−β, −ΓM⁻¹β]], noise sqrt(2Γβ) on v, N(0, diag(1, M)), v₀ ~ N(0, γM)."""
    d = fm.cld_sgm(mass=0.25, beta0=4.0, gamma=0.04)
    M, Gamma = 0.25, 1.0  # critical: 2√M
    assert torch.allclose(d.A, torch.tensor([[0.0, 1 / M], [-1.0, -Gamma / M]], dtype=torch.float64))
    assert torch.allclose(d.D, torch.tensor([[0.0, 0.0], [0.0, Gamma]], dtype=torch.float64))
    assert torch.allclose(d.stationary_var, torch.tensor([1.0, M], dtype=torch.float64))
    assert d.init_aux_var == pytest.approx(0.04 * M)
    assert float(d.beta(torch.tensor(0.7))) == pytest.approx(4.0)
    assert fm.cld_sgm(Gamma=0.5).D[1, 1] == 0.5
    linear = fm.cld_sgm(beta0=0.0, beta1=6.9)  # beta_min = 0: β > 0 on (0, T]
    assert float(linear.beta(torch.tensor(0.5))) == pytest.approx(3.45)
    with pytest.raises(ValueError, match="beta"):
        fm.cld_sgm(beta0=0.0, beta1=0.0)
    with pytest.raises(ValueError, match="mass"):
        fm.cld_sgm(mass=-1.0)


@pytest.mark.parametrize("cfg", [TOY, dict(TOY, beta0=0.1, beta1=6.9)])
@pytest.mark.parametrize("t", [0.05, 0.3, 1.0])
def test_kernel_matches_cld_sgm(cfg, t):
    ref = CLDSGMReference(**dict(cfg, numerical_eps=0.0))
    d = _diffusion(cfg)
    tk = d.transition(torch.tensor([t], dtype=torch.float64))
    for start, var0v in (("hybrid", cfg["gamma"] / cfg["m_inv"]), ("full", 0.0)):
        cov = d.transition(torch.tensor([t], dtype=torch.float64), start).cov[0]
        xx, xv, vv = ref.var(t, var0v)
        assert torch.allclose(cov, torch.tensor([[xx, xv], [xv, vv]], dtype=torch.float64), rtol=1e-9, atol=1e-13)
    B, g = ref.beta_int(t), ref.g
    mean_x_coef = math.exp(-2 * B * g) * (2 * B * g + 1)
    mean_v_coef = -B * math.exp(-2 * B * g)
    assert torch.allclose(tk.mean_coef[0, :, 0], torch.tensor([mean_x_coef, mean_v_coef], dtype=torch.float64))


def test_velocity_score_kind_gives_d_s():
    """s = (0, s_v): D s exact, and D L⁻ᵀ ε̂ = −D s through its ε̂ map."""
    d = _diffusion(TOY)
    t = torch.tensor([0.01, 0.2, 0.9], dtype=torch.float64)
    tk = d.transition_f64(t)
    u = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    score = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    param = get_parameterization("velocity_score")
    y = param.output(score[:, 1], u)
    assert y.shape == (3, 1, 5) and torch.equal(param.output(score, u), y)
    Ds = torch.einsum("kl,bl...->bk...", d.D, score)
    assert torch.allclose(torch.einsum("kl,bl...->bk...", d.D, param.score(y, u, tk)), Ds)
    eps = param.eps_map(tk).apply(y, u)
    assert torch.allclose(-torch.einsum("bkl,bl...->bk...", d.D @ tk.chol_inv_t, eps), Ds, atol=1e-12)
    assert not param.full_score


def test_noise_multiplier_includes_numerical_eps():
    """Toy config at t = 1e-3: CLD-SGM's multiplier is −12.80, the exact −1/L₂₂ is −19.94."""
    d = _diffusion(TOY)
    adapter = fm.adapters.from_cld_sgm(lambda u, t: u, numerical_eps=1e-6, diffusion=d)
    t = torch.tensor([1e-3, 0.1, 0.9], dtype=torch.float64)
    ell, _ = adapter.multipliers(t)
    ref = CLDSGMReference(**TOY)
    expected = [ref.noise_multiplier(float(s), TOY["gamma"] / TOY["m_inv"]) for s in t]
    assert torch.allclose(ell, torch.tensor(expected, dtype=torch.float64), rtol=1e-9)
    assert float(ell[0]) == pytest.approx(-12.80, abs=5e-3)
    assert 1 / float(d.transition(t[:1]).chol[0, 1, 1]) == pytest.approx(19.94, abs=5e-3)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("objective", ["hsm", "dsm"])
def test_adapter_recovers_the_velocity_score(mixed, objective):
    d = _diffusion(TOY)
    ref = CLDSGMReference(**TOY)
    mixture = _mixture()
    var0v = TOY["gamma"] / TOY["m_inv"] if objective == "hsm" else 0.0
    net = _cld_sgm_network(mixture, d, ref, var0v)
    if mixed:  # its mixed score: s_v = −v / Σ_vv(hybrid) + ℓ y, so the network learns the rest
        def mixed_net(uc, t, inner=net):
            var_vv = torch.tensor([ref.var(float(s), TOY["gamma"] / TOY["m_inv"])[2] for s in t],
                                  dtype=torch.float64)
            ell = torch.tensor([ref.noise_multiplier(float(s), var0v) for s in t], dtype=torch.float64)
            return inner(uc, t) + uc[:, 2:] / (var_vv * ell)[:, None]
        net = mixed_net
    adapter = fm.adapters.from_cld_sgm(net, mixed_score=mixed, objective=objective, diffusion=d)
    u = torch.randn(16, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.99 + 0.01
    exact = exact_score_model(mixture, d, "score")(u, t)[:, 1]
    assert adapter(u, t).shape == (16, 2)
    assert torch.allclose(adapter(u, t), exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", ["euler-maruyama", "sscs", "heun", "rk45"])
def test_solvers_needing_only_d_s_match_the_full_score(solver):
    """D s is all these solvers use, so the velocity-only adapter gives the full score's samples."""
    d = _diffusion(TOY)
    mixture = _mixture()
    adapter = fm.adapters.from_cld_sgm(_cld_sgm_network(mixture, d, CLDSGMReference(**TOY), 0.01))
    runs = [fm.sample(model, d, (32, 2), steps=20, solver=solver, prediction=prediction, denoise=False,
                      generator=torch.Generator().manual_seed(3), x_T=d.prior_sample(
                          (32, 2), torch.Generator().manual_seed(4), dtype=torch.float64))
            for model, prediction in ((adapter, None), (exact_score_model(mixture, d, "score"), "score"))]
    assert torch.allclose(runs[0], runs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["ei-ode", "ancestral"])
def test_solvers_needing_the_whole_score_refuse(solver):
    d = _diffusion(TOY)
    adapter = fm.adapters.from_cld_sgm(lambda uc, t: uc[:, :2])
    with pytest.raises(ValueError, match="needs the whole score.*euler-maruyama.*sscs"):
        fm.sample(adapter, d, (4, 2), solver=solver)
    with pytest.raises(ValueError, match="corrector"):
        fm.sample(adapter, d, (4, 2), solver="sscs", corrector="langevin")
    with pytest.raises(ValueError, match="denoise"):
        fm.sample(adapter, d, (4, 2), solver="sscs", denoise=True)
    with pytest.raises(ValueError, match="K = 2"):
        fm.sample(adapter, fm.malda(3), (4, 2), solver="sscs")
    with pytest.raises(ValueError, match="the ELBOs need the whole score"):
        fm.dsm_elbo(adapter.bind(d), d, torch.zeros(4, 2) + 0.5, prediction="velocity_score")


def test_likelihood_with_the_velocity_score():
    d = _diffusion(TOY)
    mixture = _mixture()
    adapter = fm.adapters.from_cld_sgm(_cld_sgm_network(mixture, d, CLDSGMReference(**TOY), 0.01), diffusion=d)
    x = mixture.sample(8, torch.Generator().manual_seed(5), dtype=torch.float64)
    logp = [fm.ode_log_likelihood(model, d, x, prediction, exact_divergence=True, method="rk4", steps=20,
                                  generator=torch.Generator().manual_seed(6))[0]
            for model, prediction in ((adapter, "velocity_score"),
                                      (exact_score_model(mixture, d, "score"), "score"))]
    assert torch.allclose(logp[0], logp[1], rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="K = 2"):
        fm.ode_log_likelihood(adapter, fm.malda(3), x, "velocity_score")


@pytest.mark.parametrize("grid", ["quadratic", "uniform"])
def test_sscs_matches_cld_sgm(grid):
    """fastmdm's sscs is CLD-SGM's SSCS (constant β): same half-step kernels, same noise-free path."""
    d = _diffusion(TOY)
    ref = CLDSGMReference(**TOY)
    mixture = _mixture()
    times = fm.grids.time_grid(d, 12, grid)
    plan = sscs_plan(d, times)
    for n in range(12):
        mean, cov = ref.half_step(ref.beta_int(float(times[n] + times[n + 1]) / 2) - ref.beta_int(float(times[n])))
        assert torch.allclose(plan.pre_phi[n], mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(plan.pre_noise[n] @ plan.pre_noise[n].mT, cov, rtol=1e-8, atol=1e-14)
    assert torch.equal(plan.eval_times, times[:-1])
    velocity = exact_score_model(mixture, d, "score")
    param = get_parameterization("velocity_score")
    u0 = d.prior_sample((16, 2), torch.Generator().manual_seed(2), dtype=torch.float64)
    u = u0
    for n in range(12):  # the plan without its noise
        u = torch.einsum("kl,bl...->bk...", plan.pre_phi[n], u)
        t = times[n].expand(16)
        eps = param.eps_map(transition_at(d, times[n:n + 1])).apply(param.output(velocity(u, t)[:, 1], u), u)
        u = torch.einsum("kl,bl...->bk...", plan.phi[n], u) + torch.einsum("kl,bl...->bk...", plan.gamma[n, 0], eps)
    expected = ref.sscs_mean_path(u0, times.tolist(), lambda u, t: velocity(u, torch.full((16,), t, dtype=torch.float64))[:, 1])
    assert torch.allclose(u, expected, rtol=1e-9, atol=1e-9)


def test_t_min_per_call_in_the_objectives_and_the_likelihood():
    """CLD-SGM evaluates one SDE at t_min 1e-5 (likelihood) and 1e-3 (sampling): t_min per call equals a
    diffusion built with that t_min."""
    d, d_low = _diffusion(TOY), fm.cld_sgm(beta0=4.0, t_min=1e-5)
    mixture = _mixture()
    model = exact_score_model(mixture, d_low)
    x = mixture.sample(8, torch.Generator().manual_seed(7), dtype=torch.float64)
    for objective in (fm.dsm_elbo, fm.ism_elbo, fm.noise_prediction_loss):
        per_call = objective(model, d, x, generator=torch.Generator().manual_seed(8), t_min=1e-5)
        built = objective(model, d_low, x, generator=torch.Generator().manual_seed(8))
        assert torch.equal(per_call, built), objective.__name__
    options = dict(exact_divergence=True, method="rk4", steps=8)
    per_call = fm.ode_log_likelihood(model, d, x, generator=torch.Generator().manual_seed(9), t_min=1e-5,
                                     **options)
    built = fm.ode_log_likelihood(model, d_low, x, generator=torch.Generator().manual_seed(9), **options)
    assert torch.equal(per_call[0], built[0])
    assert d.t_min == 1e-3
    with pytest.raises(ValueError, match="t_min"):
        fm.dsm_elbo(model, d, x, t_min=2.0)


def test_likelihood_takes_the_auxiliary_start():
    d = _diffusion(TOY)
    mixture = _mixture()
    model = exact_score_model(mixture, d)
    x = mixture.sample(8, torch.Generator().manual_seed(7), dtype=torch.float64)
    v0 = torch.randn(8, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    options = dict(exact_divergence=True, method="rk4", steps=8)
    given = fm.ode_log_likelihood(model, d, x, v0=v0 * d.init_aux_var**0.5, **options)[0]
    drawn = fm.ode_log_likelihood(model, d, x, generator=torch.Generator().manual_seed(10), **options)[0]
    assert torch.allclose(given, drawn, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="v0 must be a tensor of shape"):
        fm.ode_log_likelihood(model, d, x, v0=v0[:, :, :1], **options)
    with pytest.raises(ValueError, match="aux_samples=1"):
        fm.ode_log_likelihood(model, d, x, v0=v0, aux_samples=2, **options)
