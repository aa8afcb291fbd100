"""Samplers for any linear MDM: ``sample``, ``encode``, ``decode`` (mdm-math.md §6–7).

``sample(model, diffusion, shape, …)`` draws u_T ~ N(0, Σ∞) and integrates the reverse SDE or the
probability-flow ODE down to t_min with the chosen solver; ``model(u, t)`` is any callable over the
state (B, K, *data_shape) that predicts "eps" (the hybrid-start Cholesky noise), "score" or "x0".
All K×K step coefficients are built once per grid in float64 (:mod:`fastmdm.solvers`, cached) and
the loop only applies them: no transition kernels, no host synchronisation and fixed shapes inside
the loop of the fixed-grid solvers, so the loop can be captured in a CUDA graph (see ``sample``).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .grids import GRIDS, check_steps, time_grid
from .importance import tau_inverse
from .likelihood import probability_flow_drift
from .noise_frame import diffusion_key
from .ode import odeint_adaptive
from .ops import apply_kk
from .profiling import staged
from .scores import check_output, check_prediction
from .sde_step import sde_step
from .solvers import (
    NOISES,
    ancestral_plan,
    ei_ode_plan,
    euler_maruyama_plan,
    heun_plan,
    prediction_map,
    sscs_plan,
    transition_at,
    tweedie_weights,
)

SOLVERS = ("euler-maruyama", "ei-ode", "ancestral", "heun", "rk45", "sscs")
CORRECTORS = (None, "langevin")
DEFAULT_STEPS = {"euler-maruyama": 500}  # the published default; 20 for the others
DEFAULT_GRID = {"euler-maruyama": "quadratic"}  # "logsnr" for the others
_PLAN_CACHE_SIZE = 32
_plans: OrderedDict = OrderedDict()


def resolve_model(model, diffusion: LinearDiffusion, prediction: str | None) -> tuple[Callable, str]:
    """(callable, prediction): adapters from :mod:`fastmdm.adapters` carry their own prediction."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(u, t), got {type(model).__name__}")
    if not isinstance(diffusion, LinearDiffusion):
        raise TypeError(f"diffusion must be a LinearDiffusion, got {type(diffusion).__name__}")
    bind = getattr(model, "bind", None)
    if bind is not None:
        model = bind(diffusion)
    if prediction is None:
        prediction = getattr(model, "prediction", "eps")
    return model, check_prediction(prediction)


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple (B, *data_shape) of ints, got {shape!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (B, *data_shape) with positive sizes, got {shape}")
    return shape


@staged("sample.plan")
def _plan(diffusion: LinearDiffusion, solver: str, times: Tensor, prediction: str, options: tuple):
    """Coefficients for (solver, grid, prediction), cached by the diffusion's values."""
    key = (diffusion_key(diffusion), solver, times.numpy().tobytes(), prediction, options)
    if key in _plans:
        _plans.move_to_end(key)
        return _plans[key]
    opts = dict(options)
    if solver == "ei-ode":
        plan = ei_ode_plan(diffusion, times, opts["order"], opts["noise"])
    elif solver == "ancestral":
        plan = ancestral_plan(diffusion, times, opts["eta"])
    elif solver == "euler-maruyama":
        plan = euler_maruyama_plan(diffusion, times)
    elif solver == "sscs":
        plan = sscs_plan(diffusion, times)
    else:
        plan = heun_plan(diffusion, times)
    eval_times = times if solver == "heun" else plan.eval_times
    value = (plan, prediction_map(diffusion, eval_times, prediction),
             prediction_map(diffusion, times, prediction))
    _plans[key] = value
    if len(_plans) > _PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return value


class _Network:
    """Calls model(u, t) with t a (B,) tensor in the state's dtype; validates the first output, counts NFE."""

    def __init__(self, model, prediction: str, u: Tensor):
        self.model, self.prediction, self.nfe = model, prediction, 0
        self.batch, self.device, self.dtype = u.shape[0], u.device, u.dtype

    def times(self, times: Tensor) -> Tensor:
        """A (len(times), B) table of model times, built before a loop."""
        return times.to(device=self.device, dtype=self.dtype)[:, None].expand(-1, self.batch).contiguous()

    @staged("sample.network")
    def __call__(self, u: Tensor, t: Tensor) -> Tensor:
        out = self.model(u, t)
        if self.nfe == 0:
            out = check_output(out, u, self.prediction)
        self.nfe += 1
        if self.prediction == "x0" and out.shape != u.shape:
            out = out.unsqueeze(1).expand_as(u)
        return out


def _to_eps(out: Tensor, u: Tensor, pmap, n: int) -> Tensor:
    """ε̂ from a network output (identity for "eps")."""
    if pmap.out_mat is None:
        return out
    eps = apply_kk(pmap.out_mat[n].to(u.device), out)
    return eps if pmap.state_mat is None else eps + apply_kk(pmap.state_mat[n].to(u.device), u)


def _progress(progress, n: int, total: int) -> None:
    if callable(progress):
        progress(n, total)
    elif progress and (n == total or n % max(1, total // 10) == 0):
        print(f"\rsampling: step {n}/{total}", end="\n" if n == total else "", file=sys.stderr)


def _noise_seeds(steps: int, generator, device) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**31 - 1, (steps,), generator=generator, device=gen_device).to(device)


def _end_step(u: Tensor, n: int, N: int, corrector, traj: list | None, progress) -> Tensor:
    """After step n: optional corrector at t_{n+1}, trajectory record, progress report."""
    if corrector is not None:
        u = corrector(u, n + 1)
    if traj is not None:
        traj.append(u)
    _progress(progress, n + 1, N)
    return u


def _run_linear(plan, pmap, net: _Network, u: Tensor, generator, progress, traj: list | None,
                corrector=None) -> Tensor:
    """The loop u ← Φ (u + Λ ε̂_n) + Σ_j Γ_j ε̂_{n−j} + C ξ of the fixed-grid solvers (a fused step)."""
    N, H, K = plan.gamma.shape[0], plan.gamma.shape[1], plan.phi.shape[-1]
    zeros = torch.zeros(N, K, K, dtype=torch.float64)
    noise = plan.noise if plan.noise is not None else zeros
    lam = plan.lam if plan.lam is not None else zeros
    coefs = torch.cat([torch.stack([plan.phi, noise, lam], 1), plan.gamma], 1).to(u.device)  # (N, 3+H, K, K)
    noisy = (noise.flatten(1).abs().amax(1) > 0).tolist()
    pre = None
    if plan.pre_phi is not None:
        pre = torch.stack([plan.pre_phi, plan.pre_noise], 1).to(u.device)
    seeds = _noise_seeds(2 * N, generator, u.device)
    t_eval = net.times(plan.eval_times)
    history: list[Tensor] = []
    for n in range(N):
        if pre is not None:
            u = sde_step(u, [], pre[n], seeds, N + n, True, generator)
        eps = _to_eps(net(u, t_eval[n]), u, pmap, n)
        history = [eps, *history][:H]
        u = sde_step(u, history, coefs[n, : 3 + len(history)], seeds, n, noisy[n], generator)
        u = _end_step(u, n, N, corrector, traj, progress)
    return u


def _run_heun(plan, pmap, net: _Network, u: Tensor, progress, traj: list | None, corrector=None) -> Tensor:
    """Heun on du/dρ = J_n u + B_n ε̂: predictor u + Δρ k₁, corrector u + Δρ/2 (k₁ + k₂)."""
    J, Bm = plan.state.to(u.device), plan.eps.to(u.device)
    N = plan.drho.numel()
    drho = plan.drho.tolist()
    t_eval = net.times(plan.times)
    for n in range(N):
        k1 = apply_kk(J[n], u) + apply_kk(Bm[n], _to_eps(net(u, t_eval[n]), u, pmap, n))
        guess = u + drho[n] * k1
        eps2 = _to_eps(net(guess, t_eval[n + 1]), guess, pmap, n + 1)
        u = u + (0.5 * drho[n]) * (k1 + apply_kk(J[n + 1], guess) + apply_kk(Bm[n + 1], eps2))
        u = _end_step(u, n, N, corrector, traj, progress)
    return u


def _log_tau_flow(model, diffusion: LinearDiffusion, prediction: str, counter: list):
    """du/dρ = (τ/β) h(u, t(ρ)) for ρ = log τ, h the probability-flow drift of fastmdm.likelihood."""
    drift = probability_flow_drift(model, diffusion, prediction)

    def rate(rho: float, u: Tensor) -> Tensor:
        tau = torch.tensor([math.exp(rho)], dtype=torch.float64)
        t = float(tau_inverse(diffusion, tau).clamp(diffusion.t_min, diffusion.T)[0])
        counter[0] += 1
        return drift(u, t) * (float(tau[0]) / float(diffusion.beta(torch.tensor(t))))

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


@staged("sample")
def sample(model, diffusion: LinearDiffusion, shape, steps: int | None = None, solver: str = "ei-ode",
           prediction: str | None = None, generator: torch.Generator | None = None, progress=False,
           return_trajectory: bool = False, *, grid: str | None = None, order: int = 3,
           noise: str = "rotated", eta: float = 1.0, rtol: float = 1e-4, atol: float = 1e-4,
           corrector: str | None = None, snr: float = 0.16, corrector_steps: int = 1,
           denoise: bool = False, return_info: bool = False, device=None):
    """Draw samples of the data x from ``model`` under ``diffusion``; returns x (B, *data_shape).

    model(u, t): u (B, K, *data_shape), t (B,) in the state's dtype; predicts ``prediction`` ("eps",
    "score", "x0"; default: the adapter's, else "eps"). The state takes torch's default dtype.

    Solvers (``SOLVERS``): "euler-maruyama" (the published reference: reverse SDE, quadratic grid,
    500 steps, no noise on the last step); "ei-ode" (exponential integrator on the probability-flow
    ODE, ``order`` 1–3 multistep, ``noise`` "rotated" — exact for a single-point data law — or
    "cholesky"); "ancestral" (exact Gaussian posterior step, stochasticity ``eta`` ∈ [0, 1]; 1 = DDPM,
    0 = DDIM); "heun" (2 NFE per step, probability-flow ODE in log τ); "rk45" (adaptive
    Dormand–Prince with ``rtol``/``atol``; ``steps`` only sets the output grid); "sscs" (symmetric
    splitting, Dockhorn et al.). ``corrector="langevin"`` adds ``corrector_steps`` preconditioned
    Langevin steps with target ``snr`` after each predictor step. ``grid``: "quadratic", "uniform"
    or "logsnr" (default "logsnr", "quadratic" for Euler–Maruyama). ``denoise``: a final Tweedie
    step x̂₀ = E[x₀ | u_{t_min}] (one more network call).

    Returns x; with ``return_trajectory`` also traj (steps + 1, B, K, *data_shape), traj[0] the prior
    draw at T and traj[-1] the state at t_min before any denoising; with ``return_info`` also a dict
    (nfe, times, solver). Runs under torch.no_grad on ``device`` (default: the diffusion's).

    CUDA graphs: for the fixed-grid solvers without corrector the loop makes no host synchronisation
    and no shape changes; coefficients, times and per-step noise seeds are device tensors built before
    it, so the loop body can be captured with torch.cuda.graphs once per (grid, batch) (register a
    custom ``generator`` with the graph).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {CORRECTORS}, got {corrector!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if solver == "ancestral" and not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if not (isinstance(snr, (int, float)) and snr > 0):
        raise ValueError(f"snr must be a positive number, got {snr!r}")
    check_steps(corrector_steps, "corrector_steps")
    model, prediction = resolve_model(model, diffusion, prediction)
    shape = _check_shape(shape)
    steps = check_steps(DEFAULT_STEPS.get(solver, 20) if steps is None else steps)
    grid = DEFAULT_GRID.get(solver, "logsnr") if grid is None else grid
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    device = torch.device(device) if device is not None else diffusion.stationary_var.device
    times = time_grid(diffusion, steps, grid)
    with torch.no_grad():
        u = diffusion.prior_sample(shape, generator=generator, device=device)
        net = _Network(model, prediction, u)
        traj = [u] if return_trajectory else None
        if solver == "rk45":
            counter = [0]
            rate = _log_tau_flow(model, diffusion, prediction, counter)
            states, _ = odeint_adaptive(rate, u, _rho(diffusion, times), rtol=rtol, atol=atol)
            u, net.nfe = states[-1], counter[0]
            if traj is not None:
                traj = states
        else:
            options = (("order", order), ("noise", noise)) if solver == "ei-ode" else (
                (("eta", float(eta)),) if solver == "ancestral" else ())
            plan, pmap, grid_map = _plan(diffusion, solver, times, prediction, options)
            correct = None if corrector is None else _langevin_corrector(
                net, diffusion, times, grid_map, snr, corrector_steps, generator, u)
            if solver == "heun":
                u = _run_heun(plan, pmap, net, u, progress, traj, correct)
            else:
                u = _run_linear(plan, pmap, net, u, generator, progress, traj, correct)
        x = u[:, 0]
        if denoise:
            x = _denoise(net, diffusion, times, prediction, u)
    result = [x]
    if return_trajectory:
        result.append(torch.stack(traj))
    if return_info:
        result.append({"nfe": net.nfe, "times": times, "solver": solver})
    return result[0] if len(result) == 1 else tuple(result)


def _denoise(net: _Network, diffusion: LinearDiffusion, times: Tensor, prediction: str, u: Tensor) -> Tensor:
    """x̂₀ = wᵀ(L⁻¹u − ε̂) at t_min (Tweedie, GLS projection onto the data direction)."""
    t_min = times[-1:]
    out = net(u, net.times(t_min)[0])
    if prediction == "x0":
        return out[:, 0]
    pmap = prediction_map(diffusion, t_min, prediction)
    eps = _to_eps(out, u, pmap, 0)
    L_inv = diffusion.transition_f64(t_min, "hybrid").chol_inv_t[0].T
    w = tweedie_weights(diffusion, t_min).to(u.device)
    white = apply_kk(L_inv.to(u.device), u) - eps
    return torch.einsum("k,bk...->b...", w.to(u.dtype), white)


def encode(model, diffusion: LinearDiffusion, x: Tensor, prediction: str | None = None, *,
           aux: Tensor | None = None, generator: torch.Generator | None = None, rtol: float = 1e-6,
           atol: float = 1e-6, return_info: bool = False):
    """The probability-flow map from data to latent: u(t_min) = (x, v) ↦ u(T), (B, K, *data_shape).

    v: ``aux`` (B, K − 1, *data_shape) if given, else drawn from N(0, σ₀²) with ``generator``, else 0.
    A state (B, K, *data_shape) may be passed as x instead. Adaptive RK45 in ρ = log τ.
    """
    model, prediction = resolve_model(model, diffusion, prediction)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor (B, *data_shape) or a state (B, K, *data_shape)")
    if x.dim() >= 3 and x.shape[1] == diffusion.K and aux is None and generator is None and diffusion.K > 1:
        u0 = x
    else:
        diffusion.check_data(x, "hybrid", "x")
        K = diffusion.K
        aux_shape = (x.shape[0], K - 1, *x.shape[1:])
        if aux is None and generator is not None:
            aux = torch.randn(aux_shape, dtype=x.dtype, device=x.device, generator=generator)
            aux = aux * math.sqrt(diffusion.init_aux_var)
        elif aux is None:
            aux = x.new_zeros(aux_shape)
        elif tuple(aux.shape) != aux_shape:
            raise ValueError(f"aux must have shape {aux_shape}, got {tuple(aux.shape)}")
        u0 = torch.cat([x.unsqueeze(1), aux.to(x.dtype)], dim=1)
    return _pf_solve(model, diffusion, prediction, u0, True, rtol, atol, return_info)


def decode(model, diffusion: LinearDiffusion, z: Tensor, prediction: str | None = None, *, rtol: float = 1e-6,
           atol: float = 1e-6, return_state: bool = False, return_info: bool = False):
    """The inverse map latent u(T) = z ↦ u(t_min); returns the data part (or the state)."""
    model, prediction = resolve_model(model, diffusion, prediction)
    diffusion.check_state(z, "z")
    out = _pf_solve(model, diffusion, prediction, z, False, rtol, atol, return_info)
    u, info = out if return_info else (out, None)
    u = u if return_state else u[:, 0]
    return (u, info) if return_info else u


def _pf_solve(model, diffusion, prediction, u0, forward: bool, rtol, atol, return_info):
    diffusion.check_state(u0, "u")
    counter = [0]
    rate = _log_tau_flow(model, diffusion, prediction, counter)
    ends = _rho(diffusion, [diffusion.t_min, diffusion.T])
    with torch.no_grad():
        states, _ = odeint_adaptive(rate, u0, ends if forward else ends[::-1], rtol=rtol, atol=atol)
    return (states[-1], {"nfe": counter[0]}) if return_info else states[-1]


__all__ = ["SOLVERS", "decode", "encode", "sample"]
