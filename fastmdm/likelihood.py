"""Probability-flow ODE and exact likelihoods of a linear MDM (mdm-math.md §6).

The score is affine in the network output y: s(u, t) = (C_y ⊗ I) y + (C_u ⊗ I) u with, for
the hybrid-start kernel N(M_t m₀, L_t L_tᵀ) at t,

    "eps":   y = ε̂,  C_y = −L_t⁻ᵀ,        C_u = 0
    "score": y = s,  C_y = I,             C_u = 0
    "x0":    y = x̂₀, C_y = Σ_t⁻¹ M_t[:, 0], C_u = −Σ_t⁻¹   (y has one variable)

so any field F = (S ⊗ I) u + (G ⊗ I) s with per-sample K×K S, G is
F = ((S + G C_u) ⊗ I) u + ((G C_y) ⊗ I) y and

    ∇·F = tr(S + G C_u) · d + tr(((G C_y) ⊗ I) ∂y/∂u),

the last term by Hutchinson probes (or exactly) with G C_y as the mixing matrix of
:mod:`fastmdm.divergence` — the K×K algebra never touches the network output tensor. The
probability-flow drift is S = β(t) A, G = −β(t) D:

    h(u, t) = β(t)[A u − D s(u, t)]       (noise prediction: β(t)[A u + D L_t⁻ᵀ ε̂]).

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
from typing import NamedTuple

import torch
from torch import Tensor

from .bpd import bits_per_dim, dequantize, logit_transform
from .diffusion import LinearDiffusion
from .divergence import DISTRIBUTIONS, MODES, divergence_and_output
from .ode import odeint_adaptive, odeint_fixed
from .ops import apply_kk, data_dim, draw_seed, sum_data
from .scores import call_model, check_prediction
from .transition import TransitionKernel

METHODS = ("rk45", "euler", "heun", "rk4")


class ScoreCoefficients(NamedTuple):
    """s = (output ⊗ I) y + (state ⊗ I) u; float64 (B, K, K_y) and (B, K, K) or None."""

    output: Tensor
    state: Tensor | None


class FieldEvaluation(NamedTuple):
    """A field F linear in (u, s), its divergence (float64 (B,) or None), the network output y."""

    value: Tensor
    divergence: Tensor | None
    output: Tensor
    coefficients: ScoreCoefficients


def score_coefficients(diffusion: LinearDiffusion, t64: Tensor, prediction: str,
                       tk: TransitionKernel | None = None) -> ScoreCoefficients:
    """(C_y, C_u) of s = C_y y + C_u u (float64); ``tk``: the hybrid-start kernel at t if known."""
    check_prediction(prediction)
    B, K = t64.shape[0], diffusion.K
    if prediction == "score":  # no kernel needed
        return ScoreCoefficients(torch.eye(K, dtype=torch.float64, device=t64.device).expand(B, K, K), None)
    tk = diffusion.transition_f64(t64, "hybrid") if tk is None else tk
    if prediction == "eps":
        return ScoreCoefficients(-tk.chol_inv_t, None)
    precision = tk.chol_inv_t @ tk.chol_inv_t.transpose(-1, -2)  # Σ⁻¹ = L⁻ᵀ L⁻¹
    return ScoreCoefficients(precision @ tk.mean_coef[:, :, :1], -precision)


def network_output(model, u: Tensor, t64: Tensor, prediction: str) -> Tensor:
    """y = model(u, t) as (B, K_y, *data): the whole state, or x̂₀ as one variable ("x0")."""
    out = call_model(model, u, t64, prediction)
    if prediction != "x0":
        return out
    return out[:, :1] if out.shape == u.shape else out.unsqueeze(1)


def score_linear_field(model, diffusion: LinearDiffusion, prediction: str, u: Tensor, t64: Tensor,
                       state_mat: Tensor | None, score_mat: Tensor, divergence: dict | None = None,
                       tk: TransitionKernel | None = None) -> FieldEvaluation:
    """F(u) = (S ⊗ I) u + (G ⊗ I) s(u, t) and, if ``divergence`` is given, ∇·F per sample.

    S (``state_mat``, or None for 0) and G (``score_mat``) are float64 (B, K, K).
    ``divergence``: keyword options of :func:`fastmdm.divergence.divergence_and_output`
    (exact, probes, distribution, mode, seed, chunk_size); None: one plain network call.
    """
    d = data_dim(u.shape[1:])
    coef = score_coefficients(diffusion, t64, prediction, tk)
    state = state_mat
    if coef.state is not None:
        state = score_mat @ coef.state if state is None else state + score_mat @ coef.state
    out_mat = score_mat @ coef.output

    def fn(x):
        return network_output(model, x, t64, prediction)

    if divergence is None:
        y, div = fn(u), None
    else:
        div, y = divergence_and_output(fn, u, out_mat, **divergence)
        if state is not None:
            div = div + torch.diagonal(state, dim1=-2, dim2=-1).sum(-1) * d
    value = apply_kk(out_mat, y)
    if state is not None:
        value = value + apply_kk(state, u)
    return FieldEvaluation(value, div, y, coef)


def score_of(evaluation: FieldEvaluation, u: Tensor) -> Tensor:
    """s = (C_y ⊗ I) y + (C_u ⊗ I) u from a field evaluation."""
    coef = evaluation.coefficients
    score = apply_kk(coef.output, evaluation.output)
    return score if coef.state is None else score + apply_kk(coef.state, u)


class ProbabilityFlow:
    """The probability-flow drift h(u, t) = β(t)[A u − D s(u, t)] of ``model`` (mdm-math.md §6).

    ``flow(u, t)`` returns h (one network call); ``flow.with_divergence(u, t, …)`` returns
    (h, ∇·h) with ∇·h = β tr(A) d − β ∇·(D s) in float64, the mixing −β D C_y folded into
    the probe reduction. t: a float or a (B,) tensor in [t_min, T].
    """

    def __init__(self, model, diffusion: LinearDiffusion, prediction: str = "eps"):
        if not callable(model):
            raise TypeError(f"model must be callable as model(u, t), got {type(model).__name__}")
        if not isinstance(diffusion, LinearDiffusion):
            raise TypeError(f"diffusion must be a LinearDiffusion, got {type(diffusion).__name__}")
        self.model, self.diffusion, self.prediction = model, diffusion, check_prediction(prediction)

    def _evaluate(self, u: Tensor, t, divergence: dict | None) -> FieldEvaluation:
        self.diffusion.check_state(u)
        t64 = self.diffusion.check_time(t, batch=u.shape[0], device=u.device)
        beta = self.diffusion.beta(t64)[:, None, None]
        A, D = self.diffusion.A.to(u.device), self.diffusion.D.to(u.device)
        return score_linear_field(self.model, self.diffusion, self.prediction, u, t64, beta * A, -beta * D,
                                  divergence)

    def __call__(self, u: Tensor, t) -> Tensor:
        return self._evaluate(u, t, None).value

    def with_divergence(self, u: Tensor, t, *, exact: bool = False, probes: int = 1,
                        distribution: str = "rademacher", mode: str = "jvp", seed: int | None = None,
                        chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(h, ∇·h): exact (one JVP per coordinate) or Hutchinson with the probes of ``seed``."""
        options = dict(exact=exact, probes=probes, distribution=distribution, mode=mode,
                       seed=draw_seed() if seed is None and not exact else seed, chunk_size=chunk_size)
        evaluation = self._evaluate(u, t, options)
        return evaluation.value, evaluation.divergence


def probability_flow_drift(model, diffusion: LinearDiffusion, prediction: str = "eps") -> ProbabilityFlow:
    """The probability-flow drift h(u, t) = β(t)[A u − D s(u, t)] as a callable (see ProbabilityFlow)."""
    return ProbabilityFlow(model, diffusion, prediction)


def _check_options(method, steps, aux_samples, probes, distribution, mode) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "rk45" and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"method={method!r} needs steps, a positive integer; got {steps!r}")
    if not isinstance(aux_samples, int) or isinstance(aux_samples, bool) or aux_samples < 1:
        raise ValueError(f"aux_samples must be a positive integer, got {aux_samples!r}")
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def likelihood_grid(diffusion: LinearDiffusion, steps: int) -> list[float]:
    """Fixed-step times t_min → T, quadratic (small steps near the data): t_i = t_min + (T − t_min)(i/N)²."""
    span = diffusion.T - diffusion.t_min
    return [diffusion.t_min + span * (i / steps) ** 2 for i in range(steps)] + [diffusion.T]


def ode_log_likelihood(model, diffusion: LinearDiffusion, x0: Tensor, prediction: str = "eps",
                       rtol: float = 1e-5, atol: float = 1e-5, exact_divergence: bool = False, *,
                       probes: int = 1, distribution: str = "rademacher", mode: str = "jvp",
                       method: str = "rk45", steps: int | None = None, aux_samples: int = 1,
                       generator: torch.Generator | None = None,
                       chunk_size: int | None = None) -> tuple[Tensor, int]:
    """log p(x) per sample in nats, float64 (B,), and the NFE, through the probability-flow ODE.

    Integrates (u, ℓ) with du/dt = h(u, t), dℓ/dt = ∇·h from u(t_min) = (x, v₀) to T, and
    returns log π(u(T)) + ℓ(T) (− log q(v₀) for K > 1; the importance-weighted bound over
    ``aux_samples`` draws of v₀ ~ N(0, σ₀² I)): see the module docstring.

    ∇·h: exact (``exact_divergence``, one JVP per coordinate per evaluation) or Hutchinson
    with ``probes`` probes drawn once from ``generator`` and kept for the whole solve, so the
    ODE is deterministic and the estimate of log p unbiased. ``method``: "rk45" (adaptive
    Dormand–Prince with rtol/atol) or "euler" / "heun" / "rk4" with ``steps`` steps on
    :func:`likelihood_grid`. NFE: evaluations of (h, ∇·h), each one batched network JVP (or
    VJP) over B·aux_samples states and every probe.
    """
    flow = ProbabilityFlow(model, diffusion, prediction)
    diffusion.check_data(x0, "hybrid")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 contains NaN or infinite values")
    _check_options(method, steps, aux_samples, probes, distribution, mode)
    B, K, d = x0.shape[0], diffusion.K, data_dim(x0.shape)
    x = x0.repeat(aux_samples, *([1] * (x0.dim() - 1)))  # (S·B, *data), sample-major
    aux_std = math.sqrt(diffusion.init_aux_var)
    v0 = torch.randn((x.shape[0], K - 1, *x.shape[1:]), dtype=x.dtype, device=x.device,
                     generator=generator) * aux_std
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
                     alpha: float | None = 0.05, prediction: str = "eps",
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
