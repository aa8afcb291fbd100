"""The paper's recipe, written plainly: the baseline for agreement tests and benchmarks.

This module does what a user of the published code (Singhal, Goldstein &
Ranganath, ICLR 2023; PyTorch, float32) would run, and depends on nothing in
fastmdm -- only torch and math -- so that the fast path is checked against an
independent implementation. Formulas are those of docs/math.md:

- forward SDE  du = beta(t) A u dt + sqrt(beta(t)) G dW,  A = -(Q + D) Sinf^{-1},
  G G^T = 2D, beta(t) = beta_min + (beta_max - beta_min) t, tau(t) = int_0^t beta;
- transition per sample: the 2K x 2K Van Loan exponential
  expm(tau [[A, 2D], [0, -A^T]]) = [[F11, F12], [0, F22]], M = F11,
  P = F12 F11^T, Sigma = M Sigma0 M^T + P, L = chol(Sigma), and L^{-T} by an
  explicit inverse, one Python-loop iteration per batch element.

``batched=True`` (every function that computes a transition takes it) runs the same
recipe once on the whole batch -- batched matrix_exp, Cholesky and inverse, no Python
loop over the batch and no fusion: the "batched torch" baseline of the benchmarks,
which separates what de-looping gains from what fastmdm's fusion gains.

No jitter is added to the Cholesky factorisation, and nothing here guards
against the small-tau cancellation that the fast path cures: in float32 the
covariance is badly wrong near t_min (docs/math.md §2).

A state u is (B, K, *data_shape) with u[:, 0] the data; every K x K matrix
acts on the variable axis: (A u)[b, k, ...] = sum_l A[k, l] u[b, l, ...].
"""

import math

import torch

_STARTS = ("hybrid", "full")
_PREDICTIONS = ("eps", "score")


def beta(t, beta_min=0.1, beta_max=10.0):
    """beta(t) = beta_min + (beta_max - beta_min) t."""
    return beta_min + (beta_max - beta_min) * t


def tau(t, beta_min=0.1, beta_max=10.0):
    """tau(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t * t


def _stationary_var(stationary_var, k, dtype, device):
    if stationary_var is None:
        return torch.ones(k, dtype=dtype, device=device)
    return torch.as_tensor(stationary_var, dtype=dtype, device=device)


def drift_matrix(Q, D, stationary_var=None):
    """A = -(Q + D) Sinf^{-1}, Sinf = diag(stationary_var) (all ones if None)."""
    sinf = _stationary_var(stationary_var, Q.shape[-1], Q.dtype, Q.device)
    return -(Q + D) / sinf


def _initial_cov(k, start, init_aux_var, dtype, device):
    """Sigma0 = diag(0, s0, ..., s0) (hybrid) or 0 (full)."""
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}, got {start!r}")
    diag = torch.full((k,), init_aux_var if start == "hybrid" else 0.0, dtype=dtype, device=device)
    diag[0] = 0.0
    return torch.diag(diag)


def _matvec(mat, u):
    """(mat u)[b, k, ...] = sum_l mat[b, k, l] u[b, l, ...]; mat (K, K) or (B, K, K)."""
    mat = mat.expand(u.shape[0], *mat.shape[-2:])
    return torch.einsum("bkl,bl...->bk...", mat, u)


def transition(
    Q,
    D,
    t,
    start="hybrid",
    *,
    beta_min=0.1,
    beta_max=10.0,
    init_aux_var=0.01,
    stationary_var=None,
    dtype=torch.float32,
    batched=False,
):
    """Transition kernel of the forward SDE at times t, one sample at a time.

    expm(tau [[A, 2D], [0, -A^T]]) = [[F11, F12], [0, F22]] gives M = F11 = e^{tau A}
    and P(tau) = F12 F11^T = int_0^tau e^{sA} 2D e^{sA^T} ds; then
    Sigma = M Sigma0 M^T + P, L = chol(Sigma) (lower, no jitter) and L^{-T} = inverse(L)^T.

    Returns (mean_coef M, cov Sigma, chol L, chol_inv_t L^{-T}), each (B, K, K) in dtype;
    ``batched``: one batched call instead of the loop over the B times.
    """
    Q = torch.as_tensor(Q, dtype=dtype)
    D = torch.as_tensor(D, dtype=dtype, device=Q.device)
    k = Q.shape[-1]
    sigma0 = _initial_cov(k, start, init_aux_var, dtype, Q.device)
    A = drift_matrix(Q, D, _stationary_var(stationary_var, k, dtype, Q.device))
    zeros = torch.zeros_like(A)
    block = torch.cat([torch.cat([A, 2 * D], dim=1), torch.cat([zeros, -A.T], dim=1)], dim=0)
    taus = tau(torch.as_tensor(t, dtype=dtype, device=Q.device).reshape(-1), beta_min, beta_max)
    if batched:
        return _van_loan(taus, block, sigma0)
    outs = [_van_loan(tau_b, block, sigma0) for tau_b in taus]
    return tuple(torch.stack(x) for x in zip(*outs, strict=True))


def _van_loan(taus, block, sigma0):
    """(M, Sigma, L, L^{-T}) from expm(tau block) for a scalar tau or a (B,) batch of them."""
    k = sigma0.shape[-1]
    F = torch.linalg.matrix_exp(taus[..., None, None] * block)
    M = F[..., :k, :k]
    cov = M @ sigma0 @ M.mT + F[..., :k, k:] @ M.mT
    L = torch.linalg.cholesky(cov)
    return M, cov, L, torch.inverse(L).mT


def perturb(
    Q,
    D,
    x0,
    t,
    start="hybrid",
    generator=None,
    *,
    beta_min=0.1,
    beta_max=10.0,
    init_aux_var=0.01,
    stationary_var=None,
    dtype=torch.float32,
    batched=False,
):
    """Sample u_t = M m0 + L eps, eps ~ N(0, I) of shape (B, K, *data_shape).

    x0 is the data (B, *data_shape) for the hybrid start (m0 = (x0, 0, ..., 0))
    or the whole state u0 (B, K, *data_shape) for the full start (m0 = u0).
    t is a scalar or (B,). Returns (u_t, eps).
    """
    x0 = torch.as_tensor(x0, dtype=dtype)
    Q, D = (torch.as_tensor(m, dtype=dtype, device=x0.device) for m in (Q, D))
    b = x0.shape[0]
    t = torch.as_tensor(t, dtype=dtype, device=x0.device).expand(b)
    M, _, L, _ = transition(
        Q,
        D,
        t,
        start,
        beta_min=beta_min,
        beta_max=beta_max,
        init_aux_var=init_aux_var,
        stationary_var=stationary_var,
        dtype=dtype,
        batched=batched,
    )
    k = M.shape[-1]
    if start == "hybrid":
        data_shape = x0.shape[1:]
        mean = M[:, :, 0].reshape(b, k, *[1] * len(data_shape)) * x0.unsqueeze(1)
    else:
        data_shape = x0.shape[2:]
        mean = _matvec(M, x0)
    eps = torch.randn((b, k, *data_shape), generator=generator, dtype=dtype, device=x0.device)
    return mean + _matvec(L, eps), eps


def noise_prediction_loss(
    model,
    Q,
    D,
    x0,
    t=None,
    generator=None,
    *,
    t_min=1e-3,
    T=1.0,
    beta_min=0.1,
    beta_max=10.0,
    init_aux_var=0.01,
    stationary_var=None,
    dtype=torch.float32,
    batched=False,
):
    """Per-sample ||model(u_t, t) - eps||^2 summed over K and data, hybrid start.

    t ~ U[t_min, T] per sample if None. Returns (B,).
    """
    b = x0.shape[0]
    if t is None:
        t = t_min + (T - t_min) * torch.rand(b, generator=generator, dtype=dtype, device=x0.device)
    t = torch.as_tensor(t, dtype=dtype, device=x0.device).expand(b)
    u_t, eps = perturb(
        Q,
        D,
        x0,
        t,
        "hybrid",
        generator,
        beta_min=beta_min,
        beta_max=beta_max,
        init_aux_var=init_aux_var,
        stationary_var=stationary_var,
        dtype=dtype,
        batched=batched,
    )
    return (model(u_t, t) - eps).pow(2).flatten(1).sum(1)


def dsm_loss_weighted(
    eps_hat,
    eps,
    t,
    Q,
    D,
    start="hybrid",
    *,
    beta_min=0.1,
    beta_max=10.0,
    init_aux_var=0.01,
    stationary_var=None,
    dtype=torch.float32,
    batched=False,
):
    """Weighted DSM term of the ELBO (docs/math.md §4), per sample.

    0.5 sum_j r[:, j]^T W_t r[:, j], r = eps_hat - eps, W_t = L^{-1} (2 beta(t) D) L^{-T}.
    eps_hat, eps are (B, K, *data_shape), t is (B,). Returns (B,).
    """
    Q, D = (torch.as_tensor(m, dtype=dtype, device=eps.device) for m in (Q, D))
    t = torch.as_tensor(t, dtype=dtype, device=eps.device)
    *_, chol_inv_t = transition(
        Q,
        D,
        t,
        start,
        beta_min=beta_min,
        beta_max=beta_max,
        init_aux_var=init_aux_var,
        stationary_var=stationary_var,
        dtype=dtype,
        batched=batched,
    )
    two_beta_d = 2 * beta(t, beta_min, beta_max).reshape(-1, 1, 1) * D
    W = chol_inv_t.transpose(-1, -2) @ two_beta_d @ chol_inv_t
    r = (eps_hat - eps).to(dtype).flatten(2)
    return 0.5 * torch.einsum("bkj,bkl,blj->b", r, W, r)


def hutchinson_divergence(fn, u, probes=10, generator=None):
    """Hutchinson estimate of div fn(u) = tr(J), one VJP per Rademacher probe.

    Averages v . (J^T v) over the probes, summed over every non-batch dim.
    With S = (J + J^T) / 2 per sample, Var = 2 sum_{i != j} S_ij^2 / probes.
    Returns (B,).
    """
    total = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    for _ in range(probes):
        v = torch.randint(0, 2, u.shape, generator=generator, device=u.device).to(u) * 2 - 1
        with torch.enable_grad():
            x = u.detach().clone().requires_grad_(True)
            (vjp,) = torch.autograd.grad(fn(x), x, grad_outputs=v)
        total = total + (v * vjp).flatten(1).sum(1)
    return total / probes


def quadratic_grid(steps, t_min=1e-3, T=1.0):
    """t_i = T - (T - t_min)(1 - (1 - i/N)^2), i = 0..N: float64, from T down to t_min."""
    i = torch.arange(steps + 1, dtype=torch.float64)
    return T - (T - t_min) * (1 - (1 - i / steps) ** 2)


def euler_maruyama_sample(
    model,
    Q,
    D,
    shape,
    steps=500,
    prediction="eps",
    generator=None,
    *,
    t_min=1e-3,
    T=1.0,
    return_state=False,
    beta_min=0.1,
    beta_max=10.0,
    init_aux_var=0.01,
    stationary_var=None,
    dtype=torch.float32,
    batched=False,
):
    """Euler-Maruyama on the reverse SDE du = beta [A u - 2 D s] dt + sqrt(2 beta D) dW_bar.

    shape = (B, *data_shape). Starts from u_T ~ N(0, Sinf) and steps down the
    quadratic grid; a step of length h toward the data is
    u <- u - h beta(t) (A u - 2 D s) + sqrt(h) sqrt(2 beta(t) D) xi, with no noise on
    the last step. s is the model output ("score") or -L_t^{-T} model(u, t) ("eps"),
    L_t from the per-sample hybrid transition. sqrt(D) is the symmetric PSD root
    (D may be singular). Returns u[:, 0], or the final state if return_state.
    """
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be one of {_PREDICTIONS}, got {prediction!r}")
    Q = torch.as_tensor(Q, dtype=dtype)
    D = torch.as_tensor(D, dtype=dtype, device=Q.device)
    k = Q.shape[-1]
    b, *data_shape = shape
    sinf = _stationary_var(stationary_var, k, dtype, Q.device)
    A = drift_matrix(Q, D, sinf)
    evals, evecs = torch.linalg.eigh(D)
    sqrt_d = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    u = torch.randn((b, k, *data_shape), generator=generator, dtype=dtype, device=Q.device)
    u = u * sinf.sqrt().reshape(k, *[1] * len(data_shape))
    grid = quadratic_grid(steps, t_min, T).tolist()
    for i in range(steps):
        h = grid[i] - grid[i + 1]
        beta_t = beta(grid[i], beta_min, beta_max)
        t_vec = torch.full((b,), grid[i], dtype=dtype, device=Q.device)
        out = model(u, t_vec)
        if prediction == "eps":
            *_, chol_inv_t = transition(
                Q,
                D,
                t_vec,
                "hybrid",
                beta_min=beta_min,
                beta_max=beta_max,
                init_aux_var=init_aux_var,
                stationary_var=sinf,
                dtype=dtype,
                batched=batched,
            )
            s = -_matvec(chol_inv_t, out)
        else:
            s = out
        u = u - h * beta_t * (_matvec(A, u) - 2 * _matvec(D, s))
        if i < steps - 1:
            xi = torch.randn(u.shape, generator=generator, dtype=dtype, device=Q.device)
            u = u + math.sqrt(2 * beta_t * h) * _matvec(sqrt_d, xi)
    return u if return_state else u[:, 0]
