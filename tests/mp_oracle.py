"""50-digit mpmath oracle for the MDM transition kernel (mdm-math.md section 2).

Inputs are float64 (numpy, torch or Python numbers), converted element-wise
with mp.mpf(float(x)) so the oracle sees exactly the float64 values the code
under test sees. Work is done under mp.workdps(50 + the digits that Van Loan's block
exponential loses, about τ‖block‖ / ln 10); nothing is cached.
"""

import mpmath
import numpy as np
from mpmath import mp

DPS = 50


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
        sigma0 = mp.diag([_mpf(s) for s in sigma0_diag])
        cov = M * sigma0 * M.T + P
        L = mp.cholesky(cov)
        out = (M, cov, L, _lower_inverse(L).T)
        return out if as_mp else tuple(_to_numpy(m) for m in out)
