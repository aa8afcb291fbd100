"""The noise frame K_t = L_t R_t that makes the order-1 exponential integrator exact (docs/math.md §7).

K_t solves dK/dt = β(t)(A + D Σ_t⁻¹) K with K_T = L_T, so K_t K_tᵀ = Σ_t (hybrid start) at every t and,
for a single-point data law, u_t = μ_t + K_t ε_K with ε_K constant along probability-flow trajectories.
That ODE is stiff (D Σ_t⁻¹ ~ 1e10 at t_min), so it is never integrated as written. With L_t the accurate
Cholesky factor of §2, K_t = L_t R_t where R_t is orthogonal and dR/dt = Ω_t R,

    C = L⁻¹ A L,   W = L⁻¹ (2D) L⁻ᵀ,   S = C + Cᵀ + W,
    Ω = β(t) Ω̃(τ),   Ω̃ = ½(C − Cᵀ) + ½(triu(S, 1) − tril(S, −1)).

Ω̃ depends on τ only, so in ρ = log τ the equation reads dR/dρ = τ Ω̃(τ) R, whose rate stays O(1) over
[t_min, T]. That linear equation is solved from R = I at τ(T) down to the smallest τ asked for by
Gauss–Legendre collocation (see ``rotation``) in float64, once per diffusion and set of times, and cached.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from .diffusion import LinearDiffusion

COLLOCATION_NODES = 8  # order 16 per step
MAX_STEP_RATE = 0.5  # h‖F‖ per step: local error far below float64 rounding
MAX_STEP = 0.5  # in ρ = log τ
_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()


def diffusion_key(diffusion: LinearDiffusion) -> tuple:
    """A hashable fingerprint of everything the forward process depends on (values, not identity)."""
    mats = torch.cat([diffusion.A.detach().flatten(), diffusion.D.detach().flatten(),
                      diffusion.stationary_var.detach().flatten()]).cpu()
    return (mats.numpy().tobytes(), diffusion.schedule.key, diffusion.t_min, diffusion.T,
            diffusion.init_aux_var)


@torch.no_grad()
def hybrid_factor(diffusion: LinearDiffusion, tau: Tensor) -> Tensor:
    """L at the given τ values (hybrid start, float64 on CPU), (n, K, K)."""
    t = diffusion.tau_inverse(tau.to(torch.float64))
    return diffusion.transition_f64(t.clamp(diffusion.t_min, diffusion.T), "hybrid").chol


@torch.no_grad()
def rotation_rate(diffusion: LinearDiffusion, tau: Tensor) -> Tensor:
    """Ω̃(τ) = ½(C − Cᵀ) + ½(triu(S, 1) − tril(S, −1)) for a batch of τ, float64 (n, K, K)."""
    L = hybrid_factor(diffusion, tau)
    A, two_d = diffusion.A.detach().cpu(), 2.0 * diffusion.D.detach().cpu()
    L_inv = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=L.dtype).expand_as(L), upper=False)
    C = L_inv @ A @ L
    W = L_inv @ two_d @ L_inv.transpose(-1, -2)
    S = C + C.transpose(-1, -2) + W
    return 0.5 * (C - C.transpose(-1, -2)) + 0.5 * (S.triu(1) - S.tril(-1))


def gauss_legendre(m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gauss–Legendre collocation on [0, 1]: nodes c (m,), Butcher matrix a (m, m), weights b (m,)."""
    x, w = np.polynomial.legendre.leggauss(m)
    c, b = (x + 1) / 2, w / 2
    # a_ij = ∫₀^{c_i} ℓ_j with ℓ_j the Lagrange basis on the nodes, by the same rule on [0, c_i]
    # (exact for degree m − 1) and ℓ_j in product form: no polynomial coefficients, no cancellation
    y = c[:, None] * c[None, :]  # (i, k): nodes on [0, c_i]
    diff = c[:, None] - c[None, :]
    np.fill_diagonal(diff, 1.0)
    a = np.empty((m, m))
    for j in range(m):
        others = np.delete(np.arange(m), j)
        ell = np.prod((y[..., None] - c[others]) / diff[j, others], axis=-1)  # ℓ_j(y_ik)
        a[:, j] = c * (ell @ b)
    return tuple(torch.from_numpy(v).to(torch.float64) for v in (c, a, b))


def _substeps(edges: Tensor, rate_norm: Tensor) -> Tensor:
    """Split each gap between consecutive ρ edges so that h·‖rate‖ ≤ MAX_STEP_RATE and h ≤ MAX_STEP."""
    gap = (edges[1:] - edges[:-1]).abs()
    bound = torch.maximum(rate_norm[1:], rate_norm[:-1])
    n = torch.ceil(torch.maximum(gap * bound / MAX_STEP_RATE, gap / MAX_STEP)).clamp_min(1).to(torch.int64)
    pieces = [edges[:1]]
    for lo, hi, k in zip(edges[:-1].tolist(), edges[1:].tolist(), n.tolist(), strict=True):
        pieces.append(torch.linspace(lo, hi, k + 1, dtype=torch.float64)[1:])
    return torch.cat(pieces)


@torch.no_grad()
def rotation(diffusion: LinearDiffusion, tau: Tensor) -> Tensor:
    """R at the given τ values (any order, each ≤ τ(T)), float64 (n, K, K); R = I at τ(T).

    dR/dρ = F(ρ) R, F = τ Ω̃(τ), ρ = log τ, is linear, so each step [ρ_a, ρ_b] of length h is solved
    by Gauss–Legendre collocation with m = COLLOCATION_NODES stages (order 2m, and it keeps R
    orthogonal to rounding, R Rᵀ being a quadratic invariant): the stages Y_i = R_a + h Σ_j a_ij F_j Y_j
    form one linear system, and R_b = R_a + h Σ_i b_i F_i Y_i. Every F_j of every step is computed in
    one batched call and every step's propagator in one batched solve; steps obey h·‖F‖ ≤ ½.
    Cached per diffusion and set of τ.
    """
    tau = tau.detach().to(torch.float64).cpu().flatten()
    K = diffusion.K
    eye = torch.eye(K, dtype=torch.float64)
    if K == 1:  # Ω̃ is skew and 1×1: R ≡ 1
        return eye.expand(tau.numel(), 1, 1).clone()
    key = (diffusion_key(diffusion), tau.numpy().tobytes())
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key].clone()
    tau_T = diffusion.tau(torch.tensor([diffusion.T], dtype=torch.float64))
    if not (tau > 0).all() or tau.max() > tau_T[0] * (1 + 1e-12):
        raise ValueError(f"rotation: every tau must lie in (0, tau(T) = {float(tau_T[0])}]")
    levels, inverse = torch.unique(torch.cat([tau_T, tau.clamp(max=tau_T[0])]), return_inverse=True)
    edges = levels.flip(0).log()  # descending ρ, edges[0] = log τ(T)
    desc = levels.flip(0)
    rate_norm = (desc[:, None, None] * rotation_rate(diffusion, desc)).flatten(1).norm(dim=1)
    rho = _substeps(edges, rate_norm)
    c, a, b = gauss_legendre(COLLOCATION_NODES)
    m = c.numel()
    h = rho[1:] - rho[:-1]  # (S,) negative
    nodes = rho[:-1, None] + h[:, None] * c  # (S, m)
    node_tau = nodes.exp().flatten()
    F = (node_tau[:, None, None] * rotation_rate(diffusion, node_tau)).view(-1, m, K, K)
    S = h.numel()
    # system (I − h a ⊗ F_j) Y = 1 ⊗ I for the stacked stages Y (m K × K), per step
    system = -(h[:, None, None, None, None] * a[None, :, :, None, None] * F[:, None]).permute(0, 1, 3, 2, 4)
    system = system.reshape(S, m * K, m * K) + torch.eye(m * K, dtype=torch.float64)
    rhs = eye.repeat(m, 1).expand(S, m * K, K)  # numpy: torch's first batched solve costs seconds
    Y = torch.from_numpy(np.linalg.solve(system.numpy(), rhs.numpy())).view(S, m, K, K)
    prop = eye + h[:, None, None] * (b[None, :, None, None] * (F @ Y)).sum(1)  # (S, K, K)
    states = [eye]
    for P in prop:
        states.append(P @ states[-1])
    at_rho = dict(zip(rho.tolist(), states, strict=True))
    R_levels = torch.stack([at_rho[r] for r in edges.tolist()]).flip(0)  # ascending τ, like ``levels``
    result = R_levels[inverse[1:]]
    _cache[key] = result
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return result.clone()


def noise_frame(diffusion: LinearDiffusion, tau: Tensor) -> Tensor:
    """K = L R at the given τ values, float64 (n, K, K): K Kᵀ = Σ (hybrid start)."""
    return hybrid_factor(diffusion, tau) @ rotation(diffusion, tau)


__all__ = ["hybrid_factor", "noise_frame", "rotation", "rotation_rate"]
