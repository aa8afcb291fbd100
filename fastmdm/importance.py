"""Sampling diffusion time, uniformly or by the paper's importance density (mdm-math.md §4).

p(t) ∝ r(t) = β(t) / (1 − e^{−τ(t)}) on [t_min, T]. With φ(t) = log(e^{τ(t)} − 1),
φ' = r, so F(t) = (φ(t) − φ(t_min)) / Z, Z = φ(T) − φ(t_min), inverted in closed
form: τ* = softplus(φ(t_min) + U Z), t = τ⁻¹(τ*). Estimates use g(t) / p(t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .diffusion import LinearDiffusion


def _phi(tau: Tensor) -> Tensor:
    """φ = log(e^τ − 1) = τ + log(−expm1(−τ)), stable for small and large τ."""
    return tau + torch.log(-torch.expm1(-tau))


def tau_inverse(diffusion: LinearDiffusion, tau: Tensor) -> Tensor:
    """t with τ(t) = tau: the positive root of ½(β_max − β_min) t² + β_min t − τ = 0."""
    slope = diffusion.beta_max - diffusion.beta_min
    if slope == 0:
        return tau / diffusion.beta_min
    b = diffusion.beta_min
    # t = 2τ / (b + sqrt(b² + 2 slope τ)): the root without cancellation
    return 2 * tau / (b + torch.sqrt(b * b + 2 * slope * tau))


def importance_normaliser(diffusion: LinearDiffusion) -> float:
    """Z = φ(T) − φ(t_min)."""
    ends = diffusion.tau(torch.tensor([diffusion.t_min, diffusion.T], dtype=torch.float64))
    phi = _phi(ends)
    return float(phi[1] - phi[0])


def importance_pdf(diffusion: LinearDiffusion, t: Tensor) -> Tensor:
    """p(t) = β(t) / ((1 − e^{−τ(t)}) Z), float64."""
    t = t.to(torch.float64)
    tau = diffusion.tau(t)
    return diffusion.beta(t) / (-torch.expm1(-tau)) / importance_normaliser(diffusion)


def sample_time(diffusion: LinearDiffusion, n: int, importance: bool = True,
                generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
    """Draw n times in [t_min, T]; returns (t, p(t)) in float64, shape (n,).

    importance=False: uniform, p = 1 / (T − t_min).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    U = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
    lo, hi = diffusion.t_min, diffusion.T
    if not importance:
        return lo + (hi - lo) * U, torch.full_like(U, 1.0 / (hi - lo))
    ends = diffusion.tau(torch.tensor([lo, hi], dtype=torch.float64, device=device))
    phi_lo, phi_hi = _phi(ends)
    tau = torch.nn.functional.softplus(phi_lo + U * (phi_hi - phi_lo))
    t = tau_inverse(diffusion, tau).clamp(lo, hi)
    return t, importance_pdf(diffusion, t)


__all__ = ["importance_normaliser", "importance_pdf", "sample_time", "tau_inverse"]
