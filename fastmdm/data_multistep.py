"""Data-prediction multistep exponential integrator for any MDM (docs/math.md §10).

With the noise frame K_t = L_t R_t (§7), a_t = M_t[:, 0] and c_t = K_t⁻¹ a_t (‖c_t‖ = ‖L_t⁻¹ a_t‖: the
data variable's signal-to-noise ratio), the probability-flow ODE with the posterior mean
x̂₀ = E[x₀ | u_t] reads d(K_t⁻¹ u)/dt = ċ_t x̂₀ exactly (the matrix form of DPM-Solver++'s equation), so

    u_s = K_s K_t⁻¹ u_t + K_s ∫_t^s ċ_r x̂₀(r) dr.

x̂₀ is held to the polynomial p(σ) through the last q predictions in σ = 1/‖c‖ (x̂₀ is smooth in σ,
nearly linear in σ² as σ → 0; in λ = log‖c‖ the polynomial is extrapolated across steps of many units
of λ where ċ is largest). Order 1 is the rotated order-1 step of ``ei_ode_plan``, exact for a
single-point data law; orders 2–3 add K_s Σ_j (ω_j − δ_j0 Σ_i ω_i) x̂₀_{n−j}, ω_j = ∫ ċ ℓ_j(σ) dρ, whose
weights sum to zero, so a constant x̂₀ (a point mass) adds nothing. The corrector (UniPC's UniC) retakes
step n once x̂₀_{n+1} is known, with the polynomial through it: interpolation instead of extrapolation, one
order more, no extra network call. The integrals use Gauss–Legendre in ρ = log τ on pieces of at most
``MAX_PIECE``, in float64, once per grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .grids import DATA_ORDER3_STEPS, data_log_snr
from .noise_frame import rotation
from .ops import apply_kk
from .parameterization import denoised_weights
from .sde_step import sde_step
from .solvers import (
    QUADRATURE_NODES,
    LinearPlan,
    ei_ode_plan,
    interval_gauss_legendre,
    lagrange_basis,
    transition_at,
)
from .validation import check_choice, check_instance, check_int

MAX_PIECE = 0.5  # longest Gauss–Legendre piece in ρ = log τ


class DataPlan(NamedTuple):
    """The order-1 step ``base`` plus, per step, corrections (N, H, K) acting on x̂₀_{n−j}, and the
    corrector's ``retakes`` (N, H + 1, K) acting on x̂₀_{n+1−j} once x̂₀_{n+1} is known (None: none);
    x̂₀_n = weights[n]ᵀ(chol_inv[n] u − ε̂) (Tweedie, docs/math.md §3). Float64 on CPU."""

    base: LinearPlan
    corrections: Tensor
    retakes: Tensor | None
    weights: Tensor
    chol_inv: Tensor
    eval_times: Tensor


def _pieces(rho: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """Gauss–Legendre nodes and oriented weights in ρ on every step, split into pieces ≤ MAX_PIECE."""
    lows, highs, counts = [], [], []
    for lo, hi in zip(rho[:-1].tolist(), rho[1:].tolist(), strict=True):
        edges = torch.linspace(lo, hi, max(1, math.ceil(abs(hi - lo) / MAX_PIECE)) + 1, dtype=torch.float64)
        lows.append(edges[:-1])
        highs.append(edges[1:])
        counts.append((edges.numel() - 1) * QUADRATURE_NODES)
    nodes, weights = interval_gauss_legendre(torch.cat(lows), torch.cat(highs), QUADRATURE_NODES)
    return nodes.flatten(), weights.flatten(), counts


def _signal(diffusion: LinearDiffusion, tau: Tensor, span: Tensor) -> tuple[Tensor, Tensor]:
    """σ = 1/‖c‖ (n,) and dc/dρ = −τ K⁻¹ D K⁻ᵀ c (n, K) at the given τ (times kept in ``span``),
    c = K⁻¹a = Rᵀ L⁻¹a, float64."""
    t = diffusion.tau_inverse(tau).clamp(float(span.min()), float(span.max()))
    tk = transition_at(diffusion, t)
    R = rotation(diffusion, tau)
    L_inv = tk.chol_inv_t.mT
    b = (L_inv @ tk.mean_coef[..., :1])  # L⁻¹a, (n, K, 1)
    D = diffusion.D.detach().to(torch.float64).cpu()
    rate = -tau[:, None] * (R.mT @ L_inv @ D @ L_inv.mT @ b)[..., 0]
    return 1.0 / b[..., 0].norm(dim=-1), rate


def _step_weights(frame: Tensor, sigma: Tensor, node_sigma: Tensor, rate: Tensor, weights: Tensor,
                  counts: list[int], order: int, lead: int) -> Tensor:
    """K_{n+1} Σ_j (ω_j − δ_j,lead Σ_i ω_i) per step n, ω_j = ∫ ℓ_j(σ) dc with ℓ_j through σ_{n+lead−j},
    j < min(order, n + 1 + lead): lead 0 extrapolates from the step's start (the predictor), lead 1
    interpolates through its end too (the corrector); (N, order, K)."""
    corrections = torch.zeros(len(counts), order, frame.shape[-1], dtype=torch.float64)
    start = 0
    for n, m in enumerate(counts):
        span = slice(start, start + m)
        start += m
        q = min(order, n + 1 + lead)
        if q == 1:
            continue
        points = [float(sigma[n + lead - j]) for j in range(q)]
        shifted = node_sigma[span].numpy() - points[0]
        basis = torch.stack([torch.from_numpy(lagrange_basis(points, j)(shifted)) for j in range(q)])
        omega = (weights[span] * basis) @ rate[span]  # (q, K): ∫ ℓ_j(σ) dc
        omega[lead] -= omega.sum(0)
        corrections[n, :q] = (frame[n + 1] @ omega.mT).mT
    return corrections


def data_multistep_order(steps: int) -> int:
    """The default order: 2 below DATA_ORDER3_STEPS steps, where a 3rd-order extrapolation over the long
    steps overshoots, else 3 (docs/math.md §10, measured on sharp mixtures)."""
    return 2 if steps < DATA_ORDER3_STEPS else 3


def data_multistep_plan(diffusion: LinearDiffusion, times: Tensor, order: int | None = None,
                        correct: bool = True) -> DataPlan:
    """Coefficients of the data-prediction multistep integrator of order 1–3 (warm start; None: by the
    number of steps) on ``times``, with the corrector of order + 1 when ``correct``."""
    times = times.to(torch.float64)
    N, K = times.numel() - 1, diffusion.K
    order = data_multistep_order(N) if order is None else order
    base = ei_ode_plan(diffusion, times, 1)
    tau = diffusion.tau(times)
    sigma = torch.exp(-data_log_snr(diffusion, times))
    frame = transition_at(diffusion, times).chol @ rotation(diffusion, tau)
    corrections = torch.zeros(N, order, K, dtype=torch.float64)
    retakes = None
    if N > 1 and (order > 1 or correct):
        nodes, weights, counts = _pieces(tau.log())
        node_sigma, rate = _signal(diffusion, nodes.exp(), times)
        corrections = _step_weights(frame, sigma, node_sigma, rate, weights, counts, order, 0)
        if correct:  # the last step stays the predictor's: there is no evaluation at t_N
            retakes = _step_weights(frame, sigma, node_sigma, rate, weights, counts, order + 1, 1)
            retakes[:, 1:] -= corrections
    tk = transition_at(diffusion, times[:-1])
    return DataPlan(base, corrections, retakes, denoised_weights(tk), tk.chol_inv_t.mT, base.eval_times)


def check_data_multistep(options: dict) -> None:
    """order ∈ {None, 1, 2, 3}, correct a bool."""
    if options["order"] is not None:
        check_choice(check_int(options["order"], "order"), (1, 2, 3), "order")
    check_instance(options["correct"], bool, "correct")


def run_data_multistep(loop, plan: DataPlan, u: Tensor) -> Tensor:
    """u ← [order-1 step](u, ε̂_n) + Σ_j corrections[n, j] x̂₀_{n−j}, x̂₀ from the same network call; with
    the corrector, first u_n += δ = Σ_j retakes[n−1, j] x̂₀_{n−j} and ε̂_n += L_n⁻¹δ, which keeps x̂₀_n
    (ε̂ = L⁻¹(u − a x̂₀), docs/math.md §3) — the step to t_n retaken with x̂₀_n, no extra network call."""
    coefs, _ = plan.base.packed()
    coefs = coefs.to(u.device)
    corrections = plan.corrections.to(device=u.device, dtype=u.dtype)
    retakes = None if plan.retakes is None else plan.retakes.to(device=u.device, dtype=u.dtype)
    weights = plan.weights.to(device=u.device, dtype=u.dtype)
    chol_inv = plan.chol_inv.to(u.device)
    N, H = corrections.shape[:2]
    seeds = torch.zeros(N, dtype=torch.int64, device=u.device)  # the step draws no noise
    t_eval = loop.net.times(plan.eval_times)
    shape = (1, -1, *([1] * (u.dim() - 2)))
    history: list[Tensor] = []
    for n in range(N):
        eps = loop.eps(u, t_eval[n], n)
        denoised = torch.einsum("k,bk...->b...", weights[n], apply_kk(chol_inv[n], u) - eps)
        history = [denoised, *history][:H + 1]
        if retakes is not None and n > 0:
            delta = sum(retakes[n - 1, j].view(shape) * x0.unsqueeze(1) for j, x0 in enumerate(history))
            u = u + delta
            eps = eps + apply_kk(chol_inv[n], delta)
        u_eval = u
        u = sde_step(u, [eps], coefs[n, :4], seeds, n, False, loop.generator)
        for j, x0 in enumerate(history[:H] if H > 1 else []):
            u = u + corrections[n, j].view(shape) * x0.unsqueeze(1)
        u = loop.end_step(u, n, u_eval, eps)
    return u


__all__ = ["DataPlan", "check_data_multistep", "data_multistep_order", "data_multistep_plan",
           "run_data_multistep"]
