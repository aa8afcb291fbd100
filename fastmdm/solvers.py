"""The solver registry and the per-step K×K coefficients of the samplers (docs/math.md §6–7).

Each solver is one :class:`Solver` registration (plan builder, loop, defaults, options); the
coefficients are computed once per time grid in float64.

Every fixed-grid solver here is a linear recursion in the state u, the noise predictions ε̂ (the
network's output in the Cholesky noise of the hybrid-start kernel, s = −L_t⁻ᵀ ε̂) and fresh Gaussian
noise ξ:

    u_{n+1} = Φ_n (u_n + Λ_n ε̂_n) + Σ_j Γ_{n,j} ε̂_{n−j} + C_n ξ_n,

with K×K matrices acting on the variable axis that depend on the grid only (Λ_n = −L_n
makes
u_n + Λ_n ε̂_n the predicted mean, "move the mean, re-noise": this form, not the expanded
Φ u + (Γ − Φ L) ε̂, keeps rounding in ε̂ from being amplified by L_n⁻¹ near t_min): they are computed here
for the whole grid before the loop and shared by all samples. Time runs t_0 = T > … > t_N = t_min;
τ_n = τ(t_n), ρ = log τ, Φ(s, t) = exp((τ_s − τ_t) A), L_n the hybrid-start Cholesky factor and
K_n = L_n R_n the noise frame of :mod:`fastmdm.noise_frame`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .grids import DATA_SNR_WINDOW, GRIDS, data_log_snr, data_snr_warp
from .noise_frame import diffusion_key, rotation
from .transition import expm_and_gramian, expm_taylor
from .validation import check_callable, check_choice, check_instance, check_int, check_number

QUADRATURE_NODES = 16  # Gauss–Legendre nodes per step for the exponential-integrator integrals
HORIZON_TOL = 1e-6  # ‖Σ∞^-½ M_t Σ∞^½‖₂ below which p_t is the prior (see effective_horizon)
HORIZON_POINTS = 512  # τ values scanned for it
_HORIZON_CACHE_SIZE = 64
_horizons: dict = {}
NOISES = ("rotated", "cholesky")


class LinearPlan(NamedTuple):
    """Coefficients of u ← Φ (u + Λ ε̂_n) + Σ_j Γ_j ε̂_{n−j} + C ξ, float64 on CPU.

    phi (N, K, K); lam (N, K, K) or None for 0; gamma (N, H, K, K), gamma[n, j] acting on the
    prediction made j steps earlier; noise (N, K, K) or None; eval_times (N,): where the network
    is called in step n (t_n); pre_phi / pre_noise (N, K, K) or None:
    an update u ← pre_phi u + pre_noise ξ made before the network call (SSCS's first half step).
    """

    phi: Tensor
    lam: Tensor | None
    gamma: Tensor
    noise: Tensor | None
    eval_times: Tensor
    pre_phi: Tensor | None = None
    pre_noise: Tensor | None = None

    def packed(self) -> tuple[Tensor, list[bool]]:
        """(coefs, noisy): coefs (N, 3 + H, K, K) = [Φ, C, Λ, Γ_0, …] per step, as the fused step takes
        them (None as 0); noisy[n]: whether step n draws noise (C_n ≠ 0)."""
        N, K = self.phi.shape[0], self.phi.shape[-1]
        zeros = torch.zeros(N, K, K, dtype=torch.float64)
        noise = self.noise if self.noise is not None else zeros
        lam = self.lam if self.lam is not None else zeros
        coefs = torch.cat([torch.stack([self.phi, noise, lam], 1), self.gamma], 1)
        return coefs, (noise.flatten(1).abs().amax(1) > 0).tolist()



def _matrices(diffusion: LinearDiffusion) -> tuple[Tensor, Tensor]:
    return diffusion.A.detach().cpu(), diffusion.D.detach().cpu()


def transition_at(diffusion: LinearDiffusion, times: Tensor):
    """Hybrid-start transition kernel at float64 times (CPU), without gradients."""
    with torch.no_grad():
        return diffusion.transition_f64(times.to(torch.float64).cpu(), "hybrid")


def flow(diffusion: LinearDiffusion, tau_to: Tensor, tau_from: Tensor) -> Tensor:
    """Φ = exp((τ_to − τ_from) A), float64 (…, K, K) for broadcastable τ tensors."""
    tau_to, tau_from = torch.broadcast_tensors(tau_to.to(torch.float64), tau_from.to(torch.float64))
    with torch.no_grad():
        Phi = expm_taylor(diffusion.A.to(tau_to.device), (tau_to - tau_from).reshape(-1))
    return Phi.reshape(*tau_to.shape, *Phi.shape[-2:])


def psd_sqrt(S: Tensor) -> Tensor:
    """Symmetric square root of a (batch of) symmetric PSD matrices; tiny negative eigenvalues → 0."""
    S = 0.5 * (S + S.mT)
    lam, V = torch.linalg.eigh(S)
    return (V * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT


def effective_horizon(diffusion: LinearDiffusion) -> float:
    """The earliest t ≤ T from which the forward process has forgotten the data: p_t = N(0, Σ∞).

    With M = Σ∞^-½ M_t Σ∞^½ (docs/math.md §7), the hybrid marginal at t differs from the prior by a
    mean M x₀ and a covariance deficit M (I − Σ₀Σ∞⁻¹) Mᵀ, so once ‖M‖ ≤ HORIZON_TOL for every later
    t, KL(p_t ‖ prior) ≤ ½ HORIZON_TOL² (|x₀|² + K) per data coordinate, and a sampler may start
    there. Samplers then spend no steps on [t_eff, T] — for a large β_max most of [t_min, T], where
    huge steps in τ make the reverse-time flows expand like e^{Δτ} and every solver unstable.
    T when the data is not forgotten by T (every built-in diffusion with β_max ≤ 20). ‖M‖ is
    checked (Frobenius, ≥ ‖M‖₂) on HORIZON_POINTS values of τ; cached per diffusion.
    """
    key = diffusion_key(diffusion)
    if key not in _horizons:
        tau_T = float(diffusion.tau(torch.tensor(diffusion.T, dtype=torch.float64)))
        tau = torch.linspace(0.0, tau_T, HORIZON_POINTS, dtype=torch.float64)
        scale = diffusion.stationary_var.detach().cpu().sqrt()
        step = flow(diffusion, tau[1:2], tau[:1])[0] * scale / scale[:, None]  # M(τ_k) = M(τ_1)^k
        norms, M = [], torch.eye(diffusion.K, dtype=torch.float64)
        for _ in range(HORIZON_POINTS):
            norms.append(float(M.norm()))
            M = step @ M
        last = max(k for k, norm in enumerate(norms) if norm > HORIZON_TOL)  # τ = 0 always remembers
        t_eff = diffusion.T
        if last + 1 < HORIZON_POINTS:
            t_eff = min(max(float(diffusion.tau_inverse(tau[last + 1])), diffusion.t_min), diffusion.T)
        if len(_horizons) >= _HORIZON_CACHE_SIZE:
            _horizons.pop(next(iter(_horizons)))
        _horizons[key] = t_eff
    return _horizons[key]


def interval_gauss_legendre(rho_from: Tensor, rho_to: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Nodes (N, m) and oriented weights (N, m) of Gauss–Legendre on each [ρ_from, ρ_to]."""
    x, w = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(m))
    half = (rho_to - rho_from)[:, None] / 2
    return (rho_from + rho_to)[:, None] / 2 + half * x, half * w


def lagrange_basis(points: list[float], j: int) -> np.polynomial.Polynomial:
    """ℓ_j through ``points`` (ℓ_j(points[i]) = δ_ij), in the variable ρ − points[0]."""
    x = np.asarray(points) - points[0]
    if x.size == 1:
        return np.polynomial.Polynomial([1.0])
    ell = np.polynomial.Polynomial.fromroots(np.delete(x, j))
    return ell / ell(x[j])


def ei_ode_plan(diffusion: LinearDiffusion, times: Tensor, order: int = 2,
                noise: str = "rotated") -> LinearPlan:
    """Exponential-integrator steps on the probability-flow ODE, multistep orders 1–3.

    Variation of constants over [t, s]: u_s = Φ(s, t) u_t + ∫_t^s Φ(s, r) β D L_r⁻ᵀ ε̂(r) dr.
    "rotated": ε̂_K = R_rᵀ ε̂ is held to the polynomial p(ρ) through the last q predictions and,
    integrated by parts (K̇ = βAK + βDK⁻ᵀ),

        ∫ Φ(s, r) β D K_r⁻ᵀ p dr = K_s p(ρ_s) − Φ(s, t) K_t p(ρ_t) − ∫ Φ(s, r) K_r p′(ρ) dρ,

    so order 1 is u_s = Φ(s, t)(u_t − L_t ε̂) + L_s R_s R_tᵀ ε̂, exact for a single-point data law
    (Λ = −L_t carries the Φ(s, t) K_t p(ρ_t) term).
    "cholesky": ε̂ itself is interpolated and ∫ Φ(s, r) D L_r⁻ᵀ τ_r p(ρ) dρ is integrated directly.
    The remaining integrals use Gauss–Legendre in ρ = log τ; warm start with lower orders.
    """
    times = times.to(torch.float64)
    N, K = times.numel() - 1, diffusion.K
    tau = diffusion.tau(times)
    rho = tau.log()
    phi = flow(diffusion, tau[1:], tau[:-1])
    gamma = torch.zeros(N, order, K, K, dtype=torch.float64)
    need_nodes = noise == "cholesky" or order > 1
    if need_nodes:
        nodes, weights = interval_gauss_legendre(rho[:-1], rho[1:], QUADRATURE_NODES)
        node_tau = nodes.exp()
        node_tk = transition_at(diffusion, diffusion.tau_inverse(node_tau.flatten()).clamp(
            diffusion.t_min, diffusion.T))
        flow_nodes = flow(diffusion, tau[1:, None], node_tau)  # Φ(s, r_i): (N, m, K, K)
    L = transition_at(diffusion, times).chol
    if noise == "rotated":
        all_tau = torch.cat([tau, node_tau.flatten()]) if need_nodes else tau
        R_all = rotation(diffusion, all_tau)
        R = R_all[: N + 1]
        frame = L @ R  # K_n on the grid
        if need_nodes:
            frame_nodes = (node_tk.chol @ R_all[N + 1:]).view(N, QUADRATURE_NODES, K, K)
            kernel = flow_nodes @ frame_nodes  # Φ(s, r_i) K_{r_i}
    else:
        _, D = _matrices(diffusion)
        kernel = flow_nodes @ D @ node_tk.chol_inv_t.view(N, QUADRATURE_NODES, K, K) \
            * node_tau[..., None, None]  # Φ(s, r_i) D L_{r_i}⁻ᵀ τ_{r_i}
    for n in range(N):
        q = min(order, n + 1)
        points = [float(rho[n - j]) for j in range(q)]
        for j in range(q):
            ell = lagrange_basis(points, j)
            if noise == "rotated":
                coef = frame[n + 1] * float(ell(float(rho[n + 1]) - points[0]))
                if q > 1:
                    dell = torch.from_numpy(ell.deriv()(nodes[n].numpy() - points[0]))
                    coef = coef - (weights[n, :, None, None] * dell[:, None, None] * kernel[n]).sum(0)
                gamma[n, j] = coef @ R[n - j].mT
            else:
                vals = torch.from_numpy(ell(nodes[n].numpy() - points[0]))
                gamma[n, j] = (weights[n, :, None, None] * vals[:, None, None] * kernel[n]).sum(0)
    lam = -L[:-1] if noise == "rotated" else None
    return LinearPlan(phi, lam, gamma, None, times[:-1].clone())


def _orthogonal_power(U: Tensor, eta: float) -> Tensor:
    """U^η for orthogonal U (batch), through its eigen-decomposition U = V e^{iθ} V⁻¹."""
    if eta == 1.0:
        return U
    if eta == 0.0:
        return torch.eye(U.shape[-1], dtype=U.dtype).expand_as(U).clone()
    lam, V = torch.linalg.eig(U)
    power = torch.exp(1j * eta * torch.angle(lam))
    return (V * power.unsqueeze(-2) @ torch.linalg.inv(V)).real


def ancestral_plan(diffusion: LinearDiffusion, times: Tensor, eta: float = 1.0) -> LinearPlan:
    """The exact Gaussian posterior step q(u_s | u_t, x̂₀) for any MDM (DDPM's step), with a knob η.

    In the noise frame, u_t = a_t x₀ + K_t ε_K and q(u_s | u_t, x₀) = N(a_s x₀ + K_s H ε_K,
    K_s (I − H Hᵀ) K_sᵀ), H = (K_t⁻¹ Φ(t, s) K_s)ᵀ. With H = (H Hᵀ)^½ U (polar) the η-family

        u_s = Φ(s, t)(u_t − K_t ε̂_K) + K_s [H_η ε̂_K + N_η ξ],
        H_η = (I − η²(I − H Hᵀ))^½ U^η,   N_η N_ηᵀ = η² (I − H Hᵀ),

    keeps every marginal for each η: η = 1 is the posterior (DDPM), η = 0 the order-1
    exponential integrator (DDIM). Last step included (the chain ends at t_min).
    """
    times = times.to(torch.float64)
    K = diffusion.K
    tau = diffusion.tau(times)
    tk = transition_at(diffusion, times)
    R = rotation(diffusion, tau)
    frame = tk.chol @ R
    frame_inv = R.mT @ tk.chol_inv_t.mT  # K⁻¹ = Rᵀ L⁻¹
    phi = flow(diffusion, tau[1:], tau[:-1])
    H = (frame_inv[:-1] @ flow(diffusion, tau[:-1], tau[1:]) @ frame[1:]).mT
    W, sig, Vh = torch.linalg.svd(H)
    eye = torch.eye(K, dtype=torch.float64)
    post = eye - H @ H.mT  # K-frame posterior covariance
    H_eta = psd_sqrt(eye - eta**2 * post) @ _orthogonal_power(W @ Vh, float(eta))
    gamma = frame[1:] @ H_eta @ R[:-1].mT
    noise = frame[1:] @ psd_sqrt(eta**2 * post)
    return LinearPlan(phi, -tk.chol[:-1], gamma.unsqueeze(1), noise, times[:-1].clone())


def euler_maruyama_plan(diffusion: LinearDiffusion, times: Tensor) -> LinearPlan:
    """The reference step u ← u − h β(t)[A u − 2D s] + sqrt(2β(t) h) D^½ ξ, s = −L_t⁻ᵀ ε̂; no noise last."""
    times = times.to(torch.float64)
    A, D = _matrices(diffusion)
    h = (times[:-1] - times[1:])[:, None, None]
    beta = diffusion.beta(times[:-1])[:, None, None]
    chol_inv_t = transition_at(diffusion, times[:-1]).chol_inv_t
    phi = torch.eye(diffusion.K, dtype=torch.float64) - h * beta * A
    gamma = -2 * h * beta * D @ chol_inv_t
    noise = (2 * beta * h).sqrt() * psd_sqrt(D)
    noise[-1] = 0
    return LinearPlan(phi, None, gamma.unsqueeze(1), noise, times[:-1].clone())


def sscs_plan(diffusion: LinearDiffusion, times: Tensor) -> LinearPlan:
    """Symmetric splitting (Dockhorn et al.'s SSCS, for any MDM).

    In reverse time σ = −τ the reverse SDE du = [−A u + 2D s] dσ + sqrt(2D) dW splits, with
    s = −Σ∞⁻¹ u + (s + Σ∞⁻¹ u), into the linear SDE du = Ā u dσ + sqrt(2D) dW, Ā = (Q − D)Σ∞⁻¹
    (stationary N(0, Σ∞), solved exactly: mean e^{hĀ}, covariance P̄(h)) and the score part
    du = 2D(s + Σ∞⁻¹ u) dσ (one Euler step with the score at the step's start time t_n, as CLD-SGM
    does — better than the τ-midpoint on every grid tried). Strang: half linear step, score step,
    half linear step, halves in τ (CLD-SGM's, in t, agree for constant β). Only the variables D
    reaches (a velocity-like block) feel the score; the others move through the exact linear flow.
    """
    times = times.to(torch.float64)
    A, D = _matrices(diffusion)
    var = diffusion.stationary_var.detach().cpu()
    A_rev = -A - 2 * D / var  # (Q − D) Σ∞⁻¹
    tau = diffusion.tau(times)
    half = (tau[:-1] - tau[1:]) / 2
    M_half, P_half = expm_and_gramian(A_rev, 2 * D, half, var)
    C_half = psd_sqrt(P_half)
    chol_inv_t = transition_at(diffusion, times[:-1]).chol_inv_t
    h = (2 * half)[:, None, None]
    score_state = torch.eye(diffusion.K, dtype=torch.float64) + 2 * h * D / var
    score_eps = -2 * h * D @ chol_inv_t
    return LinearPlan(M_half @ score_state, None, (M_half @ score_eps).unsqueeze(1), C_half,
                      times[:-1].clone(), pre_phi=M_half, pre_noise=C_half)


class HeunPlan(NamedTuple):
    """Heun on du/dρ = τ[A u + D L⁻ᵀ ε̂], ρ = log τ: drift matrices at the grid (N + 1, K, K)."""

    state: Tensor  # τ_n A
    eps: Tensor  # τ_n D L_n⁻ᵀ
    drho: Tensor  # (N,) ρ_{n+1} − ρ_n
    times: Tensor

    @property
    def eval_times(self) -> Tensor:
        """Where the network is called: the grid (the step's second call is the next step's first time)."""
        return self.times


def heun_plan(diffusion: LinearDiffusion, times: Tensor) -> HeunPlan:
    """Drift coefficients for Heun's method on the probability-flow ODE in ρ = log τ."""
    times = times.to(torch.float64)
    A, D = _matrices(diffusion)
    tau = diffusion.tau(times)[:, None, None]
    chol_inv_t = transition_at(diffusion, times).chol_inv_t
    rho = diffusion.tau(times).log()
    return HeunPlan(tau * A, tau * D @ chol_inv_t, rho[1:] - rho[:-1], times)


class AdaptivePlan(NamedTuple):
    """The adaptive solver has no fixed coefficients: its output grid and tolerances."""

    times: Tensor
    rtol: float
    atol: float


def adaptive_plan(diffusion: LinearDiffusion, times: Tensor, rtol: float, atol: float) -> AdaptivePlan:
    """Dormand–Prince 5(4) on the probability-flow ODE in ρ = log τ, reporting at ``times``."""
    return AdaptivePlan(times.to(torch.float64), float(rtol), float(atol))


# -- option checks of the built-in solvers (run once per call, through the registry) ---------------
def check_ei_ode(options: dict) -> None:
    """order ∈ {1, 2, 3}, noise ∈ NOISES."""
    check_choice(check_int(options["order"], "order"), (1, 2, 3), "order")
    check_choice(options["noise"], NOISES, "noise")


def check_eta(options: dict) -> None:
    """eta a number in [0, 1]."""
    check_number(options["eta"], "eta", 0.0, 1.0)


def check_tolerances(options: dict) -> None:
    """rtol and atol finite numbers > 0."""
    for name in ("rtol", "atol"):
        check_number(options[name], name, 0.0, low_open=True)


# -- the registry ---------------------------------------------------------------------------------
def default_solver(diffusion: LinearDiffusion, t_min: float, steps: int | None = None) -> str:
    """``sample``'s solver when none is named: "ei-data" if the data log-SNR λ = log‖L_t⁻¹a_t‖ at t_min
    exceeds the top of the "datasnr" grid's window (5: noise reaches x only through auxiliaries,
    as in CLD, ALDA, MALDA — λ 13–24). Where noise is on x itself (VP, a learned D — λ ≈ 4.5): "ei-data"
    at the ``steps`` where its grid is warped (data_snr_warp > 0: 8–11), whose steps packed into the mode
    decision beat the ε̂ multistep there, else "ei-ode" (``steps`` None: its default, 20).
    docs/math.md §10; measured in benchmarks/results/quality-2026-12-01.md."""
    lam = data_log_snr(diffusion, torch.tensor([t_min], dtype=torch.float64))
    if float(lam[0]) > DATA_SNR_WINDOW[1]:
        return "ei-data"
    warped = steps is not None and data_snr_warp(check_int(steps, "steps")) > 0
    return "ei-data" if warped else "ei-ode"


@dataclass(frozen=True, eq=False)
class Solver:
    """One sampler, everything ``fastmdm.sample`` needs to know about it (see docs/solvers.md).

    plan(diffusion, times, **options): its float64 coefficients for a grid, built once and cached;
    run(loop, plan, u) -> u: its loop (``fastmdm.sampling.run_linear`` serves every plan of the form
    u ← Φ (u + Λ ε̂) + Σ_j Γ_j ε̂ + C ξ); steps, grid: defaults of ``sample``; nfe_per_step: network
    calls per step; options: the keyword options it accepts, with defaults; check(options): raises
    ValueError naming a bad option; corrector: whether a Langevin corrector may follow its steps;
    full_score: whether it needs the whole score (False: only D·s, as the reverse SDE and the
    probability-flow drift do, so a velocity-only score such as CLD-SGM's is exact); denoise: whether
    its default end is x̂₀ where the state at t_min is still noisy (False: the state, for the few-step
    multisteps whose last step beats a Tweedie call at equal NFE, docs/math.md §10).
    """

    name: str
    plan: Callable[..., Any]
    run: Callable[..., Tensor]
    steps: int = 20
    grid: str = "logsnr"
    nfe_per_step: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None
    corrector: bool = True
    full_score: bool = True
    denoise: bool = True

    def resolve(self, given: dict) -> dict:
        """This call's options: the defaults updated by ``given``, checked."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise TypeError(f"solver {self.name!r} got unknown option(s) {unknown} (it accepts: {accepted})")
        options = {**self.options, **given}
        if self.check is not None:
            self.check(options)
        return options


_REGISTRY: dict[str, Solver] = {}


class SolverNames(Sequence):
    """The registered solver names in registration order: a live, read-only tuple-like view."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


SOLVERS = SolverNames()


def register_solver(solver: Solver, replace: bool = False) -> Solver:
    """Make ``solver`` available to ``fastmdm.sample(..., solver=solver.name)``; returns it."""
    check_instance(solver, Solver, "solver")
    if not (isinstance(solver.name, str) and solver.name):
        raise ValueError(f"solver name must be a non-empty string, got {solver.name!r}")
    if solver.name in _REGISTRY and not replace:
        raise ValueError(f"a solver named {solver.name!r} is already registered (pass replace=True)")
    check_callable(solver.plan, "plan", "plan(diffusion, times, **options)")
    check_callable(solver.run, "run", "run(loop, plan, u)")
    check_int(solver.steps, "steps")
    check_int(solver.nfe_per_step, "nfe_per_step")
    check_choice(solver.grid, GRIDS, "grid")
    _REGISTRY[solver.name] = solver
    return solver


def get_solver(name: str) -> Solver:
    """The registered solver called ``name``."""
    return _REGISTRY[check_choice(name, SOLVERS, "solver")]


__all__ = [
    "SOLVERS", "AdaptivePlan", "HeunPlan", "LinearPlan", "NOISES", "Solver", "SolverNames",
    "adaptive_plan", "ancestral_plan", "check_ei_ode", "check_eta", "check_tolerances", "default_solver",
    "effective_horizon", "ei_ode_plan", "interval_gauss_legendre", "lagrange_basis",
    "euler_maruyama_plan", "flow", "get_solver", "heun_plan", "psd_sqrt", "register_solver", "sscs_plan",
    "transition_at",
]
