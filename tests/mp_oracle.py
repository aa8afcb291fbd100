"""High-precision mpmath oracles for the MDM transition kernel (docs/math.md section 2).

Inputs are float64 (numpy, torch or Python numbers), converted element-wise
with mp.mpf(float(x)) so the oracle sees exactly the float64 values the code
under test sees. Nothing is cached.

- :func:`mp_transition`: Van Loan's block exponential at 50 digits plus the digits it
  loses (about τ‖block‖ / ln 10).
- :func:`mp_transition_doubling`: P(τ) = ∫₀^τ e^{sA} 2D e^{sAᵀ} ds at 60 digits from its
  Taylor series at h = τ/2ˢ (h‖A‖ ≤ ½, every term summed to below 10⁻⁶⁰ of the first) and
  s doublings P(2h) = P(h) + e^{hA} P(h) e^{hAᵀ}, sums of positive semi-definite terms that
  never cancel on the diagonal. Costs O(K³) per term, so it serves fuzz tests at K ≤ 8.
"""

import mpmath
import numpy as np
from mpmath import mp

DPS = 50
FUZZ_DPS = 60


def _mpf(x):
    """Exact mp value of a float64 (or of a decimal string / mpf, taken as given)."""
    if isinstance(x, (str, mpmath.mpf)):
        return mp.mpf(x)
    return mp.mpf(float(x))


def _mp_matrix(a):
    a = np.asarray(a, dtype=np.float64)
    return mp.matrix([[_mpf(x) for x in row] for row in a])


def _to_numpy(m):
    return np.array([[float(m[i, j]) for j in range(m.cols)] for i in range(m.rows)])


def _lower_inverse(L):
    """L^{-1} of a lower-triangular L by forward substitution, column by column."""
    k = L.rows
    inv = mp.zeros(k, k)
    for j in range(k):
        inv[j, j] = 1 / L[j, j]
        for i in range(j + 1, k):
            inv[i, j] = -mp.fsum(L[i, m] * inv[m, j] for m in range(j, i)) / L[i, i]
    return inv


def _covariance(M, P, sigma0_diag):
    """Sigma = M diag(sigma0_diag) M^T + P."""
    return M * mp.diag([_mpf(s) for s in sigma0_diag]) * M.T + P


def _kernel(M, P, sigma0_diag, as_mp):
    """(M, Sigma, L, L^{-T}) from M and P(τ)."""
    cov = _covariance(M, P, sigma0_diag)
    L = mp.cholesky(cov, tol=0)  # the default tolerance is absolute: it rejects tiny Sigma
    out = (M, cov, L, _lower_inverse(L).T)
    return out if as_mp else tuple(_to_numpy(m) for m in out)


def mp_beta_tau(t, beta_min=0.1, beta_max=10.0):
    """(beta(t), tau(t)) in mp at the exact float64 values of the inputs."""
    with mp.workdps(DPS):
        t, bmin, bmax = _mpf(t), _mpf(beta_min), _mpf(beta_max)
        return bmin + (bmax - bmin) * t, bmin * t + (bmax - bmin) * t * t / 2


def mp_transition(A, two_d, tau, sigma0_diag, as_mp=False):
    """(M, Sigma, L, L^{-T}) of the transition at tau, computed at 50 digits.

    expm(tau [[A, 2D], [0, -A^T]]) = [[F11, F12], [0, F22]]: M = F11,
    P = F12 F11^T, Sigma = M diag(sigma0_diag) M^T + P, L = chol(Sigma).
    Returns float64 numpy arrays, or mp matrices if as_mp.
    """
    norm = float(np.abs(np.asarray(A, dtype=np.float64)).sum(axis=1).max()) + float(
        np.abs(np.asarray(two_d, dtype=np.float64)).sum(axis=1).max())
    lost = int(np.ceil(float(tau) * norm / np.log(10)))  # F12 ~ e^{τ‖block‖} before it cancels
    with mp.workdps(DPS + lost):
        A, two_d = _mp_matrix(A), _mp_matrix(two_d)
        tau = _mpf(tau)
        k = A.rows
        block = mp.zeros(2 * k, 2 * k)
        for i in range(k):
            for j in range(k):
                block[i, j] = A[i, j]
                block[i, k + j] = two_d[i, j]
                block[k + i, k + j] = -A[j, i]
        F = mp.expm(tau * block)
        M = F[0:k, 0:k]
        P = F[0:k, k : 2 * k] * M.T
        return _kernel(M, P, sigma0_diag, as_mp)


def mp_transition_doubling(A, two_d, tau, sigma0_diag, as_mp=False):
    """(M, Sigma, L, L^{-T}) at 60 digits by series and doubling (see the module docstring)."""
    with mp.workdps(FUZZ_DPS + 20):
        return _kernel(*_flow_and_gramian(A, two_d, tau), sigma0_diag, as_mp)


def mp_covariance_doubling(A, two_d, tau, sigma0_diag):
    """Sigma (an mp matrix at 80 digits) as in :func:`mp_transition_doubling`, unfactored."""
    with mp.workdps(FUZZ_DPS + 20):
        return _covariance(*_flow_and_gramian(A, two_d, tau), sigma0_diag)


def _flow_and_gramian(A, two_d, tau):
    """(M, P) in mp by series and doubling.

    The series runs at least 2K terms (every entry of P has its leading term by then) and
    until a term is below 10⁻⁶⁵ of P's smallest diagonal entry (at most 400 terms), so tiny entries (P₁₁ ~ τ¹⁵
    for a chain of 8 damped at its end) are as accurate as large ones.
    """
    A, two_d, tau = _mp_matrix(A), _mp_matrix(two_d), _mpf(tau)
    k = A.rows
    norm = mp.sqrt(mp.fsum(x * x for x in A))  # Frobenius ≥ ‖A‖₂
    s = max(0, int(mp.ceil(mp.log(2 * tau * norm, 2)))) if tau * norm > 0 else 0
    h = tau / mp.mpf(2) ** s
    M, term_m = mp.eye(k), mp.eye(k)
    P = term_p = h * two_d
    n = 0
    while True:
        n += 1
        term_m = term_m * A * (h / n)
        term_p = (A * term_p + term_p * A.T) * (h / (n + 1))
        M, P = M + term_m, P + term_p
        tiny = mp.mpf(10) ** -(FUZZ_DPS + 5) * min(P[i, i] for i in range(k))
        if n >= 2 * k and max(mp.mnorm(term_m, 1), mp.mnorm(term_p, 1)) < tiny:
            break
    for _ in range(s):
        P = P + M * P * M.T
        M = M * M
    return M, P


def normalised_errors(tk, i, want):
    """Errors of sample i of a TransitionKernel against float64 oracle arrays (M, Σ, L, L⁻ᵀ):
    |δΣ_jk| / sqrt(S_jj S_kk); for a factor F with F Fᵀ = S (L of Σ, L⁻ᵀ of Σ⁻¹),
    |δF_jk| / sqrt(S_jj), the norm of F's row j."""
    _, S, L, U = want
    d, d_inv = np.sqrt(np.diag(S)), np.sqrt((U**2).sum(axis=1))
    return {
        "cov": float((np.abs(tk.cov[i].detach().numpy() - S) / np.outer(d, d)).max()),
        "chol": float((np.abs(tk.chol[i].detach().numpy() - L) / d[:, None]).max()),
        "chol_inv_t": float((np.abs(tk.chol_inv_t[i].detach().numpy() - U) / d_inv[:, None]).max()),
    }
