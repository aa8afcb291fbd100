"""Samplers for any linear MDM: ``sample``, ``encode``, ``decode`` (docs/math.md §6–7).

``sample(model, diffusion, shape, …)`` draws u_T ~ N(0, Σ∞) (or starts from ``x_T``) and integrates
the reverse SDE or the probability-flow ODE down to t_min with a solver of the registry
(:mod:`fastmdm.solvers`, docs/solvers.md); ``model(u, t)`` is any callable over the state
(B, K, *data_shape) that predicts "eps" (the hybrid-start Cholesky noise), "score" or "x0".
All K×K step coefficients are built once per grid in float64 (cached) and the loops here only apply
them: no transition kernels, no host synchronisation and fixed shapes inside the loop of the
fixed-grid solvers, so the loop can be captured in a CUDA graph (see ``sample``).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import resolve_model
from .data_multistep import check_data_multistep, data_multistep_plan, run_data_multistep
from .diffusion import TIME_SLACK, LinearDiffusion
from .fields import probability_flow_drift
from .grid_search import NAMED_GRIDS, optimized_grid
from .grids import time_grid
from .noise_frame import diffusion_key
from .ode import odeint_adaptive
from .ops import apply_kk, compute_dtype
from .parameterization import AffineMap, denoised_weights, get_parameterization
from .sde_step import sde_step
from .solvers import (
    SOLVERS,
    AdaptivePlan,
    HeunPlan,
    LinearPlan,
    Solver,
    adaptive_plan,
    ancestral_plan,
    check_ei_ode,
    check_eta,
    check_tolerances,
    default_solver,
    effective_horizon,
    ei_ode_plan,
    euler_maruyama_plan,
    get_solver,
    heun_plan,
    register_solver,
    sscs_plan,
    transition_at,
)
from .stages import staged
from .validation import (
    check_callable,
    check_choice,
    check_finite,
    check_instance,
    check_int,
    check_like,
    check_number,
    check_shape,
)

CORRECTORS = (None, "langevin")
DENOISE_MIN_VARIANCE = 1e-8  # Σ_xx at the end below this: the state's x is x̂₀ to √1e-8 already
_PLAN_CACHE_SIZE = 32
_plans: OrderedDict = OrderedDict()


def _check_full_score(prediction: str, solver: str, entry: Solver, corrector, denoise: bool) -> None:
    """A prediction that gives only D·s (CLD-SGM's velocity score) runs only where that suffices."""
    if get_parameterization(prediction).full_score:
        return
    usable = [name for name in SOLVERS if not get_solver(name).full_score]
    if entry.full_score:
        raise ValueError(f"solver {solver!r} needs the whole score, but prediction {prediction!r} gives only "
                         f"D·s (e.g. CLD-SGM's velocity score); use one of the solvers {usable}")
    if corrector is not None or denoise:
        raise ValueError(f"corrector={corrector!r} and denoise={denoise} need the whole score, but "
                         f"prediction {prediction!r} gives only D·s: pass corrector=None, denoise=False")


def _check_start(diffusion: LinearDiffusion, shape, x_T, device) -> tuple[tuple[int, ...], torch.device]:
    """(shape, device) of the run; with x_T: a finite float state (B, K, *data_shape) matching ``shape``."""
    if x_T is None:
        if shape is None:
            raise ValueError("shape (B, *data_shape) is required unless x_T is given")
        device = torch.device(device) if device is not None else diffusion.stationary_var.device
        return check_shape(shape), device
    diffusion.check_state(x_T, "x_T")
    check_finite(x_T, "x_T")
    state_shape = (x_T.shape[0], *x_T.shape[2:])
    if shape is not None and check_shape(shape) != state_shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, which does not match shape={tuple(shape)}")
    if device is not None and torch.device(device).type != x_T.device.type:
        raise ValueError(f"x_T is on {x_T.device} but device={device!r}")
    return state_shape, x_T.device


def default_denoise(diffusion: LinearDiffusion, end: float, prediction: str, solver: Solver) -> bool:
    """Denoise by default where it changes the sample: Var(x_t | x₀) at the end, Σ_xx, above
    DENOISE_MIN_VARIANCE (VP-SDE: 1e-4 at t_min 1e-3). An MDM whose data variable gets its noise
    only through the auxiliaries has Σ_xx ~ τ³ or smaller (CLD 1e-12): its state is the denoised
    end already, and the extra network call would only cost a step (benchmarks/results/denoised-end.md).
    "ei-ode" and "ei-data" end on the state: their last step beats a Tweedie call at equal NFE
    (benchmarks/results/quality-2026-12-01.md)."""
    if not (solver.denoise and get_parameterization(prediction).full_score):
        return False
    cov = transition_at(diffusion, torch.tensor([end], dtype=torch.float64)).cov
    return float(cov[0, 0, 0]) > DENOISE_MIN_VARIANCE


def _check_t_min(diffusion: LinearDiffusion, t_min) -> float:
    """The run's end time: the diffusion's t_min, or a float in (0, T)."""
    if t_min is None:
        return diffusion.t_min
    if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0 < t_min < diffusion.T:
        raise ValueError(f"t_min must be a number in (0, T = {diffusion.T}), got {t_min!r}")
    return float(t_min)


def _times(diffusion: LinearDiffusion, solver: Solver, steps, grid, t_min: float) -> Tensor:
    """The run's float64 grid T ≥ t_0 > … > t_N ≥ t_min: a named grid from the effective horizon
    t_0 = t_eff (``solvers.effective_horizon``), or the user's tensor checked."""
    if not isinstance(grid, Tensor):
        grid = solver.grid if grid is None else grid
        if grid not in NAMED_GRIDS:
            raise ValueError(f"grid must be one of {NAMED_GRIDS} or a 1-D tensor of times, got {grid!r}")
        t_eff = effective_horizon(diffusion)
        steps = check_int(solver.steps if steps is None else steps, "steps")
        t_max = t_eff if t_eff > t_min else diffusion.T
        if grid == "optimized":
            return optimized_grid(diffusion, steps, t_min, t_max)
        return time_grid(diffusion, steps, grid, t_min, t_max)
    if grid.dim() != 1 or grid.numel() < 2 or not grid.is_floating_point():
        raise ValueError(f"grid must be a 1-D float tensor of at least 2 times, got shape "
                         f"{tuple(grid.shape)} and dtype {grid.dtype}")
    times = grid.detach().to(device="cpu", dtype=torch.float64).clone()
    if not (torch.isfinite(times).all() and (times[1:] < times[:-1]).all()):
        raise ValueError("grid must be finite and strictly decreasing (from T down to t_min)")
    lo, hi = float(times[-1]), float(times[0])
    if not (lo >= t_min * (1 - TIME_SLACK) and hi <= diffusion.T * (1 + TIME_SLACK)):
        raise ValueError(f"grid must lie in [t_min, T] = [{t_min}, {diffusion.T}], got [{lo}, {hi}]")
    if steps is not None and check_int(steps, "steps") != times.numel() - 1:
        raise ValueError(f"steps={steps} does not match the grid's {times.numel() - 1} steps")
    return times.clamp_(t_min, diffusion.T)


def _with_extra_args(model, extra_args) -> Callable:
    """model(u, t, **extra_args) as a two-argument callable."""
    if extra_args is None:
        return model
    check_instance(extra_args, dict, "extra_args")
    return functools.partial(model, **extra_args) if extra_args else model


@staged("sample.plan")
def _plan(diffusion: LinearDiffusion, solver: Solver, times: Tensor, prediction: str, options: dict):
    """(plan, ε̂ map at its evaluation times, ε̂ map on the grid) for one solver and grid, cached by value."""
    key = (diffusion_key(diffusion), solver, times.numpy().tobytes(), prediction, tuple(options.items()))
    if key in _plans:
        _plans.move_to_end(key)
        return _plans[key]
    plan = solver.plan(diffusion, times, **options)
    eval_times = getattr(plan, "eval_times", None)
    value = (plan, None if eval_times is None else _eps_map(diffusion, eval_times, prediction),
             _eps_map(diffusion, times, prediction) if solver.corrector else None)
    _plans[key] = value
    if len(_plans) > _PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return value


def _eps_map(diffusion: LinearDiffusion, times: Tensor, prediction: str) -> AffineMap:
    """ε̂ = E_out·y + E_state·u at each of ``times`` (docs/math.md §3), float64 on CPU."""
    return get_parameterization(prediction).eps_map(transition_at(diffusion, times))


def non_finite_output(solver: str, step: int, t: float, nfe: int) -> FloatingPointError:
    """The error for a model output with NaN or infinite entries."""
    return FloatingPointError(
        f"the model returned NaN or infinite values at step {step} of solver {solver!r} "
        f"(t = {t:.6g}, network evaluation {nfe}); check the model's weights and its output near this t")


class _Network:
    """model(u, t) with t a (B,) tensor in the state's dtype; returns the checked output y, counts NFE.

    Non-finite outputs: on CPU one isfinite reduction per call raises at once; on CUDA (no host
    synchronisation inside the loop) the first bad call's index and t are recorded on the device and
    ``check_finite`` raises after the loop. ``step`` is the solver step the loop is in.
    """

    def __init__(self, model, prediction: str, u: Tensor, solver: str = "sample"):
        self.model, self.prediction, self.nfe, self.solver, self.step = model, prediction, 0, solver, 0
        self.param = get_parameterization(prediction)
        self.batch, self.device, self.dtype = u.shape[0], u.device, u.dtype
        self._steps: list[int] = []  # CUDA: the step of each call, indexed by the recorded call
        self._first_bad = self._bad_t = None

    def times(self, times: Tensor) -> Tensor:
        """A (len(times), B) table of model times, built before a loop."""
        return times.to(device=self.device, dtype=self.dtype)[:, None].expand(-1, self.batch).contiguous()

    @staged("sample.network")
    def __call__(self, u: Tensor, t: Tensor) -> Tensor:
        y = self.param.output(self.model(u, t), u)
        finite = torch.isfinite(y).all()
        if y.is_cuda:
            if self._first_bad is None:
                self._first_bad = torch.full((), -1, dtype=torch.int64, device=y.device)
                self._bad_t = torch.zeros((), dtype=torch.float64, device=y.device)
            first = ~finite & (self._first_bad < 0)
            self._first_bad = torch.where(first, self.nfe, self._first_bad)
            self._bad_t = torch.where(first, t[0].to(torch.float64), self._bad_t)
            self._steps.append(self.step)
        elif not finite:
            raise non_finite_output(self.solver, self.step, float(t[0]), self.nfe + 1)
        self.nfe += 1
        return y

    def check_finite(self) -> None:
        """Raise for the first non-finite output recorded on CUDA (one host synchronisation)."""
        if self._first_bad is not None and (first := int(self._first_bad)) >= 0:
            raise non_finite_output(self.solver, self._steps[first], float(self._bad_t), first + 1)


def _to_eps(y: Tensor, u: Tensor, emap: AffineMap, n: int) -> Tensor:
    """ε̂ at the n-th time of ``emap``'s grid from a network output y (y itself for "eps")."""
    if emap.out is None and emap.state is None:
        return y
    return AffineMap(*(None if m is None else m[n].to(u.device) for m in emap)).apply(y, u).to(u.dtype)


class _Denoiser:
    """x̂₀ = wᵀ(L⁻¹u − ε̂) at the n-th of ``times`` (Tweedie, GLS projection onto the data direction)."""

    def __init__(self, diffusion: LinearDiffusion, times: Tensor, u: Tensor):
        tk = transition_at(diffusion, times)
        self.L_inv = tk.chol_inv_t.mT.to(u.device)
        self.w = denoised_weights(tk).to(device=u.device, dtype=compute_dtype(u.dtype))

    def __call__(self, n: int, u: Tensor, eps: Tensor) -> Tensor:
        """In float32 for float16/bfloat16 u (L⁻¹u overflows them near t_min), returned in u's dtype."""
        white = apply_kk(self.L_inv[n], u.to(self.w.dtype)) - eps.to(self.w.dtype)
        return torch.einsum("k,bk...->b...", self.w[n], white).to(u.dtype)


class Loop:
    """What a solver's loop shares with ``sample``: the network and its ε̂ maps, the generator, and
    ``end_step``, which runs the corrector and reports each step to the progress bar and the callback."""

    def __init__(self, net: _Network, diffusion: LinearDiffusion, times: Tensor, eval_times: Tensor | None,
                 eval_map, generator, corrector, callback, bar):
        self.net, self.diffusion, self.times = net, diffusion, times
        self.eval_times, self.eval_map = eval_times, eval_map
        self.generator, self.corrector, self.callback, self.bar = generator, corrector, callback, bar
        self._t = times.tolist()
        self._denoiser = None

    def eps(self, u: Tensor, t: Tensor, n: int) -> Tensor:
        """ε̂ at the plan's n-th evaluation time (t: its (B,) row of ``net.times(plan.eval_times)``)."""
        return _to_eps(self.net(u, t), u, self.eval_map, n)

    def report(self, i: int, u: Tensor, denoised: Tensor | None = None) -> None:
        if self.callback is not None:
            self.callback({"i": i, "t": self._t[i], "u": u, "denoised": denoised, "nfe": self.net.nfe})

    def end_step(self, u: Tensor, n: int, u_eval: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
        """After step n: corrector at t_{n+1}, then the reports ("denoised" from u_eval, eps at the n-th
        evaluation time of the plan)."""
        if self.corrector is not None:
            u = self.corrector(u, n + 1)
        self.net.step = n + 1
        self.bar.update()
        denoised = None
        if self.callback is not None and eps is not None and self.net.param.full_score:
            if self._denoiser is None:
                self._denoiser = _Denoiser(self.diffusion, self.eval_times, u)
            denoised = self._denoiser(n, u_eval, eps)
        self.report(n + 1, u, denoised)
        return u


def _noise_seeds(steps: int, generator, device) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**31 - 1, (steps,), generator=generator, device=gen_device).to(device)


def run_linear(loop: Loop, plan: LinearPlan, u: Tensor) -> Tensor:
    """The loop u ← Φ (u + Λ ε̂_n) + Σ_j Γ_j ε̂_{n−j} + C ξ of the fixed-grid solvers (a fused step)."""
    N, H = plan.gamma.shape[0], plan.gamma.shape[1]
    coefs, noisy = plan.packed()
    coefs = coefs.to(u.device)  # (N, 3+H, K, K)
    pre = None
    if plan.pre_phi is not None:
        pre = torch.stack([plan.pre_phi, plan.pre_noise], 1).to(u.device)
    seeds = _noise_seeds(2 * N, loop.generator, u.device)
    t_eval = loop.net.times(plan.eval_times)
    history: list[Tensor] = []
    for n in range(N):
        if pre is not None:
            u = sde_step(u, [], pre[n], seeds, N + n, True, loop.generator)
        eps = loop.eps(u, t_eval[n], n)
        history = [eps, *history][:H]
        u_eval = u
        u = sde_step(u, history, coefs[n, : 3 + len(history)], seeds, n, noisy[n], loop.generator)
        u = loop.end_step(u, n, u_eval, eps)
    return u


def run_heun(loop: Loop, plan: HeunPlan, u: Tensor) -> Tensor:
    """Heun on du/dρ = J_n u + B_n ε̂: predictor u + Δρ k₁, corrector u + Δρ/2 (k₁ + k₂)."""
    J, Bm = plan.state.to(u.device), plan.eps.to(u.device)
    N = plan.drho.numel()
    drho = plan.drho.tolist()
    t_eval = loop.net.times(plan.times)
    for n in range(N):
        eps = loop.eps(u, t_eval[n], n)
        k1 = apply_kk(J[n], u) + apply_kk(Bm[n], eps)
        guess = u + drho[n] * k1
        eps2 = loop.eps(guess, t_eval[n + 1], n + 1)
        u_eval = u
        u = u + (0.5 * drho[n]) * (k1 + apply_kk(J[n + 1], guess) + apply_kk(Bm[n + 1], eps2))
        u = loop.end_step(u, n, u_eval, eps)
    return u


def run_adaptive(loop: Loop, plan: AdaptivePlan, u: Tensor) -> Tensor:
    """Dormand–Prince on the probability-flow ODE in ρ = log τ; each output-grid state is reported
    after the solve, with the solve's NFE and no denoised estimate."""
    counter = [0]
    span = (float(plan.times[-1]), float(plan.times[0]))
    rate = _log_tau_flow(loop.net.model, loop.diffusion, loop.net.prediction, counter, span, "rk45")
    states, _ = odeint_adaptive(rate, u, _rho(loop.diffusion, plan.times), rtol=plan.rtol, atol=plan.atol)
    loop.net.nfe = counter[0]
    for n, state in enumerate(states[1:]):
        loop.end_step(state, n)
    return states[-1]


def _log_tau_flow(model, diffusion: LinearDiffusion, prediction: str, counter: list,
                  span: tuple[float, float], solver: str):
    """du/dρ = (τ/β) h(u, t(ρ)) for ρ = log τ, t ∈ span, h the probability-flow drift (fastmdm.likelihood).

    A non-finite h raises (the adaptive solver synchronises every step anyway); ``solver`` names the
    caller in the error, the step being the evaluation count."""
    drift = probability_flow_drift(model, diffusion, prediction)

    def rate(rho: float, u: Tensor) -> Tensor:
        tau = torch.tensor([math.exp(rho)], dtype=torch.float64)
        t = float(diffusion.tau_inverse(tau).clamp(*span)[0])
        counter[0] += 1
        h = drift(u, t)
        if not torch.isfinite(h).all():
            raise non_finite_output(solver, counter[0], t, counter[0])
        return h * (float(tau[0]) / float(diffusion.beta(torch.tensor(t))))

    return rate


def _rho(diffusion: LinearDiffusion, times) -> list[float]:
    return diffusion.tau(torch.as_tensor(times, dtype=torch.float64)).log().tolist()


def _langevin_corrector(net: _Network, diffusion: LinearDiffusion, times: Tensor, grid_map, snr: float,
                        steps: int, generator, u: Tensor):
    """Preconditioned Langevin at t_n: z = L⁻¹u ← z − η ε̂ + sqrt(2η) ξ, η = 2 (snr ‖ξ‖ / ‖ε̂‖)².

    With the preconditioner Σ_t = L Lᵀ this is u ← u + η Σ_t s + sqrt(2η) L ξ, a Langevin chain for p_t
    whose step is well scaled in every variable (Song et al.'s rule in whitened coordinates; the norms
    are batch means as in their code — a per-sample η depends on the state and biases the chain).
    """
    chol = transition_at(diffusion, times).chol.to(device=u.device, dtype=u.dtype)
    t_grid = net.times(times)

    def correct(u: Tensor, n: int) -> Tensor:
        for _ in range(steps):
            eps = _to_eps(net(u, t_grid[n]), u, grid_map, n)
            xi = torch.randn(u.shape, dtype=u.dtype, device=u.device, generator=generator)
            tiny = torch.finfo(u.dtype).tiny
            ratio = xi.flatten(1).norm(dim=1).mean() / eps.flatten(1).norm(dim=1).mean().clamp_min(tiny)
            eta = 2 * (snr * ratio) ** 2
            u = u + apply_kk(chol[n], (2 * eta).sqrt() * xi - eta * eps)
        return u

    return correct


register_solver(Solver("euler-maruyama", euler_maruyama_plan, run_linear, steps=500, grid="quadratic",
                       full_score=False))
register_solver(Solver("ei-ode", ei_ode_plan, run_linear, grid="datasnr-eps",
                       options={"order": 2, "noise": "rotated"}, check=check_ei_ode, denoise=False))
register_solver(Solver("ancestral", ancestral_plan, run_linear, options={"eta": 1.0}, check=check_eta))
register_solver(Solver("heun", heun_plan, run_heun, nfe_per_step=2, full_score=False))
register_solver(Solver("rk45", adaptive_plan, run_adaptive, options={"rtol": 1e-4, "atol": 1e-4},
                       check=check_tolerances, corrector=False, full_score=False))
register_solver(Solver("sscs", sscs_plan, run_linear, full_score=False))
register_solver(Solver("ei-data", data_multistep_plan, run_data_multistep, grid="datasnr",
                       options={"order": None, "correct": True}, check=check_data_multistep, denoise=False))


@staged("sample")
def sample(model, diffusion: LinearDiffusion, shape=None, steps: int | None = None,
           solver: str | None = None, prediction: str | None = None,
           generator: torch.Generator | None = None, progress: bool = False, *,
           x_T: Tensor | None = None, grid: str | Tensor | None = None, t_min: float | None = None,
           extra_args: dict | None = None, callback: Callable[[dict], None] | None = None,
           corrector: str | None = None, snr: float = 0.16, corrector_steps: int = 1,
           denoise: bool | None = None, device=None, **options) -> Tensor:
    """Draw samples of the data x from ``model`` under ``diffusion``; returns x (B, *data_shape).

    model(u, t, **extra_args): u (B, K, *data_shape), t (B,) in the state's dtype; predicts
    ``prediction`` ("eps", "score", "x0"; default: the adapter's, else "eps"; "velocity_score", CLD-SGM's
    velocity-only score, runs the solvers that need only D·s: euler-maruyama, sscs, heun, rk45).
    The state starts at
    ``x_T`` (B, K, *data_shape) if given (then ``shape`` may be omitted), else at a prior draw in
    torch's default dtype on ``device`` (default: the diffusion's). Runs under torch.no_grad.

    ``solver``: a name of ``fastmdm.SOLVERS``, its ``**options`` checked by its registration
    (docs/solvers.md); default (``fastmdm.solvers.default_solver``): "ei-data" when noise reaches x
    only through auxiliaries (data log-SNR at t_min above 5: CLD, ALDA, MALDA), else "ei-ode" except at
    8–11 steps (counted from ``steps`` or a tensor ``grid``), where "ei-data" is better for them too.
    "euler-maruyama" (the published reference: reverse SDE, quadratic grid, 500
    steps, no noise on the last step); "ei-ode" (exponential integrator on the
    probability-flow ODE, ``order`` 1–3 multistep (default 2), "datasnr-eps" grid, ``noise`` "rotated"
    — exact for a single-point data law — or "cholesky"); "ei-data" (x̂₀ multistep, ``order`` 1–3, default 2
    below 12 steps and 3 from 12, ``correct``: a UniPC-style corrector at no extra NFE, default True;
    "datasnr" grid);
    "ancestral" (exact Gaussian posterior step, ``eta`` ∈ [0, 1]; 1 =
    DDPM, 0 = DDIM); "heun" (2 NFE per step, probability-flow ODE in log τ); "rk45" (adaptive
    Dormand–Prince with ``rtol``/``atol``; ``steps`` only sets the reported grid); "sscs"
    (symmetric splitting as published by Dockhorn et al.: the score at each step's start).
    ``corrector="langevin"`` adds ``corrector_steps``
    preconditioned Langevin steps with target ``snr`` after each step.

    ``grid``: "quadratic", "uniform", "logsnr", "datasnr", "datasnr-eps" (the solver's default) from T
    to ``t_min`` (default: the diffusion's) in ``steps`` steps (the solver's default), or a 1-D tensor
    of times, strictly decreasing in [t_min, T]. A named grid starts at
    ``fastmdm.solvers.effective_horizon`` (T unless the data is forgotten earlier, as with a large
    β_max: there p_t is the prior to 1e-6).
    ``denoise``: True returns x̂₀ = E[x₀ | u_{t_min}] (the end k-diffusion and diffusers return),
    Tweedie from one more network call at the grid's end, so NFE = steps × the solver's NFE per step
    (+ corrector calls) + 1; False returns x of the state at t_min. Default: False for "ei-ode" and
    "ei-data" (their last step beats the Tweedie call at equal NFE); for the others True where
    Σ_xx(t_min) > DENOISE_MIN_VARIANCE (VP-SDE), else False — an MDM's state at t_min is its denoised
    end already (CLD's Σ_xx is ~1e-12), and a velocity-only score cannot give x̂₀ (docs/solvers.md,
    "The end of sampling").
    ``progress``: a tqdm bar. ``callback(info)`` is called at the start (i = 0) and after every step
    with info = {"i", "t", "u" (the state at t), "denoised"
    (x̂₀ = E[x₀ | u] from the step's first network call, at its evaluation time; None at i = 0, for
    "rk45" and for a velocity-only score), "nfe"}; the last call's "u" is the state at the grid's
    end, and its "nfe" leaves out the denoising call.

    CUDA graphs: for the fixed-grid solvers without corrector or callback the loop makes no host
    synchronisation and no shape changes; coefficients, times and per-step noise seeds are device
    tensors built before it, so the loop body can be captured with torch.cuda.graphs once per (grid,
    batch) (register a custom ``generator`` with the graph).
    """
    check_instance(diffusion, LinearDiffusion, "diffusion")
    end = _check_t_min(diffusion, t_min)
    if solver is None:
        given = grid.numel() - 1 if isinstance(grid, Tensor) and grid.dim() == 1 else None
        solver = default_solver(diffusion, end, given if steps is None else steps)
    entry = get_solver(solver)
    options = entry.resolve(options)
    check_choice(corrector, CORRECTORS, "corrector")
    if corrector is not None and not entry.corrector:
        raise ValueError(f"solver {solver!r} takes no corrector, got corrector={corrector!r}")
    check_number(snr, "snr", 0.0, low_open=True)
    check_int(corrector_steps, "corrector_steps")
    if callback is not None:
        check_callable(callback, "callback", "callback(info)")
    model, prediction = resolve_model(model, diffusion, prediction)
    prediction = prediction.name
    denoise = default_denoise(diffusion, end, prediction, entry) if denoise is None else denoise
    check_instance(denoise, bool, "denoise")
    _check_full_score(prediction, solver, entry, corrector, denoise)
    model = _with_extra_args(model, extra_args)
    shape, device = _check_start(diffusion, shape, x_T, device)
    times = _times(diffusion, entry, steps, grid, end)
    bar = tqdm(total=times.numel() - 1, desc=f"sampling ({solver})", disable=not progress)
    with torch.no_grad(), bar:
        u = x_T if x_T is not None else diffusion.prior_sample(shape, generator=generator, device=device)
        net = _Network(model, prediction, u, solver)
        plan, eval_map, grid_map = _plan(diffusion, entry, times, prediction, options)
        correct = None if corrector is None else _langevin_corrector(
            net, diffusion, times, grid_map, snr, corrector_steps, generator, u)
        loop = Loop(net, diffusion, times, getattr(plan, "eval_times", None), eval_map, generator, correct,
                    callback, bar)
        loop.report(0, u)
        u = entry.run(loop, plan, u)
        x = _denoise(net, diffusion, times, prediction, u) if denoise else u[:, 0]
        net.check_finite()
    return x


def _denoise(net: _Network, diffusion: LinearDiffusion, times: Tensor, prediction: str, u: Tensor) -> Tensor:
    """x̂₀ = E[x₀ | u] at the grid's end from one more network call (the "x0" output itself)."""
    t_end = times[-1:]
    out = net(u, net.times(t_end)[0])
    if prediction == "x0":
        return out[:, 0]
    eps = _to_eps(out, u, _eps_map(diffusion, t_end, prediction), 0)
    return _Denoiser(diffusion, t_end, u)(0, u, eps)


def encode(model, diffusion: LinearDiffusion, x: Tensor | None = None, prediction: str | None = None, *,
           aux: Tensor | None = None, state: Tensor | None = None, generator: torch.Generator | None = None,
           rtol: float = 1e-6, atol: float = 1e-6, return_info: bool = False):
    """The probability-flow map from data to latent: u(t_min) = (x, v) ↦ u(T), (B, K, *data_shape).

    x: data (B, *data_shape), always read as data; v: ``aux`` (B, K − 1, *data_shape) if given,
    else drawn from N(0, σ₀²) with ``generator``, else 0. Or, instead of x, a whole ``state``
    u(t_min) (B, K, *data_shape). Adaptive RK45 in ρ = log τ.
    """
    model, prediction = resolve_model(model, diffusion, prediction)
    prediction = prediction.name
    if (x is None) == (state is None):
        raise ValueError("encode takes either data x or a state= (B, K, *data_shape), not both or neither")
    if state is not None:
        if aux is not None or generator is not None:
            raise ValueError("aux and generator complete data x; a state= already has its auxiliaries")
        diffusion.check_state(state, "state")
        return _pf_solve(model, diffusion, prediction, check_finite(state, "state"), True, rtol, atol,
                         return_info, "encode")
    diffusion.check_data(x, "hybrid", "x")
    check_finite(x, "x")
    aux_shape = (x.shape[0], diffusion.K - 1, *x.shape[1:])
    if aux is not None:
        check_finite(check_like(aux, "aux", aux_shape, x), "aux")
    elif generator is not None:
        aux = torch.randn(aux_shape, dtype=x.dtype, device=x.device, generator=generator)
        aux = aux * math.sqrt(diffusion.init_aux_var)
    else:
        aux = x.new_zeros(aux_shape)
    u0 = torch.cat([x.unsqueeze(1), aux], dim=1)
    return _pf_solve(model, diffusion, prediction, u0, True, rtol, atol, return_info, "encode")


def decode(model, diffusion: LinearDiffusion, z: Tensor, prediction: str | None = None, *, rtol: float = 1e-6,
           atol: float = 1e-6, return_state: bool = False, return_info: bool = False):
    """The inverse map latent u(T) = z ↦ u(t_min); returns the data part (or the state)."""
    model, prediction = resolve_model(model, diffusion, prediction)
    prediction = prediction.name
    diffusion.check_state(z, "z")
    check_finite(z, "z")
    out = _pf_solve(model, diffusion, prediction, z, False, rtol, atol, return_info, "decode")
    u, info = out if return_info else (out, None)
    u = u if return_state else u[:, 0]
    return (u, info) if return_info else u


def _pf_solve(model, diffusion, prediction, u0, forward: bool, rtol, atol, return_info, caller: str):
    counter = [0]
    rate = _log_tau_flow(model, diffusion, prediction, counter, (diffusion.t_min, diffusion.T), caller)
    ends = _rho(diffusion, [diffusion.t_min, diffusion.T])
    with torch.no_grad():
        states, _ = odeint_adaptive(rate, u0, ends if forward else ends[::-1], rtol=rtol, atol=atol)
    return (states[-1], {"nfe": counter[0]}) if return_info else states[-1]


__all__ = ["SOLVERS", "Loop", "decode", "encode", "run_adaptive", "run_heun", "run_linear", "sample"]
