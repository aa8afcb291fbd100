"""Sampling diffusion time, uniformly or by the paper's importance density (docs/math.md §4).

p(t) ∝ r(t) = β(t) / (1 − e^{−τ(t)}) on [t_min, T]. With φ(t) = log(e^{τ(t)} − 1)
(``LinearDiffusion.phi``), φ' = r, so F(t) = (φ(t) − φ(t_min)) / Z, Z = φ(T) − φ(t_min), inverted in closed
form: τ* = softplus(φ(t_min) + U Z), t = τ⁻¹(τ*). Estimates use g(t) / p(t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .validation import check_int


def importance_normaliser(diffusion: LinearDiffusion) -> float:
    """Z = φ(T) − φ(t_min)."""
    phi = diffusion.phi(torch.tensor([diffusion.t_min, diffusion.T], dtype=torch.float64))
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
    check_int(n, "n")
    U = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
    lo, hi = diffusion.t_min, diffusion.T
    if not importance:
        return lo + (hi - lo) * U, torch.full_like(U, 1.0 / (hi - lo))
    phi_lo, phi_hi = diffusion.phi(torch.tensor([lo, hi], dtype=torch.float64, device=device))
    tau = torch.nn.functional.softplus(phi_lo + U * (phi_hi - phi_lo))
    t = diffusion.tau_inverse(tau).clamp(lo, hi)
    return t, importance_pdf(diffusion, t)


__all__ = ["importance_normaliser", "importance_pdf", "sample_time"]
