"""Hypothesis fuzz of the transition over valid MDMs of every shape, against a 60-digit oracle.

K = 1..8; Q dense, chain or MALDA-pattern at scales 1e-2..30; D full, rank-deficient,
first-only, last-only or a partial diagonal; β ranges, t_min down to 1e-6, both starts, at
exactly t_min and T and in between. Either the constructor raises its documented ValueError
(and the oracle confirms the rule) or Σ, L and L⁻ᵀ are within 1e-10 of the oracle in the
normalised metric (see :func:`mp_oracle.normalised_errors`). CI runs a derandomised, bounded number of
examples; FUZZ_EXAMPLES=500 runs more.
"""

import math
import os

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mp_oracle import mp_beta_tau, mp_covariance_doubling, mp_transition_doubling, normalised_errors
from mpmath import mp

import fastmdm as fm
from fastmdm.diffusion import MAX_CONDITION, STARTS

TOL = 1e-10
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


def mixing(kind, K, scale, rng):
    if kind == "dense":
        q = rng.standard_normal((K, K))
        return scale * (q - q.T)
    lower = np.tril(np.ones((K, K)), -1) if kind == "malda" else np.diag(np.ones(K - 1), -1)
    return scale * (lower - lower.T)


def damping(kind, K, rng):
    if kind in ("full", "rank-deficient"):
        rank = K if kind == "full" or K == 1 else int(rng.integers(1, K))
        R = rng.standard_normal((K, rank))
        return R @ R.T / rank
    d = np.zeros(K)
    if kind == "first":
        d[0] = 1.0
    elif kind == "last":
        d[-1] = 1.0
    else:
        mask = rng.random(K) < 0.5
        mask[rng.integers(K)] = True
        d[mask] = 0.1 + rng.random(int(mask.sum()))
    return np.diag(d)


def draw_diffusion(seed):
    """Constructor arguments of a random MDM; every choice from one seed (even coverage)."""
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 9))

    def log_uniform(lo, hi):
        return float(10 ** rng.uniform(math.log10(lo), math.log10(hi)))

    Q = mixing(rng.choice(["dense", "chain", "malda"]), K, log_uniform(1e-2, 30), rng)
    D = damping(rng.choice(["full", "rank-deficient", "first", "last", "partial"]), K, rng)
    beta_min = log_uniform(1e-2, 1)
    return dict(Q=torch.from_numpy(Q), D=torch.from_numpy(D * log_uniform(1e-6, 10)),
                beta_min=beta_min, beta_max=beta_min + log_uniform(1e-2, 30),
                t_min=log_uniform(1e-6, 1e-2), init_aux_var=log_uniform(1e-3, 1),
                stationary_var=1.0 if rng.random() < 0.5 else (0.1 + 10 * rng.random(K)).tolist())


def oracle(diff, t, start):
    s0 = [0.0] + [diff.init_aux_var if start == "hybrid" else 0.0] * (diff.K - 1)
    tau = float(diff.tau(torch.tensor(t, dtype=torch.float64)))
    return mp_transition_doubling(diff.A.numpy(), (2 * diff.D).numpy(), tau, s0)


def assert_rejection_follows_the_rule(kwargs):
    """The oracle's Σ_{t_min} (either start) has a correlation matrix with κ₂ ≥ ~MAX_CONDITION."""
    conds = []
    for start in STARTS:
        S = oracle_for(kwargs, kwargs["t_min"], start)
        with mp.workdps(80):
            d = [1 / mp.sqrt(S[i, i]) for i in range(S.rows)]
            C = mp.matrix([[S[i, j] * d[i] * d[j] for j in range(S.cols)] for i in range(S.rows)])
            lam = mp.eigsy(C, eigvals_only=True)
            conds.append(float(max(lam) / min(lam)) if min(lam) > 0 else math.inf)
    assert max(conds) >= 0.9 * MAX_CONDITION, f"rejected but representable: kappa {conds}"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(STARTS), st.floats(0, 1))
def test_transition_accurate_or_rejected_by_the_rule(seed, start, u):
    kwargs = draw_diffusion(seed)
    try:
        diff = fm.LinearDiffusion(**kwargs)
    except ValueError as err:
        if "Hurwitz" in str(err):  # not a valid MDM: some variable never reaches the noise
            return
        assert f"t_min={kwargs['t_min']}" in str(err), str(err)
        assert_rejection_follows_the_rule(kwargs)
        return
    times = [diff.t_min, diff.T, diff.t_min + u * (diff.T - diff.t_min)]
    tk = diff.transition(torch.tensor(times, dtype=torch.float64), start=start)
    assert all(torch.isfinite(m).all() for m in tk)
    assert torch.equal(tk.cov, tk.cov.mT)
    for i, t in enumerate(times):
        errs = normalised_errors(tk, i, oracle(diff, t, start))
        assert max(errs.values()) < TOL, f"seed={seed} K={diff.K} {start} t={t}: {errs}"


def oracle_for(kwargs, t, start):
    """The oracle's Σ_t (an mp matrix) for constructor arguments that the constructor rejects."""
    Q, D = kwargs["Q"], kwargs["D"]
    var = torch.as_tensor(kwargs["stationary_var"], dtype=torch.float64).expand(Q.shape[0])
    A = -(Q + D) / var
    tau = mp_beta_tau(t, kwargs["beta_min"], kwargs["beta_max"])[1]
    s0 = [0.0] + [kwargs["init_aux_var"] if start == "hybrid" else 0.0] * (Q.shape[0] - 1)
    return mp_covariance_doubling(A.numpy(), (2 * D).numpy(), tau, s0)
