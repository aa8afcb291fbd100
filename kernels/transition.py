"""Transition-kernel coefficients (docs/math.md §2) for a batch of times in one Triton launch.

Each lane of a program is one sample τ; every K×K matrix lives in float64 registers as a
tuple of K² vectors over the lanes (K a compile-time constant, every loop over K unrolled):

* s = ⌈log₂ max(τ‖A‖₂, 1)⌉, X = τA / 2ˢ, M = (Σ_{n≤20} Xⁿ/n!)^(2ˢ) (Taylor, s squarings);
* P = Σ_{n≤26} τ/(n+1)! 𝓛ⁿ(2D), 𝓛(Y) = AY + YAᵀ, where τ‖A‖₂ ≤ 1 (then s = 0), else the
  closed form Σ∞ − M Σ∞ Mᵀ (exact to rounding once M is small);
* Σ = M Σ₀ Mᵀ + P; L = chol P, then for the hybrid start the rank-one updates
  L Lᵀ + v vᵀ, v = σ₀ M[:, k] (k ≥ 1), each a sweep of Givens rotations — the square-root
  form [σ₀ M[:, 1:], chol P] = L Q without cancelling inner products;
* L⁻ᵀ by forward substitution.

Divisions by a pivot or a Givens radius multiply by its reciprocal (a float64 division is a call
to a slow-path subroutine, and the registers saved around those calls spilled at K = 4); the
series keep x / n, so that M and P round as the torch path's. Registers bound K: the package
launches this kernel up to ``TRANSITION_MAX_K`` (:mod:`fastmdm.kernels.common`).

These are the numerics of :mod:`fastmdm.transition`, which passes in the series lengths, ‖A‖₂
and itself: gradients come from recomputing that torch path on the K×K inputs
(:class:`_TransitionFn`), so this module imports nothing from fastmdm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import MAX_K, TransitionSeries, block_size, launch_on

BLOCK_B = 32  # samples (lanes) per program on GPU: one warp


@triton.jit
def _matmul(X, Y, K: tl.constexpr):
    """Row-major (X Y)[i, j] = Σ_l X[i, l] Y[l, j] of two K×K register matrices."""
    out = ()
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            acc = X[i * K] * Y[j]
            for l in tl.static_range(1, K):
                acc += X[i * K + l] * Y[l * K + j]
            out = out + (acc,)
    return out


@triton.jit
def _add(X, Y, K: tl.constexpr):
    out = ()
    for i in tl.static_range(K * K):
        out = out + (X[i] + Y[i],)
    return out


@triton.jit
def _sym_abt(X, Y, K: tl.constexpr):
    """Symmetric (X Yᵀ)[i, j] = Σ_l X[i, l] Y[j, l], computed for i ≤ j and mirrored."""
    out = ()
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            if j < i:
                out = out + (out[j * K + i],)
            else:
                acc = X[i * K] * Y[j * K]
                for l in tl.static_range(1, K):
                    acc += X[i * K + l] * Y[j * K + l]
                out = out + (acc,)
    return out


@triton.jit
def _where(cond, X, Y, K: tl.constexpr):
    out = ()
    for i in tl.static_range(K * K):
        out = out + (tl.where(cond, X[i], Y[i]),)
    return out


@triton.jit
def _cholesky(P, K: tl.constexpr):
    """Column-major lower L with L Lᵀ = P (P row-major, symmetric positive definite)."""
    L = ()
    for j in tl.static_range(K):
        diag = P[j * K + j]
        for k in tl.static_range(j):
            diag -= L[k * K + j] * L[k * K + j]
        diag = tl.sqrt(diag)
        inv_diag = 1.0 / diag
        for i in tl.static_range(K):
            if i < j:
                L = L + (diag * 0.0,)
            elif i == j:
                L = L + (diag,)
            else:
                acc = P[i * K + j]
                for k in tl.static_range(j):
                    acc -= L[k * K + i] * L[k * K + j]
                L = L + (acc * inv_diag,)
    return L


@triton.jit
def _rank_one_update(L, v, K: tl.constexpr):
    """Column-major L' with L' L'ᵀ = L Lᵀ + v vᵀ: Givens rotations of (L[:, i], v), i = 0…K−1."""
    out = ()
    for i in tl.static_range(K):
        lii = L[i * K + i]
        r = tl.sqrt(lii * lii + v[i] * v[i])
        inv_r = 1.0 / r
        c = lii * inv_r
        s = v[i] * inv_r
        w = ()
        for j in tl.static_range(K):
            if j < i:
                out = out + (L[i * K + j],)
                w = w + (v[j],)
            elif j == i:
                out = out + (r,)
                w = w + (v[j] * 0.0,)
            else:
                out = out + (c * L[i * K + j] + s * v[j],)
                w = w + (c * v[j] - s * L[i * K + j],)
        v = w
    return out


@triton.jit
def _lower_inverse(L, K: tl.constexpr):
    """Column-major Z = L⁻¹ by forward substitution (L column-major lower triangular)."""
    inv_diag = ()
    for i in tl.static_range(K):
        inv_diag = inv_diag + (1.0 / L[i * K + i],)
    Z = ()
    for j in tl.static_range(K):
        for i in tl.static_range(K):
            if i < j:
                Z = Z + (L[0] * 0.0,)
            elif i == j:
                Z = Z + (inv_diag[j],)
            else:
                acc = L[j * K + i] * Z[j * K + j]
                for m in tl.static_range(j + 1, i):
                    acc += L[m * K + i] * Z[j * K + m]
                Z = Z + (-acc * inv_diag[i],)
    return Z


@triton.jit
def _transition_kernel(
    a_ptr, two_d_ptr, var_ptr, tau_ptr, norm_ptr, aux_std_ptr, m_ptr, cov_ptr, chol_ptr, inv_t_ptr,
    B,
    K: tl.constexpr, HYBRID: tl.constexpr, TAYLOR: tl.constexpr, LYAPUNOV: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    lanes = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = lanes < B
    first = tl.load(tau_ptr + tl.program_id(0) * BLOCK_B)  # idle lanes repeat a valid τ
    tau = tl.load(tau_ptr + lanes, mask=mask, other=first)
    norm = tl.load(norm_ptr)
    s = tl.ceil(tl.log2(tl.maximum(tl.abs(tau) * norm, 1.0)))
    tau_s = tau / tl.exp2(s)  # = τ where τ‖A‖₂ ≤ 1 (s = 0), the series' domain
    s = s.to(tl.int32)
    X = ()
    for i in tl.static_range(K * K):
        X = X + (tau_s * tl.load(a_ptr + i),)
    # P: series Σ term_n, term_0 = τ·2D, term_n = (X term + term Xᵀ) / (n + 1) where τ‖A‖₂ ≤ 1
    # (symmetric: entries j < i mirror j > i), else the closed form Σ∞ − M Σ∞ Mᵀ (below)
    term = ()
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            if j < i:
                term = term + (term[j * K + i],)
            else:
                sym = tl.load(two_d_ptr + i * K + j) + tl.load(two_d_ptr + j * K + i)
                term = term + (tau_s * (0.5 * sym),)
    P = term
    for n in tl.range(1, LYAPUNOV + 1, loop_unroll_factor=1):
        Y = _matmul(X, term, K)  # term Xᵀ = (X term)ᵀ: term is symmetric
        nxt = ()
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                if j < i:
                    nxt = nxt + (nxt[j * K + i],)
                else:
                    nxt = nxt + ((Y[i * K + j] + Y[j * K + i]) / (n + 1),)
        term = nxt
        P = _add(P, term, K)
    # M = Σ Xⁿ/n!, term_n = term_{n-1} X / n, then s squarings
    M = ()
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            if i == j:
                M = M + (X[i * K + j] + 1.0,)
            else:
                M = M + (X[i * K + j],)
    term = X
    for n in tl.range(2, TAYLOR + 1, loop_unroll_factor=1):
        prod = _matmul(term, X, K)
        term = ()
        for i in tl.static_range(K * K):
            term = term + (prod[i] / n,)
        M = _add(M, term, K)
    for it in tl.range(tl.max(s, axis=0), loop_unroll_factor=1):
        M = _where(s > it, _matmul(M, M, K), M, K)
    m_var = ()
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            m_var = m_var + (M[i * K + j] * tl.load(var_ptr + j),)
    sandwich = _sym_abt(m_var, M, K)
    closed = ()
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            if i == j:
                closed = closed + (tl.load(var_ptr + i) - sandwich[i * K + j],)
            else:
                closed = closed + (-sandwich[i * K + j],)
    P = _where(tau * norm <= 1.0, P, closed, K)
    L = _cholesky(P, K)
    cov = P
    if HYBRID:
        aux_std = tl.load(aux_std_ptr)
        aux = ()
        for i in tl.static_range(K * K):
            aux = aux + (aux_std * M[i],)
        for k in tl.static_range(1, K):
            v = ()
            for i in tl.static_range(K):
                v = v + (aux[i * K + k],)
            L = _rank_one_update(L, v, K)
        outer = ()
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                acc = aux[i * K + 1] * aux[j * K + 1]
                for k in tl.static_range(2, K):
                    acc += aux[i * K + k] * aux[j * K + k]
                outer = outer + (acc,)
        nxt = ()
        for i in tl.static_range(K * K):
            nxt = nxt + (outer[i] + P[i],)
        cov = nxt
    Z = _lower_inverse(L, K)
    base = lanes.to(tl.int64) * (K * K)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            tl.store(m_ptr + base + i * K + j, M[i * K + j], mask=mask)
            tl.store(cov_ptr + base + i * K + j, cov[i * K + j], mask=mask)
            tl.store(chol_ptr + base + i * K + j, L[j * K + i], mask=mask)
            tl.store(inv_t_ptr + base + i * K + j, Z[i * K + j], mask=mask)  # L⁻ᵀ[i, j] = Z[j, i]


def _check(A: Tensor, two_d: Tensor, tau: Tensor, var: Tensor) -> int:
    K = A.shape[-1]
    if A.shape != (K, K) or two_d.shape != (K, K) or var.shape != (K,) or tau.dim() != 1:
        raise ValueError(f"need A, two_d of shape (K, K), stationary_var (K,) and tau (B,), got "
                         f"{tuple(A.shape)}, {tuple(two_d.shape)}, {tuple(var.shape)}, "
                         f"{tuple(tau.shape)}")
    if not 1 <= K <= MAX_K:
        raise ValueError(f"the Triton transition kernel supports 1 <= K <= {MAX_K}, got K={K}")
    for name, x in (("A", A), ("two_d", two_d), ("stationary_var", var), ("tau", tau)):
        if x.dtype != torch.float64:
            raise TypeError(f"{name} must be float64, got {x.dtype}")
        if x.device != tau.device:
            raise ValueError(f"{name} is on {x.device}, tau on {tau.device}")
    return K


def _launch(A: Tensor, two_d: Tensor, tau: Tensor, init_aux_var: float | None, var: Tensor,
            series: TransitionSeries) -> tuple:
    K = _check(A, two_d, tau, var)
    A, two_d, tau, var = (x.detach().contiguous() for x in (A, two_d, tau, var))
    norm = series.norm(A)
    outs = tuple(torch.empty((tau.shape[0], K, K), dtype=torch.float64, device=tau.device)
                 for _ in range(4))
    if tau.shape[0]:
        hybrid = init_aux_var is not None and K > 1
        block = block_size(tau.shape[0], tau.device, gpu=BLOCK_B, widest=256)
        aux_std = torch.full_like(norm, init_aux_var**0.5 if hybrid else 0.0)
        with launch_on(tau.device):
            _transition_kernel[(triton.cdiv(tau.shape[0], block),)](
                A, two_d, var, tau, norm, aux_std, *outs, tau.shape[0], K=K, HYBRID=hybrid,
                TAYLOR=series.taylor_terms, LYAPUNOV=series.lyapunov_terms, BLOCK_B=block,
                num_warps=1,
            )
    return outs


class _TransitionFn(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: autograd through the torch path on K×K inputs."""

    @staticmethod
    def forward(ctx, A, two_d, tau, init_aux_var, var, series):
        ctx.save_for_backward(A, two_d, tau, var)
        ctx.init_aux_var, ctx.series = init_aux_var, series
        return _launch(A, two_d, tau, init_aux_var, var, series)

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[:3]
        *saved, var = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(n)
                      for x, n in zip(saved, needs, strict=True)]
            outs = ctx.series.torch_path(*inputs, ctx.init_aux_var, var)
            wrt = [x for x in inputs if x.requires_grad]
            got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        return (*(next(got) if n else None for n in needs), None, None, None)


def transition_coefficients(A: Tensor, two_d: Tensor, tau: Tensor, init_aux_var: float | None,
                            stationary_var: Tensor, series: TransitionSeries) -> tuple:
    """(M_t, Σ_t, L_t, L_t⁻ᵀ), each float64 (B, K, K), from one kernel launch.

    Same contract as :func:`fastmdm.transition.transition_kernel`, which ``series`` carries: A,
    two_d float64 (K, K) with K ≤ 8 and A Σ∞ + Σ∞ Aᵀ + 2D = 0, Σ∞ = diag(stationary_var); tau
    float64 (B,) > 0; ``init_aux_var`` σ₀² (hybrid start) or None (full start).
    Differentiable in A, two_d, tau.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (A, two_d, tau)):
        return _TransitionFn.apply(A, two_d, tau, init_aux_var, stationary_var, series)
    return _launch(A, two_d, tau, init_aux_var, stationary_var, series)
