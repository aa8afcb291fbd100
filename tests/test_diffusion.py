"""Construction, validation and the forward process of LinearDiffusion."""

import math

import pytest
import torch

import fastmdm as fm


def test_builtin_matrices_follow_the_table():
    assert torch.equal(fm.vpsde().D, torch.tensor([[0.5]], dtype=torch.float64))
    cld = fm.cld()
    assert torch.equal(cld.Q, torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(cld.D, torch.diag(torch.tensor([0.0, 2.0], dtype=torch.float64)))
    alda = fm.alda()
    assert alda.Q[1, 2] == -1 and alda.Q[0, 1] == -1 and alda.D[2, 2] == 1 and alda.D[:2].abs().sum() == 0
    m = fm.malda(4)
    assert torch.equal(m.Q, torch.ones(4, 4, dtype=torch.float64).tril(-1) - torch.ones(4, 4).triu(1).double())
    assert torch.equal(torch.diagonal(m.D), torch.tensor([0.0, 2, 2, 2], dtype=torch.float64))
    d = fm.vpsde()
    assert (d.beta_min, d.beta_max, d.t_min, d.T, d.init_aux_var) == (0.1, 10.0, 1e-3, 1.0, 0.01)


def test_stationary_lyapunov_residual_is_zero(builtin):
    S = torch.diag(builtin.stationary_var)
    A, D = builtin.A, builtin.D
    assert torch.allclose(A @ S + S @ A.T + 2 * D, torch.zeros_like(S), atol=1e-15)


def test_learned_is_skew_psd_and_trainable():
    for full_d in (False, True):
        diff = fm.learned(4, full_d=full_d, init_noise=0.5, generator=torch.Generator().manual_seed(1))
        assert diff.learned and len(list(diff.parameters())) == 2
        assert torch.allclose(diff.Q, -diff.Q.T)
        assert torch.linalg.eigvalsh(diff.D).min() >= 1e-3 - 1e-12
    assert not fm.cld().learned and len(list(fm.cld().parameters())) == 0


@pytest.mark.parametrize(
    "Q, D, match",
    [
        ([[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], "skew-symmetric"),
        ([[0.0, -1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, -0.5]], "positive semi-definite"),
        ([[0.0, -1.0], [1.0, 0.0]], [[1.0, 0.3], [0.0, 1.0]], "symmetric"),
        ([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], "Hurwitz"),
        ([[0.0]], [[0.0, 0.0], [0.0, 1.0]], "same K x K shape"),
        ([[0.0, 1.0]], [[1.0]], "square"),
        ([[float("nan")]], [[1.0]], "non-finite"),
    ],
)
def test_invalid_pairs_name_the_violation(Q, D, match):
    with pytest.raises(ValueError, match=match):
        fm.LinearDiffusion(Q, D)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_min": -0.1}, "beta_min"),  # 0 is allowed: beta > 0 on (0, T]
        ({"beta_max": -50.0}, "beta_max"),
        ({"t_min": 0.0}, "t_min"),
        ({"t_min": 2.0}, "t_min"),
        ({"init_aux_var": 0.0}, "init_aux_var"),
        ({"stationary_var": [1.0, -1.0]}, "stationary_var"),
        ({"stationary_var": [1.0, 1.0, 1.0]}, "stationary_var"),
    ],
)
def test_invalid_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fm.LinearDiffusion([[0.0, -1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]], **kwargs)


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="K must be"):
        fm.malda(1)
    with pytest.raises(ValueError, match="K must be"):
        fm.learned(0)
    with pytest.raises(TypeError, match="floating-point"):
        fm.LinearDiffusion(torch.zeros(1, 1, dtype=torch.int64), [[0.5]])


def test_time_outside_range_and_bad_shapes_are_rejected():
    diff = fm.cld()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"t must lie in \[t_min, T\]"):
        diff.perturb(x, torch.full((4,), 1e-4))
    with pytest.raises(ValueError, match=r"t must lie"):
        diff.transition(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        diff.perturb(x, torch.rand(3) * 0.5 + 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        diff.perturb(x, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="start must be one of"):
        diff.transition(torch.tensor([0.5]), start="half")
    with pytest.raises(ValueError, match="start='full' must be a state"):
        diff.perturb(x, 0.5, start="full")
    with pytest.raises(TypeError, match="floating-point"):
        diff.perturb(torch.ones(4, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="noise must have shape"):
        diff.perturb(x, 0.5, noise=torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape must be"):
        diff.prior_sample((4,))


def test_time_ends_are_accepted_with_rounding():
    diff = fm.alda()
    t = torch.tensor([diff.t_min, diff.T], dtype=torch.float32)  # float32 rounding of 1e-3
    tk = diff.transition(t)
    assert torch.isfinite(tk.chol_inv_t).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_perturb_shapes_dtypes_and_given_noise(builtin, dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 5, generator=g).to(dtype)
    t = torch.tensor([1e-3, 0.4, 1.0])
    u, eps = builtin.perturb(x0, t, generator=g)
    assert u.shape == eps.shape == (3, builtin.K, 2, 5) and u.dtype == dtype
    tk = builtin.transition(t.double())
    a = tk.mean_coef[:, :, 0]
    expected = a[:, :, None, None] * x0.double()[:, None] + torch.einsum(
        "bkl,bl...->bk...", tk.chol, eps.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert torch.allclose(u.double(), expected, rtol=tol, atol=tol)
    u_full, _ = builtin.perturb(u, t, start="full", noise=eps)
    assert u_full.shape == u.shape


def test_perturb_statistics_match_the_kernel():
    """Mean and covariance of u_t over many draws, within 5 standard errors (hybrid start)."""
    diff = fm.malda(3)
    n = 40000
    g = torch.Generator().manual_seed(5)
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    u, eps = diff.perturb(x0, 0.05, generator=g)
    u = u[:, :, 0]
    tk = diff.transition(torch.tensor([0.05], dtype=torch.float64))
    mean, cov = tk.mean_coef[0, :, 0] * 0.7, tk.cov[0]
    se_mean = (torch.diagonal(cov) / n).sqrt()
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / n).sqrt()
    assert ((u.mean(0) - mean).abs() < 5 * se_mean).all()
    assert ((torch.cov(u.T) - cov).abs() < 5 * se_cov).all()
    assert eps.std().sub(1).abs() < 5 * math.sqrt(0.5 / eps.numel())


def test_prior_sample_and_log_prob():
    diff = fm.cld(aux_var=0.25)
    g = torch.Generator().manual_seed(2)
    u = diff.prior_sample((20000, 3), generator=g, dtype=torch.float64)
    assert u.shape == (20000, 2, 3)
    var = u.transpose(0, 1).reshape(2, -1).var(1)
    n = u.shape[0] * 3
    assert torch.allclose(var, diff.stationary_var, rtol=5 * math.sqrt(2 / n))
    lp = diff.prior_log_prob(u[:2])
    direct = torch.distributions.Normal(0, diff.stationary_var.sqrt()[None, :, None]).log_prob(u[:2]).sum((1, 2))
    assert torch.allclose(lp, direct, rtol=1e-12)


def test_default_dtype_float64_end_to_end():
    torch.set_default_dtype(torch.float64)
    diff = fm.cld()
    assert diff.prior_sample((2, 3)).dtype == torch.float64
    assert diff.transition(0.5).cov.dtype == torch.float64


@pytest.mark.parametrize("beta_max", [10.0, 0.1, 20.0])  # 0.1 = beta_min: constant β, the linear branch
def test_schedule_helpers_tau_inverse_and_phi(beta_max):
    """τ⁻¹(τ(t)) = t and φ(τ(t)) = log(e^τ − 1), against a float64 evaluation at fresh random times."""
    diff = fm.vpsde(beta_max=beta_max)
    g = torch.Generator().manual_seed(7)
    t = diff.t_min + (diff.T - diff.t_min) * torch.rand(64, dtype=torch.float64, generator=g)
    torch.testing.assert_close(diff.tau_inverse(diff.tau(t)), t, rtol=1e-13, atol=0)
    want = torch.tensor([math.log(math.expm1(float(tau))) for tau in diff.tau(t)], dtype=torch.float64)
    torch.testing.assert_close(diff.phi(t), want, rtol=1e-12, atol=1e-12)


def test_start_is_checked_at_the_public_entry_points():
    diff = fm.cld()
    x = torch.randn(3, 2)
    for call in (lambda: diff.transition(0.5, start="initial"), lambda: diff.perturb(x, 0.5, start="initial")):
        with pytest.raises(ValueError, match="start must be one of"):
            call()
