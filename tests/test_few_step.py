"""Few-step sampling: the data-prediction multistep solver "ei-data" and the "datasnr" grids, against
exact scores of single-point, Gaussian and sharp-mixture data laws (docs/math.md §7–8)."""

import math

import pytest
import torch
from sampler_helpers import dirac_eps_model

import fastmdm as fm
from fastmdm.data_multistep import data_multistep_order
from fastmdm.grids import (
    DATA_ORDER3_STEPS,
    DATA_SNR_MAX_WARP,
    DATA_SNR_WINDOW,
    EPS_SNR_BOTTOM,
    EPS_SNR_MAX_WARP,
    FEW_STEPS,
    FEW_STEPS_WINDOW,
    GRIDS,
    OUTSIDE_DENSITY,
    data_log_snr,
    data_snr_warp,
    eps_snr_warp,
    time_grid,
)
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.noise_frame import noise_frame, rotation
from fastmdm.sampling import sample
from fastmdm.solvers import default_solver, flow, transition_at

F64 = torch.float64
EPS = torch.finfo(F64).eps

pytestmark = pytest.mark.usefixtures("float64_default")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


MAKERS = {"vpsde": fm.vpsde, "cld": fm.cld, "malda3": lambda: fm.malda(3), "alda": fm.alda,
          "learned3": lambda: fm.learned(3, init_noise=0.3, generator=gen(3))}


def final_state(model, diffusion, x_T, **options):
    """The state at the grid's end (the last callback's "u")."""
    states = []
    sample(model, diffusion, x_T=x_T, callback=lambda info: states.append(info["u"]), **options)
    return states[-1]


# -- the datasnr grids ----------------------------------------------------------------------------
SNR_GRIDS = {  # kind: (window at N steps, κ_N)
    "datasnr": (lambda n: FEW_STEPS_WINDOW if n <= FEW_STEPS else DATA_SNR_WINDOW, data_snr_warp),
    "datasnr-eps": (lambda n: (EPS_SNR_BOTTOM, DATA_SNR_WINDOW[1]), eps_snr_warp)}


@pytest.mark.parametrize("kind", list(SNR_GRIDS))
@pytest.mark.parametrize("name", list(MAKERS))
def test_datasnr_grid_is_uniform_in_warped_clipped_log_snr(name, kind):
    """Exact ends, strictly decreasing, and e^{−κ_N g} equally spaced (g itself at κ_N = 0), g(λ) = clip(λ, b, c)
    + ν (λ − clip(λ)) (ν = OUTSIDE_DENSITY below and above the window), to the dense table's interpolation error, for 1, 2, 5, 6, 8, 10 and 20 steps
    ("datasnr": [b, c] = [−1, 3.75] up to 5 steps, [−1.5, 5] from 6)."""
    diff = MAKERS[name]()
    window, warp = SNR_GRIDS[kind]
    for steps in (1, 2, 5, 6, 8, 10, 20):
        t = time_grid(diff, steps, kind)
        assert t.shape == (steps + 1,) and t[0] == diff.T and t[-1] == diff.t_min
        assert (t[1:] < t[:-1]).all()
        lam = data_log_snr(diff, t)
        inside = lam.clamp(*window(steps))
        below, above = OUTSIDE_DENSITY
        g = inside + torch.where(lam < inside, below, above) * (lam - inside)
        kappa = warp(steps)
        w = g if kappa == 0 else -torch.exp(-kappa * (g - g[0])) / kappa
        gaps = w[1:] - w[:-1]
        assert (gaps - gaps.mean()).abs().max() < 1e-3 * gaps.mean() + 1e-4, (steps, gaps)


def test_datasnr_warp_only_for_order_two():
    """κ_N: none up to 7 steps and from DATA_ORDER3_STEPS on (order 3: uniform in g), half of DATA_SNR_MAX_WARP at
    8, all of it at 9–11; CLD's inner λ-steps at 10 steps grow by e^{κ Δλ}, Δλ ≈ 4.4 between the first and last
    (measured 0.42 → 0.99)."""
    assert [data_snr_warp(n) for n in (1, 5, 7, DATA_ORDER3_STEPS, 20)] == [0.0] * 5
    assert data_snr_warp(8) == DATA_SNR_MAX_WARP / 2
    assert data_snr_warp(9) == data_snr_warp(10) == data_snr_warp(DATA_ORDER3_STEPS - 1) == DATA_SNR_MAX_WARP
    assert data_multistep_order(DATA_ORDER3_STEPS - 1) == 2 and data_multistep_order(DATA_ORDER3_STEPS) == 3
    diff = fm.cld()
    lam = data_log_snr(diff, time_grid(diff, 10, "datasnr"))
    gaps = lam[1:] - lam[:-1]
    inner = gaps[1:-1]  # both ends reach outside the window
    assert (inner[1:] > inner[:-1]).all() and 2.0 < float(inner[-1] / inner[0]) < 2.6, gaps


def test_data_log_snr_of_vp_is_log_alpha_over_sigma():
    diff = fm.vpsde()
    t = torch.tensor([diff.t_min, 0.1, 0.5, diff.T], dtype=F64)
    tau = diff.tau(t)
    expected = -0.5 * tau - 0.5 * torch.log(-torch.expm1(-tau))
    assert (data_log_snr(diff, t) - expected).abs().max() < 1e-12


# -- single-point data law: order 1 exact to rounding on every grid ---------------------------
def rounding_floor(diffusion, times, size):
    """ε·(Σ_n ‖L_{n+1}⁻¹ Φ_n L_n‖ + ‖L_N⁻¹‖)·size: rounding of ε̂ at step n, seen through the step, and of the
    final state, in noise units at the end. One step from T costs ‖L_N⁻¹ Φ L_0‖ ≈ 3e11 (ALDA), 8e8 (CLD):
    ε̂ at T fixes x₀ only to ε/‖L_T⁻¹a_T‖, however accurate R_t is."""
    L = transition_at(diffusion, times).chol
    tau = diffusion.tau(times)
    steps = torch.linalg.solve_triangular(L[1:], flow(diffusion, tau[1:], tau[:-1]) @ L[:-1], upper=False)
    norms = torch.linalg.matrix_norm(steps, 2).sum() + torch.linalg.matrix_norm(torch.linalg.inv(L[-1]), 2)
    return EPS * float(norms) * size


@pytest.mark.parametrize("name", list(MAKERS))
def test_order1_exact_for_single_point_on_every_grid(name):
    """ei-ode and ei-data at order 1 (with and without the corrector), 1–4 steps, every named grid: the endpoint
    u_N = a x* + K_N K_T⁻¹(u_T − a_T x*) in noise units L_N⁻¹(u_N − exact) within 20× the rounding floor
    (measured ≤ 5.7×); orders 2–3 of ei-data add corrections whose weights sum to zero, so they stay exact too (to 1e-10 of ‖L_N‖,
    ALDA 1e-5: the corrections of its last step are ~e^λ = 3e10 times the rounding of x̂₀)."""
    diff = MAKERS[name]()
    point = torch.randn(1, 4, generator=gen(1))
    model = dirac_eps_model(diff, point)
    for grid in GRIDS:
        for steps in range(1, 5):
            times = time_grid(diff, steps, grid)
            tk_T, tk_N = transition_at(diff, times[:1]), transition_at(diff, times[-1:])
            K_T, K_N = noise_frame(diff, diff.tau(times[[0, -1]]))
            u_T = diff.prior_sample((3, 4), generator=gen(steps))
            exact = tk_N.mean_coef[0, :, :1] * point + K_N @ torch.linalg.solve(K_T, u_T - tk_T.mean_coef[0, :, :1] * point)
            floor = rounding_floor(diff, times, max(1.0, float(point.abs().max()), float(u_T.abs().max())))
            for solver, order, options in (("ei-ode", 1, {}), ("ei-data", 1, {"correct": False}), ("ei-data", 1, {}),
                                           ("ei-data", 2, {}), ("ei-data", 3, {})):
                u = final_state(model, diff, u_T, solver=solver, order=order, grid=times, **options)
                if order == 1:
                    err = (tk_N.chol_inv_t[0].mT @ (u - exact)).abs().max()
                    assert err < 20 * floor, (grid, steps, solver, float(err), floor)
                else:
                    err = (u - exact).abs().max() / tk_N.chol.abs().max()
                    assert err < (1e-5 if name == "alda" else 1e-10), (grid, steps, order, float(err))


def test_rotation_on_one_long_interval_matches_a_dense_solve():
    """R(t_min) from the single interval [τ(t_min), τ(T)] agrees with R from 400 levels to 1e-13: the
    one-step miss of the test above is the map's conditioning, not R's collocation."""
    for make in (fm.cld, fm.alda, lambda: fm.malda(3)):
        diff = make()
        tau = diff.tau(torch.tensor([diff.t_min, diff.T], dtype=F64))
        dense = torch.logspace(float(tau[0].log10()), float(tau[1].log10()), 400, dtype=F64)
        assert (rotation(diff, tau[:1])[0] - rotation(diff, dense)[0]).abs().max() < 1e-13


# -- Gaussian data: convergence order -------------------------------------------------------------
GAUSS = GaussianMixture([1.0], torch.tensor([[1.0, -0.5]], dtype=F64), [0.3])


@pytest.mark.parametrize("name", ["vpsde", "cld", "malda3"])
def test_convergence_order_on_gaussian(name):
    """ei-data orders p = 1–3 on the logsnr grid against RK45 at rtol 1e-8: log2(e_40 / e_80) ≥ p − 0.4
    without the corrector (measured against a 1280-step solution: 0.98 / 2.05 / 3.03 VP, 0.88 / 2.09 / 2.75
    CLD, 0.87 / 2.00 / 3.05 MALDA(3)), ≥ p + 1 − 0.4 with it (measured 2.0 / 3.15 / 4.03 CLD, 2.0 / 3.16 / 4.13
    MALDA(3); VP from order 2 on reaches the reference's own error at 40 steps, so order 1 only: 2.05)."""
    diff = MAKERS[name]()
    model = exact_score_model(GAUSS, diff)
    u_T = diff.prior_sample((32, 2), generator=gen())
    ref = sample(model, diff, x_T=u_T, solver="rk45", rtol=1e-8, atol=1e-8, denoise=False)
    for correct in (False, True):
        for order in (1,) if correct and name == "vpsde" else (1, 2, 3):
            errs = [float((sample(model, diff, x_T=u_T, steps=n, solver="ei-data", order=order, correct=correct,
                                  grid="logsnr") - ref).abs().mean()) for n in (40, 80)]
            assert math.log2(errs[0] / errs[1]) > order + correct - 0.4, (order, correct, errs)



def test_datasnr_grid_converges_far_below_its_window():
    """A learned (3) diffusion starts at λ_T ≈ −5, far below "datasnr"'s window: the steps there must shrink
    with N too, so "ei-data" (corrected, order 3) converges on a sharp Gaussian (std 0.05): log2(e_40 / e_80) ≥ 1.5
    against RK45 at rtol 1e-10 (measured 2.35; 0.76 with the density 0.02 below the window, where one step
    spanned λ ∈ [−5, −1.5] up to 80 steps)."""
    diff = fm.learned(3, full_d=True, init_noise=0.5, generator=gen(0))
    assert float(data_log_snr(diff, torch.tensor([diff.T]))[0]) < DATA_SNR_WINDOW[0] - 3
    model = exact_score_model(GaussianMixture([1.0], [[0.0]], [0.05]), diff)
    u_T = diff.prior_sample((64, 1), generator=gen())
    ref = sample(model, diff, x_T=u_T, solver="rk45", rtol=1e-10, atol=1e-10, denoise=False)
    errs = [float((sample(model, diff, x_T=u_T, steps=n, solver="ei-data") - ref).abs().max()) for n in (40, 80)]
    assert math.log2(errs[0] / errs[1]) > 1.5, errs

# -- large steps ------------------------------------------------------------------------------------
def test_eps_warp_grows_with_the_steps():
    """"datasnr-eps": κ_N = 0.1 + N/100 up to EPS_SNR_MAX_WARP (from 20 steps), and its window starts lower than
    "datasnr"'s: VP's λ-steps at 10 steps grow from the first inner step to the last."""
    assert eps_snr_warp(5) == pytest.approx(0.15) and eps_snr_warp(10) == pytest.approx(0.2)
    assert eps_snr_warp(20) == EPS_SNR_MAX_WARP == eps_snr_warp(100) and EPS_SNR_BOTTOM < DATA_SNR_WINDOW[0]
    diff = fm.vpsde()
    lam = data_log_snr(diff, time_grid(diff, 10, "datasnr-eps"))
    gaps = lam[1:] - lam[:-1]
    inner = gaps[1:]  # the first step reaches below the window
    assert (inner[1:] > inner[:-1]).all() and float(inner[-1] / inner[0]) > 2, gaps


SHARP = GaussianMixture([1 / 8] * 8, 1.5 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                                         torch.sin(torch.arange(8) * math.pi / 4)], 1).to(F64),
                        [0.05] * 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, solver", [(name, "ei-data") for name in MAKERS] + [
    (name, "ei-ode") for name in ("vpsde", "learned3")])  # "ei-ode": where it is the default
def test_few_steps_stay_finite_and_near_the_modes(name, solver, dtype):
    """Sharp 8-mode mixture (std 0.05 on a circle of radius 1.5), 1, 2 and 5 steps, the solver's default options
    (ei-data: order 3, datasnr grid; ei-ode: order 2, datasnr-eps), state in float64 and float32: finite, and
    with 5 steps every sample lies within 0.5 of a mode centre."""
    torch.set_default_dtype(dtype)
    diff = MAKERS[name]()
    model = exact_score_model(SHARP, diff)
    for steps in (1, 2, 5):
        x = sample(model, diff, (256, 2), steps=steps, solver=solver, generator=gen())
        assert x.dtype == dtype and torch.isfinite(x).all(), steps
    nearest = torch.cdist(x.double(), SHARP.means).min(1).values
    assert nearest.max() < 0.5, float(nearest.max())



def test_default_solver_by_diffusion_and_steps():
    """"ei-data" wherever noise reaches x only through auxiliaries; where it is on x (VP, learned), "ei-data" at the
    8–11 steps of its warped grid and "ei-ode" elsewhere (its 20 steps when none are given); ``sample`` without a
    solver runs exactly that one, the steps read from ``steps`` or from a tensor grid."""
    for name in ("cld", "alda", "malda3"):
        diff = MAKERS[name]()
        assert {default_solver(diff, diff.t_min, n) for n in (None, 1, 5, 8, 10, 12, 20)} == {"ei-data"}
    for name in ("vpsde", "learned3"):
        diff = MAKERS[name]()
        chosen = {n: default_solver(diff, diff.t_min, n) for n in (None, 1, 5, 7, 8, 9, 10, 11, 12, 20)}
        assert [n for n, s in chosen.items() if s == "ei-data"] == [8, 9, 10, 11], chosen
        assert all(data_snr_warp(n) > 0 for n in (8, 11)) and data_snr_warp(7) == data_snr_warp(12) == 0
    diff = MAKERS["vpsde"]()
    model = exact_score_model(SHARP, diff)
    u_T = diff.prior_sample((64, 2), generator=gen())
    for steps, solver in ((10, "ei-data"), (12, "ei-ode")):
        expected = sample(model, diff, x_T=u_T, steps=steps, solver=solver)
        assert torch.equal(sample(model, diff, x_T=u_T, steps=steps), expected)
        grid = time_grid(diff, steps, "datasnr")
        assert torch.equal(sample(model, diff, x_T=u_T, grid=grid), sample(model, diff, x_T=u_T, grid=grid,
                                                                            solver=solver))
    with pytest.raises(ValueError, match="steps"):
        default_solver(diff, diff.t_min, 0)

def test_options_are_checked():
    model = exact_score_model(GAUSS, fm.cld())
    with pytest.raises(ValueError, match="order"):
        sample(model, fm.cld(), (2, 2), steps=3, solver="ei-data", order=4)
    with pytest.raises(TypeError, match="noise"):
        sample(model, fm.cld(), (2, 2), steps=3, solver="ei-data", noise="rotated")
    with pytest.raises(TypeError, match="correct"):
        sample(model, fm.cld(), (2, 2), steps=3, solver="ei-data", correct=1)


def test_corrector_retakes_each_step_without_extra_calls():
    """The corrector costs no network call (NFE = steps), changes the result, and its default order follows
    the number of steps (2 below DATA_ORDER3_STEPS, then 3): the default run equals the explicit one."""
    diff = fm.cld()
    exact = exact_score_model(SHARP, diff)
    calls = []

    def model(u, t):
        calls.append(t)
        return exact(u, t)

    u_T = diff.prior_sample((64, 2), generator=gen())
    for steps in (6, DATA_ORDER3_STEPS):
        calls.clear()
        x = sample(model, diff, x_T=u_T, steps=steps, solver="ei-data")
        assert len(calls) == steps
        same = sample(exact, diff, x_T=u_T, steps=steps, solver="ei-data", order=data_multistep_order(steps))
        plain = sample(exact, diff, x_T=u_T, steps=steps, solver="ei-data", correct=False)
        assert torch.equal(x, same) and (x - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["cld", "alda"])
def test_float32_state_follows_float64(name):
    """The same prior draw sampled in float32 and float64 (10 steps, sharp mixture): median gap ≤ 1e-5,
    largest ≤ 1e-2 (near a boundary between modes; measured 2e-7 and 2e-5)."""
    x_T = MAKERS[name]().prior_sample((256, 2), generator=gen())
    out = []
    for dtype in (torch.float64, torch.float32):
        torch.set_default_dtype(dtype)
        diff = MAKERS[name]()
        out.append(sample(exact_score_model(SHARP, diff), diff, x_T=x_T.to(dtype), steps=10, solver="ei-data",
                          denoise=False).double())
    gap = (out[1] - out[0]).abs()
    assert gap.median() < 1e-5 and gap.max() < 1e-2, (float(gap.median()), float(gap.max()))
