"""Samplers (fastmdm.sampling / solvers / noise_frame) against exact scores of Gaussian, single-point and
Gaussian-mixture data laws (docs/math.md §6–8)."""

import math

import pytest
import torch
from sampler_helpers import dirac_eps_model

import fastmdm as fm
from fastmdm import solvers
from fastmdm.grids import time_grid
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.noise_frame import noise_frame, rotation
from fastmdm.sampling import SOLVERS, decode, encode, run_linear, sample
from fastmdm.solvers import LinearPlan, Solver, get_solver, register_solver, transition_at

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("float64_default")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Recorder:
    """A callback that keeps every info dict."""

    def __init__(self):
        self.infos = []

    def __call__(self, info):
        self.infos.append(dict(info))

    def states(self):
        return torch.stack([info["u"] for info in self.infos])


# -- the noise frame ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [fm.cld, fm.alda, lambda: fm.malda(3)], ids=["cld", "alda", "malda3"])
def test_noise_frame_factorises_sigma_and_solves_its_ode(make):
    """K Kᵀ = Σ_t (R orthogonal) and dK/dt = β(A + DΣ⁻¹)K by a central difference (error O(h²))."""
    diff = make()
    t = torch.tensor([0.3 - 1e-5, 0.3, 0.3 + 1e-5, diff.t_min, diff.T], dtype=F64)
    R = rotation(diff, diff.tau(t))
    assert (R @ R.transpose(-1, -2) - torch.eye(diff.K, dtype=F64)).abs().max() < 1e-13
    assert (R[-1] - torch.eye(diff.K, dtype=F64)).abs().max() == 0
    K = noise_frame(diff, diff.tau(t))
    dK = (K[2] - K[0]) / 2e-5
    cov = diff.transition_f64(t[1:2]).cov[0]
    rhs = diff.beta(t[1]) * (diff.A + diff.D @ torch.linalg.inv(cov)) @ K[1]
    assert (dK - rhs).abs().max() < 1e-7 * rhs.abs().max()


# -- single-point data: the order-1 exponential integrator is exact -------------------------------
DIRAC = {"vpsde": (fm.vpsde, 1e-10), "cld": (fm.cld, 1e-10), "malda3": (lambda: fm.malda(3), 1e-10),
         "learned3": (lambda: fm.learned(3, init_noise=0.3, generator=gen(3)), 1e-10),
         # ALDA: ‖K_s K_t⁻¹‖ reaches ~1e4 on the last steps (Σ_t's x-x entry is O(τ⁵)), so rounding
         # of ~1e-14 in u amplifies to ~3e-9 of ‖L_s‖; measured 1e-13 … 3e-9 for N = 1 … 5
         "alda": (fm.alda, 1e-8)}


@pytest.mark.parametrize("name", list(DIRAC))
def test_ei_order1_exact_for_single_point(name):
    make, tol = DIRAC[name]
    diff = make()
    point = torch.randn(1, 4, generator=gen(1))
    model = dirac_eps_model(diff, point)
    ends = torch.tensor([diff.T, diff.t_min], dtype=F64)
    tk_T, tk_min = diff.transition_f64(ends[:1]), diff.transition_f64(ends[1:])
    K_T, K_min = noise_frame(diff, diff.tau(ends))
    for steps in range(1, 6):
        rec = Recorder()
        x = sample(model, diff, (3, 4), steps=steps, solver="ei-ode", order=1, generator=gen(steps), callback=rec)
        traj = rec.states()
        eps_K = torch.linalg.solve(K_T, traj[0] - tk_T.mean_coef[0, :, :1] * point)
        exact = tk_min.mean_coef[0, :, :1] * point + K_min @ eps_K
        err = (traj[-1] - exact).abs().max() / tk_min.chol.abs().max()
        assert err < tol, (steps, float(err))
        if steps == 3:  # the η = 0 ancestral step is the same map
            x_anc = sample(model, diff, (3, 4), steps=3, solver="ancestral", eta=0.0, denoise=False,
                           generator=gen(steps))
            assert (x_anc - x).abs().max() < 10 * tol * tk_min.chol.abs().max()


# -- Gaussian data: mean and covariance of the samples --------------------------------------------
GAUSS_RUNS = [  # "ei-ode" on "logsnr": the integrator's accuracy, not its few-step default grid
    ("euler-maruyama", dict(steps=200)),
    ("ei-ode", dict(steps=250, order=1, grid="logsnr")),
    ("ei-ode", dict(steps=60, order=2, grid="logsnr")),
    ("ei-ode", dict(steps=40, order=3, grid="logsnr")),
    ("ei-ode", dict(steps=150, order=2, noise="cholesky", grid="logsnr")),
    ("ancestral", dict(steps=150)),
    ("ancestral", dict(steps=150, eta=0.5)),
    ("heun", dict(steps=100)),
    ("rk45", dict(rtol=1e-3, atol=1e-3)),
    ("sscs", dict(steps=150)),
    ("ei-ode", dict(steps=60, order=3, corrector="langevin", snr=0.05, grid="logsnr")),
]


GAUSS_CASES = [("cld", s, o) for s, o in GAUSS_RUNS] + [
    (name, s, o) for name in ("vpsde", "malda3") for s, o in GAUSS_RUNS if s in ("ei-ode", "ancestral")][::2]
MAKERS = {"vpsde": fm.vpsde, "cld": fm.cld, "malda3": lambda: fm.malda(3)}


@pytest.mark.parametrize("name, solver, options", GAUSS_CASES,
                         ids=[f"{n}-{s}-{i}" for i, (n, s, _) in enumerate(GAUSS_CASES)])
def test_gaussian_target_moments(name, solver, options):
    """Per-coordinate mean and variance of the data part against the exact t_min marginal:
    |z| ≤ 5 for the mean (SE sqrt(v/n)) and the variance (SE v sqrt(2/n)), n = B. Step counts are
    chosen so that the discretisation bias stays below that bound (CLD and MALDA's order-1 steps
    shrink the variance by ~1/steps: -0.32 at 40 steps, -0.09 at 160 for CLD)."""
    diff = MAKERS[name]()
    mean, std, B = torch.tensor([0.7, -0.4]), 0.3, 1000
    x = sample(exact_score_model(GaussianMixture([1.0], mean[None], [std]), diff), diff, (B, 2), solver=solver, generator=gen(), **options)
    tk = diff.transition_f64(torch.tensor([diff.t_min], dtype=F64))
    a0 = tk.mean_coef[0, 0, 0]
    var = std**2 * a0**2 + tk.cov[0, 0, 0]
    z_mean = (x.mean(0) - a0 * mean) / (var / B).sqrt()
    z_var = (x.var(0) - var) / (var * math.sqrt(2 / B))
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5, (z_mean, z_var)


# -- convergence order on a Gaussian mixture ------------------------------------------------------
MIX = GaussianMixture([0.3, 0.7], [[1.0, 0.5], [-1.0, -0.5]], [0.3, 0.5])


@pytest.fixture(scope="module")
def vp_reference():
    diff = fm.vpsde()
    model = exact_score_model(MIX, diff)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    ref = sample(model, diff, (16, 2), solver="rk45", rtol=1e-9, atol=1e-9, generator=gen(), denoise=False)
    torch.set_default_dtype(old)
    return diff, model, ref


@pytest.mark.parametrize("options, order", [
    (dict(solver="ei-ode", order=1), 1), (dict(solver="ei-ode", order=2), 2),
    (dict(solver="ei-ode", order=3), 3), (dict(solver="ei-ode", order=2, noise="cholesky"), 2),
    (dict(solver="heun"), 2)], ids=["ei1", "ei2", "ei3", "ei2-cholesky", "heun"])
def test_convergence_order_vp(vp_reference, options, order):
    """Error of the final state against an RK45 solution at rtol 1e-9, N = 20, 40, 80 steps on "logsnr"
    (the data-SNR grids keep one step below their window): log2(e_40 / e_80) ≥ p − 0.35 (measured 0.99,
    1.86, 3.15, 1.86, 1.94)."""
    diff, model, ref = vp_reference
    errs = [(sample(model, diff, (16, 2), steps=n, grid="logsnr", denoise=False, generator=gen(), **options)
             - ref).abs().max() for n in (20, 40, 80)]
    assert errs[0] > errs[1] > errs[2]
    assert math.log2(errs[1] / errs[2]) > order - 0.35, errs


def test_convergence_cld_order1():
    """CLD, rotated order-1 EI: first order (measured log2 ratio 0.87 at 40 → 80 steps)."""
    diff = fm.cld()
    model = exact_score_model(MIX, diff)
    ref = sample(model, diff, (8, 2), steps=320, solver="ei-ode", order=3, generator=gen())
    errs = [(sample(model, diff, (8, 2), steps=n, solver="ei-ode", order=1, generator=gen()) - ref).abs().max()
            for n in (40, 80)]
    assert 0.7 < math.log2(errs[0] / errs[1]) < 1.5, errs


# -- predictions, callback, dtype, determinism ----------------------------------------------------
def test_predictions_agree():
    diff = fm.cld()
    out = [sample(exact_score_model(MIX, diff, p), diff, (8, 2), steps=8, solver=s, prediction=p, generator=gen())
           for p in ("eps", "score", "x0") for s in ("ei-ode", "heun")]
    for x in out[2:]:
        assert (x - out[0 if x is out[2] or x is out[4] else 1]).abs().max() < 1e-8


def test_callback_and_denoise():
    diff = fm.malda(3)
    model = exact_score_model(MIX, diff)
    rec = Recorder()
    x = sample(model, diff, (5, 2), steps=6, solver="ancestral", generator=gen(), callback=rec, denoise=False)
    traj = rec.states()
    assert traj.shape == (7, 5, 3, 2) and rec.infos[-1]["nfe"] == 6
    assert [info["i"] for info in rec.infos] == list(range(7))
    assert [info["nfe"] for info in rec.infos] == list(range(7))
    assert [info["t"] for info in rec.infos] == time_grid(diff, 6, "logsnr").tolist()
    assert torch.equal(traj[0], diff.prior_sample((5, 2), generator=gen()))
    assert torch.equal(traj[-1][:, 0], x)
    assert rec.infos[0]["denoised"] is None
    for info, before in zip(rec.infos[1:], rec.infos, strict=False):  # x̂₀ from the step's network call
        exact = MIX.posterior_mean(diff, before["u"], before["t"])
        assert info["denoised"].shape == (5, 2) and (info["denoised"] - exact).abs().max() < 1e-8
    rec = Recorder()
    xd = sample(model, diff, (5, 2), steps=6, solver="ancestral", generator=gen(), denoise=True, callback=rec)
    assert rec.infos[-1]["nfe"] == 6  # the final Tweedie step comes after the last report
    exact = MIX.posterior_mean(diff, traj[-1], diff.t_min)
    assert (xd - exact).abs().max() < 1e-8
    rec = Recorder()
    sample(model, diff, (5, 2), steps=6, solver="sscs", corrector="langevin", corrector_steps=2,
           generator=gen(), callback=rec)
    assert rec.infos[-1]["nfe"] == 18
    rec = Recorder()
    x = sample(model, diff, (5, 2), steps=4, solver="heun", generator=gen(), callback=rec, progress=True,
               denoise=False)
    assert [info["nfe"] for info in rec.infos] == [0, 2, 4, 6, 8] and torch.equal(rec.infos[-1]["u"][:, 0], x)
    rec = Recorder()
    x = sample(model, diff, (5, 2), steps=3, solver="rk45", generator=gen(), callback=rec, denoise=False)
    assert len(rec.infos) == 4 and rec.infos[-1]["denoised"] is None and torch.equal(rec.infos[-1]["u"][:, 0], x)


def test_initial_state_grid_tensor_t_min_and_extra_args():
    diff = fm.cld()
    model = exact_score_model(MIX, diff)
    for solver in ("ei-ode", "euler-maruyama", "heun"):
        a = sample(model, diff, (6, 2), steps=5, solver=solver, generator=gen(3))
        g = gen(3)
        u_T = diff.prior_sample((6, 2), generator=g)
        b = sample(model, diff, steps=5, solver=solver, x_T=u_T, generator=g)  # same u_T, then the same noise
        c = sample(model, diff, (6, 2), solver=solver, grid=time_grid(diff, 5, get_solver(solver).grid),
                   generator=gen(3))
        assert torch.equal(a, b) and torch.equal(a, c), solver
    # a per-call t_min is the diffusion with that t_min
    other = fm.cld(t_min=1e-2)
    a = sample(model, diff, (6, 2), steps=5, t_min=1e-2, generator=gen())
    b = sample(exact_score_model(MIX, other), other, (6, 2), steps=5, generator=gen())
    assert torch.equal(a, b)
    rec = Recorder()
    sample(model, diff, (6, 2), steps=5, solver="rk45", t_min=1e-2, generator=gen(), callback=rec)
    assert rec.infos[-1]["t"] == 1e-2
    # extra_args reach every call
    seen = []

    def conditioned(u, t, scale):
        seen.append(scale)
        return model(u, t) * scale

    a = sample(conditioned, diff, (6, 2), steps=4, extra_args={"scale": 1.0}, denoise=True, generator=gen())
    assert seen == [1.0] * 5  # 4 steps, 1 end
    assert torch.equal(a, sample(model, diff, (6, 2), steps=4, denoise=True, generator=gen()))


def probability_flow_euler_plan(diffusion, times):
    """Euler on the probability-flow ODE du/dt = β(A u + D L⁻ᵀ ε̂), backwards: Φ = I − hβA, Γ = −hβ D L⁻ᵀ."""
    h = (times[:-1] - times[1:])[:, None, None]
    beta = diffusion.beta(times[:-1])[:, None, None]
    phi = torch.eye(diffusion.K, dtype=F64) - h * beta * diffusion.A
    gamma = -h * beta * diffusion.D @ transition_at(diffusion, times[:-1]).chol_inv_t
    return LinearPlan(phi, None, gamma.unsqueeze(1), None, times[:-1].clone())


def test_registry_custom_solver(monkeypatch):
    """One plan function plus one registration (the example of docs/solvers.md), against the same Euler
    step written out as a loop."""
    monkeypatch.setattr(solvers, "_REGISTRY", dict(solvers._REGISTRY))
    register_solver(Solver("pf-euler", probability_flow_euler_plan, run_linear, steps=7, grid="uniform"))
    assert "pf-euler" in SOLVERS and fm.SOLVERS[-1] == "pf-euler"
    diff = fm.cld()
    model = exact_score_model(MIX, diff)
    x = sample(model, diff, (4, 2), solver="pf-euler", generator=gen(), denoise=False)
    times = time_grid(diff, 7, "uniform")
    u = diff.prior_sample((4, 2), generator=gen())
    for t, s in zip(times[:-1], times[1:], strict=True):
        L_inv_t = diff.transition_f64(t.view(1)).chol_inv_t[0]
        drift = diff.A @ u + diff.D @ L_inv_t @ model(u, t.expand(4))
        u = u - (t - s) * diff.beta(t) * drift
    assert (x - u[:, 0]).abs().max() < 1e-12
    with pytest.raises(ValueError, match="already registered"):
        register_solver(Solver("pf-euler", probability_flow_euler_plan, run_linear))
    with pytest.raises(TypeError, match="unknown option"):
        sample(model, diff, (4, 2), solver="pf-euler", order=2)
    with pytest.raises(ValueError, match="grid"):
        register_solver(Solver("bad", probability_flow_euler_plan, run_linear, grid="cosine"))


def test_determinism_and_float32():
    diff = fm.cld()
    model = exact_score_model(MIX, diff)
    for solver in ("euler-maruyama", "ancestral", "sscs"):
        a = sample(model, diff, (4, 2), steps=5, solver=solver, generator=gen(7))
        b = sample(model, diff, (4, 2), steps=5, solver=solver, generator=gen(7))
        c = sample(model, diff, (4, 2), steps=5, solver=solver, generator=gen(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
    x64 = sample(model, diff, (2000, 2), steps=10, generator=gen())
    torch.set_default_dtype(torch.float32)
    x32 = sample(model, diff, (2000, 2), steps=10, generator=gen())  # another prior draw: compare laws
    assert x32.dtype == torch.float32 and torch.isfinite(x32).all()
    se = (x64.var(0) / 2000).sqrt()
    assert ((x32.double().mean(0) - x64.mean(0)).abs() < 5 * math.sqrt(2) * se).all()


def test_encode_decode_round_trip():
    for diff in (fm.vpsde(), fm.cld()):
        model = exact_score_model(MIX, diff)
        x = MIX.sample(2, generator=gen())
        z, info = encode(model, diff, x, rtol=1e-5, atol=1e-5, return_info=True)
        assert z.shape == (2, diff.K, 2) and info["nfe"] > 0
        state = decode(model, diff, z, rtol=1e-5, atol=1e-5, return_state=True)
        assert (state[:, 0] - x).abs().max() < 1e-3
        assert diff.K == 1 or state[:, 1:].abs().max() < 1e-3  # the auxiliaries started at 0


# -- bad inputs -----------------------------------------------------------------------------------
def test_bad_inputs():
    diff = fm.cld()
    model = exact_score_model(MIX, diff)
    assert SOLVERS == ("euler-maruyama", "ei-ode", "ancestral", "heun", "rk45", "sscs", "ei-data")
    cases = [
        (dict(shape=(4,)), ValueError, "shape"), (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"), (dict(solver="ddim"), ValueError, "solver"),
        (dict(prediction="v"), ValueError, "prediction"), (dict(order=4), ValueError, "order"),
        (dict(grid="cosine"), ValueError, "grid"), (dict(solver="ei-ode", noise="qr"), ValueError, "noise"),
        (dict(solver="ancestral", eta=2.0), ValueError, "eta"), (dict(corrector="ald"), ValueError, "corrector"),
        (dict(solver="rk45", corrector="langevin"), ValueError, "corrector"), (dict(rtol=1e-3), TypeError, "rtol"),
        (dict(solver="rk45", rtol=0.0), ValueError, "rtol"), (dict(t_min=2.0), ValueError, "t_min"),
        (dict(grid=torch.tensor([1.0, 0.5, 0.7])), ValueError, "decreasing"),
        (dict(grid=torch.tensor([1.0, 0.5, 1e-4])), ValueError, "grid"),
        (dict(grid=torch.tensor([1.0, 0.5, 0.1]), steps=3), ValueError, "steps"),
        (dict(grid=torch.ones(2, 2)), ValueError, "grid"), (dict(extra_args=[1]), TypeError, "extra_args"),
        (dict(callback=3), TypeError, "callback"), (dict(shape=None), ValueError, "shape"),
        (dict(x_T=torch.zeros(4, 3, 2)), ValueError, "x_T"), (dict(x_T=torch.zeros(5, 2, 2)), ValueError, "x_T"),
        (dict(x_T=torch.full((4, 2, 2), math.nan)), ValueError, "x_T"),
    ]
    for kwargs, err, word in cases:
        args = dict(shape=(4, 2), steps=3)
        args.update(kwargs)
        with pytest.raises(err, match=word):
            sample(model, diff, **args)
    with pytest.raises(ValueError, match="shape"):
        sample(lambda u, t: u[:, :1], diff, (4, 2), steps=2)
    with pytest.raises(TypeError, match="model"):
        sample(3, diff, (4, 2))
    with pytest.raises(TypeError, match="diffusion"):
        sample(model, "cld", (4, 2))
