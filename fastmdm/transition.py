"""Exact transition kernels of a linear MDM, on the torch path (float64).

For du = β(t) A u dt + sqrt(β(t)) G dW with G Gᵀ = 2D, the flow over [0, t] is
M_t = exp(τ(t) A) and the covariance of the forward process is

    Σ_t = M_t Σ₀ M_tᵀ + P(τ),   P(τ) = ∫₀^τ e^{sA} (2D) e^{sAᵀ} ds.

Everything here is cancellation-free (mdm-math.md §2):

* for τ‖A‖₂ ≤ 1, M by its Taylor series and P by the Lyapunov series
  P(τ) = Σₙ τⁿ⁺¹/(n+1)! 𝓛ⁿ(2D), 𝓛(X) = AX + XAᵀ;
* beyond, M by scaling and squaring (Taylor at τ/2ˢ, then s squarings) and P by
  the closed form P = Σ∞ − M Σ∞ Mᵀ (A Σ∞ + Σ∞ Aᵀ + 2D = 0). Once M is small the
  closed form is exact to rounding even for Σ's tiny off-diagonal entries,
  which the doubling P(2τ) = P(τ) + e^{τA} P(τ) e^{τAᵀ} is not (measured:
  4e-9 relative for MALDA(5) at T against 1e-21);
* the Cholesky factor in square-root form: Σ_t = X Xᵀ with
  X = [σ₀ M_t[:, 1:], chol P(τ)], so L_t = Rᵀ from the QR of Xᵀ.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

TAYLOR_TERMS = 20  # |τA| ≤ 1: 1/21! ≈ 2e-20, below float64 rounding
LYAPUNOV_TERMS = 26  # ‖𝓛‖ ≤ 2‖A‖: 2²⁶/27! ≈ 6e-21


class TransitionKernel(NamedTuple):
    """q(u_t | start) = N(mean_coef @ m₀, cov), cov = chol @ cholᵀ; each (B, K, K)."""

    mean_coef: Tensor
    cov: Tensor
    chol: Tensor
    chol_inv_t: Tensor

    def to(self, dtype: torch.dtype) -> TransitionKernel:
        return TransitionKernel(*(m.to(dtype) for m in self))


def spectral_norm(A: Tensor) -> Tensor:
    """‖A‖₂, which sets the series/closed-form switch and the squarings (no gradient)."""
    return torch.linalg.matrix_norm(A.detach(), ord=2)


def expm_taylor(A: Tensor, tau: Tensor, norm: Tensor | None = None) -> Tensor:
    """M = exp(τA) for a batch of τ (any sign): Taylor series at τ/2ˢ, then s squarings,
    s ≥ 0 the least with |τ|‖A‖₂ / 2ˢ ≤ 1 (``norm``: ‖A‖₂ if already known)."""
    norm = spectral_norm(A) if norm is None else norm
    s = torch.ceil(torch.log2((tau.detach().abs() * norm).clamp_min(1.0))).to(torch.int64)
    X = (tau / torch.exp2(s.to(tau.dtype)))[:, None, None] * A  # ‖X‖₂ ≤ 1
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(X)
    M, term = eye, eye
    for n in range(1, TAYLOR_TERMS + 1):
        term = term @ X / n
        M = M + term
    for i in range(int(s.max().item()) if s.numel() else 0):
        M = torch.where((s > i)[:, None, None], M @ M, M)
    return M


def expm_and_gramian(A: Tensor, two_d: Tensor, tau: Tensor,
                     stationary_var: Tensor) -> tuple[Tensor, Tensor]:
    """M = exp(τA) and P(τ) = ∫₀^τ e^{sA} 2D e^{sAᵀ} ds for a batch of τ ≥ 0 (float64).

    A, two_d: (K, K) with A Σ∞ + Σ∞ Aᵀ + 2D = 0, Σ∞ = diag(stationary_var); tau: (B,).
    P by the Lyapunov series while τ‖A‖₂ ≤ 1, else Σ∞ − M Σ∞ Mᵀ. Differentiable.
    """
    norm = spectral_norm(A)
    M = expm_taylor(A, tau, norm)
    small = tau * norm <= 1.0
    tau_series = torch.minimum(tau, 1.0 / norm)  # keeps the unused branch finite
    X = tau_series[:, None, None] * A
    term = tau_series[:, None, None] * two_d  # τ 2D
    P = term
    for n in range(1, LYAPUNOV_TERMS + 1):
        term = (X @ term + term @ X.mT) / (n + 1)
        P = P + term
    closed = torch.diag(stationary_var) - (M * stationary_var) @ M.mT
    return M, torch.where(small[:, None, None], P, closed)


def transition_kernel(
    A: Tensor, two_d: Tensor, tau: Tensor, init_aux_var: float | None, stationary_var: Tensor
) -> TransitionKernel:
    """Mean coefficient, covariance, Cholesky factor and its inverse transpose (float64).

    ``init_aux_var=None`` is the full start (Σ₀ = 0); a float σ₀² the hybrid start
    Σ₀ = diag(0, σ₀², …, σ₀²). Σ_t = M Σ₀ Mᵀ + P and L_t from the QR of
    [σ₀ M[:, 1:], chol P]ᵀ (square-root form, no inner products that cancel).
    """
    M, P = expm_and_gramian(A, two_d, tau, stationary_var)
    L = torch.linalg.cholesky(P)
    K = A.shape[-1]
    if init_aux_var is not None and K > 1:
        aux = (init_aux_var**0.5) * M[..., 1:]
        cov = aux @ aux.mT + P
        X = torch.cat([aux, L], dim=-1)  # (B, K, 2K-1), X Xᵀ = Σ_t
        R = torch.linalg.qr(X.mT).R  # Xᵀ = Q R, Σ_t = Rᵀ R (mode "r" has no backward)
        sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
        L = (R * sign[..., :, None]).mT
    else:
        cov = P
    eye = torch.eye(K, dtype=A.dtype, device=A.device).expand_as(L)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return TransitionKernel(M, cov, L, L_inv.mT)
