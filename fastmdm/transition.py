"""Exact transition kernels of a linear MDM, on the torch path (float64 results).

For du = β(t) A u dt + sqrt(β(t)) G dW with G Gᵀ = 2D, the flow over [0, t] is
M_t = exp(τ(t) A) and the covariance of the forward process is

    Σ_t = M_t Σ₀ M_tᵀ + P(τ),   P(τ) = ∫₀^τ e^{sA} (2D) e^{sAᵀ} ds.

Everything here is cancellation-free (docs/math.md §2):

* M and P by their series at h = τ/2ˢ (h‖A‖₂ ≤ ½), then s doublings
  P(2h) = P(h) + M(h) P(h) M(h)ᵀ, M(2h) = M(h)² (positive terms, no cancellation on the
  diagonal), or the closed form Σ∞ − M Σ∞ Mᵀ where ‖M‖₂² max σ²∞/min σ²∞ ≤ ½;
* L_P = chol P(τ); L_t from the QR of [σ₀ M[:, 1:], L_P]ᵀ (hybrid start: square-root
  form, no Cholesky of Σ_t whose auxiliaries are nearly collinear with x at small t) or
  L_P (full start); L_t⁻ᵀ by triangular inversion. Float64 loses eps·κ₂(C), C the
  correlation matrix of P(τ), huge at small t when D is rank-deficient (a variable that D
  reaches through A only is almost a combination of the others: P is singular to float64
  rounding though positive definite). So a τ with κ₂(C) > FLOAT64_CONDITION is computed
  again in double-double arithmetic (:mod:`fastmdm.double_double`, 32 digits: Σ_t, its
  Cholesky factor and inverse), rounded once at the end.

Measured against a 60-digit oracle (tests/test_transition_fuzz.py): Σ, L, L⁻ᵀ within
1e-12 in the normalised metric for every accepted diffusion, K ≤ 8, t ∈ [t_min, T].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import double_double as dd

TAYLOR_TERMS = 20  # |τA| ≤ 1: 1/21! ≈ 2e-20, below float64 rounding
LYAPUNOV_TERMS = 26  # ‖𝓛‖ ≤ 2‖A‖: 2²⁶/27! ≈ 6e-21
FLOAT64_CONDITION = 1e4  # κ₂(C) up to which float64's Cholesky loses at most ~1e-12


class TransitionKernel(NamedTuple):
    """q(u_t | start) = N(mean_coef @ m₀, cov), cov = chol @ cholᵀ; each (B, K, K)."""

    mean_coef: Tensor
    cov: Tensor
    chol: Tensor
    chol_inv_t: Tensor

    def to(self, dtype: torch.dtype) -> TransitionKernel:
        return TransitionKernel(*(m.to(dtype) for m in self))


def spectral_norm(A: Tensor) -> Tensor:
    """‖A‖₂, which sets the number of halvings (no gradient)."""
    return torch.linalg.matrix_norm(A.detach(), ord=2)


def halvings(tau: Tensor, norm: Tensor) -> Tensor:
    """s ≥ 0, the least with |τ|‖A‖₂ / 2ˢ ≤ 1, per τ (int64, no gradient)."""
    return torch.ceil(torch.log2((tau.detach().abs() * norm).clamp_min(1.0))).to(torch.int64)


def expm_taylor(A: Tensor, tau: Tensor, norm: Tensor | None = None) -> Tensor:
    """M = exp(τA) for a batch of τ (any sign): Taylor series at τ/2ˢ, then s squarings,
    s = :func:`halvings` (``norm``: ‖A‖₂ if already known)."""
    norm = spectral_norm(A) if norm is None else norm
    s = halvings(tau, norm)
    X = (tau / torch.exp2(s.to(tau.dtype)))[:, None, None] * A  # ‖X‖₂ ≤ 1
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(X)
    M, term = eye, eye
    for n in range(1, TAYLOR_TERMS + 1):
        term = term @ X / n
        M = M + term
    for i in range(int(s.max().item()) if s.numel() else 0):
        M = torch.where((s > i)[:, None, None], M @ M, M)
    return M


def flow_and_gramian(A: Tensor, two_d: Tensor, tau: Tensor, stationary_var: Tensor,
                     ops=dd.DoubleDouble):
    """M = exp(τA) and P(τ) = ∫₀^τ e^{sA} 2D e^{sAᵀ} ds for a batch of τ ≥ 0, in ``ops``'s
    arithmetic (double-double by default, or :class:`~fastmdm.double_double.Float64`).

    With h = τ/2ˢ, h‖A‖₂ ≤ ½: M(h) = Σ (hA)ⁿ/n! and P(h) = Σₙ hⁿ⁺¹/(n+1)! 𝓛ⁿ(2D),
    𝓛(X) = AX + XAᵀ (``ops.terms`` terms); then s doublings P(2h) = P(h) + M(h) P(h) M(h)ᵀ,
    M(2h) = M(h)², sums that never cancel on the diagonal. Where ‖M‖₂² max σ²∞/min σ²∞ ≤ ½,
    the closed form Σ∞ − M Σ∞ Mᵀ (A Σ∞ + Σ∞ Aᵀ + 2D = 0) instead: it cannot cancel there
    (P ⪰ ½ min σ²∞ I) and keeps tiny off-diagonal entries that doubling blurs in float64.
    """
    norm = spectral_norm(A)
    s = halvings(2 * tau, norm)
    h = ops.of((tau / torch.exp2(s.to(tau.dtype)))[:, None, None])
    X = ops.mul(h, ops.of(A))
    M = term = ops.of(torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand(
        tau.shape[0], -1, -1))
    P = term_p = ops.mul(h, ops.of(two_d))
    for n in range(1, ops.terms + 1):
        term = ops.div_int(ops.matmul(term, X), n)
        Y = ops.matmul(X, term_p)
        term_p = ops.div_int(ops.add(Y, Y.mT), n + 1)
        M, P = ops.add(M, term), ops.add(P, term_p)
    for i in range(int(s.max().item()) if s.numel() else 0):
        double = (s > i)[:, None, None]
        P = ops.where(double, ops.add(P, ops.matmul(ops.matmul(M, P), M.mT)), P)
        M = ops.where(double, ops.matmul(M, M), M)
    spread = (stationary_var.max() / stationary_var.min()).detach()
    safe = (torch.linalg.matrix_norm(ops.value(M).detach(), ord=2) ** 2 * spread <= 0.5)
    closed = ops.add(ops.of(torch.diag(stationary_var)),
                     ops.neg(ops.matmul(ops.mul(M, ops.of(stationary_var)), M.mT)))
    return M, ops.where(safe[:, None, None], closed, P)


def expm_and_gramian(A: Tensor, two_d: Tensor, tau: Tensor,
                     stationary_var: Tensor) -> tuple[Tensor, Tensor]:
    """M = exp(τA) and P(τ), computed in double-double and rounded to float64."""
    M, P = flow_and_gramian(A, two_d, tau, stationary_var)
    return M.hi, P.hi


def _kernel(A: Tensor, two_d: Tensor, tau: Tensor, init_aux_var: float | None,
            stationary_var: Tensor, ops) -> tuple[TransitionKernel, Tensor]:
    """(M, Σ, L, L⁻ᵀ) in ``ops``'s arithmetic, rounded to float64, and L_P = chol P(τ).

    Float64 takes the hybrid start's L_t from the QR of [σ₀ M[:, 1:], L_P]ᵀ (square-root
    form: no Cholesky of Σ_t, whose auxiliaries are nearly collinear with x at small t), so
    its accuracy rests on P's conditioning alone; double-double factors Σ_t directly.
    """
    M, P = flow_and_gramian(A, two_d, tau, stationary_var, ops)
    half = ops.of(torch.full((), 0.5, dtype=A.dtype, device=A.device))
    P = ops.mul(ops.add(P, P.mT), half)  # exactly symmetric
    L_P = ops.cholesky(P)
    cov, L = P, L_P
    if init_aux_var is not None and A.shape[-1] > 1:
        sigma0 = torch.full((A.shape[-1],), float(init_aux_var), dtype=A.dtype, device=A.device)
        sigma0[0] = 0.0
        cov = ops.add(P, ops.matmul(ops.mul(M, ops.of(sigma0)), M.mT))  # M Σ₀ Mᵀ + P
        cov = ops.mul(ops.add(cov, cov.mT), half)
        if ops is dd.Float64:
            L = lower_factor(torch.cat([init_aux_var**0.5 * M[..., 1:], L_P], -1))
        else:
            L = ops.cholesky(cov)
    tk = TransitionKernel(ops.value(M), ops.value(cov), ops.value(L),
                          ops.value(ops.lower_inverse(L)).mT)
    return tk, ops.value(L_P)


def lower_factor(X: Tensor) -> Tensor:
    """L lower triangular, L ≥ 0 on the diagonal, L Lᵀ = X Xᵀ, from the QR of Xᵀ (row by row
    of X backward stable, so a tiny row keeps its relative accuracy)."""
    R = torch.linalg.qr(X.mT).R  # mode "r" has no backward
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0)
    return (R * sign[..., :, None]).mT


def correlation_condition(chol: Tensor) -> Tensor:
    """(B,) κ₂ of the correlation matrix C = diag(Σ)^-½ Σ diag(Σ)^-½ of Σ = chol cholᵀ
    (inf for a failed factor): the squared condition number of chol's row-normalised rows.
    Float64 Cholesky and triangular inversion lose about eps·κ₂(C) (docs/math.md §2)."""
    rows = chol / chol.norm(dim=-1, keepdim=True)
    finite = torch.isfinite(rows).flatten(1).all(1)
    sv = torch.linalg.svdvals(torch.where(finite[:, None, None], rows, 1.0))
    return torch.where(finite, (sv[..., 0] / sv[..., -1]) ** 2, torch.inf)


def transition_kernel(
    A: Tensor, two_d: Tensor, tau: Tensor, init_aux_var: float | None, stationary_var: Tensor
) -> TransitionKernel:
    """Mean coefficient, covariance, Cholesky factor and its inverse transpose (float64).

    ``init_aux_var=None`` is the full start (Σ₀ = 0); a float σ₀² the hybrid start
    Σ₀ = diag(0, σ₀², …, σ₀²). Σ_t = M Σ₀ Mᵀ + P, L_t = chol Σ_t and L_t⁻ᵀ by triangular
    inversion: in float64 where κ₂ of P(τ)'s correlation matrix is at most
    FLOAT64_CONDITION, else in double-double (32 digits) and rounded once. Differentiable.
    """
    with torch.no_grad():
        fast, chol_p = _kernel(A, two_d, tau, init_aux_var, stationary_var, dd.Float64)
        slow = ~(correlation_condition(chol_p) <= FLOAT64_CONDITION)
    if not slow.any():
        grad = A.requires_grad or two_d.requires_grad or tau.requires_grad
        return _kernel(A, two_d, tau, init_aux_var, stationary_var, dd.Float64)[0] if grad else fast
    if slow.all():
        return _kernel(A, two_d, tau, init_aux_var, stationary_var, dd.DoubleDouble)[0]
    parts = [_kernel(A, two_d, tau[rows], init_aux_var, stationary_var, ops)[0]
             for rows, ops in ((~slow, dd.Float64), (slow, dd.DoubleDouble))]
    order = torch.cat([(~slow).nonzero().flatten(), slow.nonzero().flatten()]).argsort()
    return TransitionKernel(*(torch.cat(pair)[order] for pair in zip(*parts, strict=True)))
