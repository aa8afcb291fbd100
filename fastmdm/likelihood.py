"""Exact likelihoods of a linear MDM through the probability-flow ODE (docs/math.md §6).

The drift h(u, t) = β(t)[A u − D s(u, t)] and its divergence come from :mod:`fastmdm.fields`.

**Likelihood.** Along the ODE d log p_t(u_t)/dt = −∇·h, so integrating the augmented state
(u, ℓ), dℓ/dt = ∇·h, from t_min to T gives

    log p_{t_min}(u) = log π(u(T)) + ℓ(T),   π = N(0, Σ∞).

The model's density of a data point u₀ = (x, v₀) is taken to be p_{t_min} evaluated at
u(t_min) = u₀. p_{t_min} is an exactly normalised density (the push-forward of π through
the invertible ODE flow), so this is the exact log-likelihood of a proper model; it differs
from the t = 0 law only by the O(τ(t_min)) ≈ 1e-4 smoothing of the forward process, like
the paper's and Song et al.'s evaluation at t_min. (The alternative, the ELBO's Gaussian
decoder offset, would add a Monte Carlo draw and give only a bound.) With exact scores,
p_{t_min} is the true hybrid-start marginal at t_min, which the tests check to the solver
tolerance.

For K > 1 the auxiliaries are marginalised with q(v₀) = N(0, σ₀² I):

    log p(x) ≥ E_{v₀~q}[log p_{t_min}(x, v₀) − log q(v₀)]            (aux_samples = 1)
    log p(x) ≥ E[log (1/S) Σ_s p_{t_min}(x, v₀ˢ) / q(v₀ˢ)]            (aux_samples = S),

the importance-weighted bound, tighter as S grows; each call returns a one-sample estimate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bpd import bits_per_dim, dequantize, logit_transform
from .diffusion import LinearDiffusion
from .divergence import DISTRIBUTIONS, MODES
from .fields import ProbabilityFlow
from .ode import odeint_adaptive, odeint_fixed
from .ops import data_dim, draw_seed, sum_data
from .validation import check_choice, check_finite, check_instance, check_int

METHODS = ("rk45", "euler", "heun", "rk4")


def _check_options(method, steps, aux_samples, probes, distribution, mode) -> None:
    check_choice(method, METHODS, "method")
    if method != "rk45":
        check_int(steps, f"steps (needed by method={method!r})")
    check_int(aux_samples, "aux_samples")
    check_int(probes, "probes")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_choice(mode, MODES, "mode")


def likelihood_grid(diffusion: LinearDiffusion, steps: int) -> list[float]:
    """Fixed-step times t_min → T, quadratic (small steps near the data): t_i = t_min + (T − t_min)(i/N)²."""
    span = diffusion.T - diffusion.t_min
    return [diffusion.t_min + span * (i / steps) ** 2 for i in range(steps)] + [diffusion.T]


def ode_log_likelihood(model, diffusion: LinearDiffusion, x0: Tensor, prediction: str | None = None,
                       rtol: float = 1e-5, atol: float = 1e-5, exact_divergence: bool = False, *,
                       probes: int = 1, distribution: str = "rademacher", mode: str = "jvp",
                       method: str = "rk45", steps: int | None = None, aux_samples: int = 1,
                       generator: torch.Generator | None = None,
                       chunk_size: int | None = None, t_min: float | None = None,
                       v0: Tensor | None = None) -> tuple[Tensor, int]:
    """log p(x) per sample in nats, float64 (B,), and the NFE, through the probability-flow ODE.

    Integrates (u, ℓ) with du/dt = h(u, t), dℓ/dt = ∇·h from u(t_min) = (x, v₀) to T, and
    returns log π(u(T)) + ℓ(T) (− log q(v₀) for K > 1; the importance-weighted bound over
    ``aux_samples`` draws of v₀ ~ N(0, σ₀² I)): see the module docstring.

    ∇·h: exact (``exact_divergence``, one JVP per coordinate per evaluation) or Hutchinson
    with ``probes`` probes drawn once from ``generator`` and kept for the whole solve, so the
    ODE is deterministic and the estimate of log p unbiased. ``method``: "rk45" (adaptive
    Dormand–Prince with rtol/atol) or "euler" / "heun" / "rk4" with ``steps`` steps on
    :func:`likelihood_grid`. NFE: evaluations of (h, ∇·h), each one batched network JVP (or
    VJP) over B·aux_samples states and every probe. ``t_min``: where u₀ sits (default: the
    diffusion's). ``v0`` (B, K − 1, *data_shape): the auxiliary start instead of a draw (one
    sample, aux_samples = 1), as CLD-SGM evaluates; the result is still log p(x, v₀) − log q(v₀).
    ``prediction``: what the model predicts (default: an adapter's own, else "eps").
    """
    diffusion = check_instance(diffusion, LinearDiffusion, "diffusion").with_t_min(t_min)
    flow = ProbabilityFlow(model, diffusion, prediction)
    diffusion.check_data(x0, "hybrid")
    check_finite(x0, "x0")
    _check_options(method, steps, aux_samples, probes, distribution, mode)
    B, K, d = x0.shape[0], diffusion.K, data_dim(x0.shape)
    x = x0.repeat(aux_samples, *([1] * (x0.dim() - 1)))  # (S·B, *data), sample-major
    aux_std = math.sqrt(diffusion.init_aux_var)
    aux_shape = (x.shape[0], K - 1, *x.shape[1:])
    if v0 is None:
        v0 = torch.randn(aux_shape, dtype=x.dtype, device=x.device, generator=generator) * aux_std
    else:
        if not (isinstance(v0, Tensor) and tuple(v0.shape) == aux_shape and aux_samples == 1):
            raise ValueError(f"v0 must be a tensor of shape {aux_shape} (with aux_samples=1), got "
                             f"{tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__}")
        check_finite(v0, "v0")
        v0 = v0.to(x.dtype)
    u0 = torch.cat([x.unsqueeze(1), v0], dim=1)
    log_q = -0.5 * sum_data(v0.to(torch.float64) ** 2) / diffusion.init_aux_var \
        - (K - 1) * d * 0.5 * math.log(2 * math.pi * diffusion.init_aux_var)
    options = dict(exact=exact_divergence, probes=probes, distribution=distribution, mode=mode,
                   seed=None if exact_divergence else draw_seed(generator), chunk_size=chunk_size)

    def augmented(t: float, state):
        h, div = flow.with_divergence(state[0], t, **options)
        return h, div

    y0 = (u0, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
    with torch.no_grad():
        if method == "rk45":
            states, nfe = odeint_adaptive(augmented, y0, [diffusion.t_min, diffusion.T], rtol, atol)
        else:
            states, nfe = odeint_fixed(augmented, y0, likelihood_grid(diffusion, steps), method)
    u_T, integral = states[-1]
    log_joint = diffusion.prior_log_prob(u_T) + integral - log_q
    log_w = log_joint.view(aux_samples, B)
    return torch.logsumexp(log_w, dim=0) - math.log(aux_samples), nfe


def ode_bits_per_dim(model, diffusion: LinearDiffusion, x: Tensor, levels: int = 256,
                     alpha: float | None = 0.05, prediction: str | None = None,
                     generator: torch.Generator | None = None, **ode_options) -> tuple[Tensor, int]:
    """Bits per dim of discrete data x (n = ``levels`` levels in [0, 1]) by the ODE likelihood.

    x̃ = dequantize(x) (uniform), y = logit(α + (1 − 2α) x̃) with log-det ldj (alpha=None: y = x̃,
    ldj = 0), then bpd = −(log p(y) + ldj)/(d ln 2) + log₂ n — an upper bound on the discrete
    negative log-likelihood in bits (one dequantisation draw). ``ode_options`` go to
    :func:`ode_log_likelihood`. Returns (bpd (B,) float64, nfe).
    """
    x_tilde = dequantize(x, levels, generator)
    if alpha is None:
        y, ldj = x_tilde, 0.0
    else:
        y, ldj = logit_transform(x_tilde, alpha)
    logp, nfe = ode_log_likelihood(model, diffusion, y, prediction, generator=generator, **ode_options)
    return bits_per_dim(-logp, x.shape, ldj, levels), nfe
