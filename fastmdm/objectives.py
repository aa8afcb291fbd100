"""Training objectives and the ELBO of a linear MDM (docs/math.md §3–4).

For data x with auxiliaries v₀ ~ q(v₀) = N(0, σ₀² I), the bound is

    log p(x) ≥ E log π(u_T) + ∫_{t_min}^{T} E ℓ(u_t, t) dt + offset + H[q(v₀)]

with u_t drawn from the hybrid kernel q(u_t | x) and, per sample,
  DSM: ℓ = −½ Σ_j δ_jᵀ (2βD) δ_j + ½ tr(W_t) d + β tr(A) d,  δ = s − ∇log q,
       W_t = L_t⁻¹ (2βD) L_t⁻ᵀ (with noise prediction: −½ Σ_j (ε̂−ε)ᵀ W_t (ε̂−ε));
  ISM: ℓ = −½ sᵀ (2βD) s − ∇·(2βD s) + β tr(A) d  (Hutchinson probes).
Each ``*_elbo`` returns the per-sample negative ELBO in nats, shape (B,).

Low-precision data (float16, bfloat16): the network sees u_t in the data's dtype; its output and
every K×K map (L_t⁻ᵀ reaches ~1e6 at t_min) are applied in float32 (``ops.compute_dtype``), the
dtype of the returned values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .adapters import resolve_model
from .diffusion import LinearDiffusion
from .dsm import weighted_dsm
from .fields import score_linear_field
from .importance import sample_time
from .ops import apply_kk, compute_dtype, data_dim, draw_seed, sum_data
from .parameterization import Parameterization
from .stages import stage
from .transition import TransitionKernel
from .validation import check_finite, check_int


def _check_inputs(model, diffusion: LinearDiffusion, x0: Tensor,
                  prediction: str | None = None) -> tuple[Callable, Parameterization]:
    """Validate the public objectives' inputs once; returns the model and its parameterisation
    (:func:`fastmdm.adapters.resolve_model`)."""
    model, parameterization = resolve_model(model, diffusion, prediction)
    diffusion.check_data(x0, "hybrid")
    check_finite(x0, "x0")
    if not parameterization.full_score:  # the t_min offset needs the whole score
        raise ValueError(f"prediction {parameterization.name!r} gives only D·s; "
                         "the ELBOs need the whole score")
    return model, parameterization


def _network_output(model, parameterization: Parameterization, u: Tensor, t64: Tensor) -> Tensor:
    """y = model(u, t) (t cast to u's dtype) in the parameterisation's compact layout, validated,
    in the dtype the K×K maps are applied in."""
    return parameterization.output(model(u, t64.to(u.dtype)), u).to(compute_dtype(u.dtype))


def _time(diffusion, x0, t, importance, generator) -> tuple[Tensor, Tensor]:
    """(t, p(t)) in float64: given t (p uniform) or drawn."""
    if t is not None:
        t64 = diffusion.check_time(t, batch=x0.shape[0], device=x0.device)
        return t64, torch.full_like(t64, 1.0 / (diffusion.T - diffusion.t_min))
    return sample_time(diffusion, x0.shape[0], importance, generator, x0.device)


def dsm_weight(diffusion: LinearDiffusion, t64: Tensor, tk: TransitionKernel) -> Tensor:
    """W_t = L_t⁻¹ (2β(t) D) L_t⁻ᵀ, float64 (B, K, K)."""
    two_beta_d = 2 * diffusion.beta(t64)[:, None, None] * diffusion.D.to(t64.device)
    return tk.chol_inv_t.transpose(-1, -2) @ two_beta_d @ tk.chol_inv_t


def noise_prediction_loss(model, diffusion: LinearDiffusion, x0: Tensor, t=None,
                          generator: torch.Generator | None = None, t_min: float | None = None) -> Tensor:
    """‖ε̂(u_t, t) − ε‖² summed over K and data dims, t ~ U[t_min, T]; shape (B,).

    The weighted DSM pass with W = 2I: on the Triton path ε is regenerated, never stored.
    ``t_min``: this call's (default: the diffusion's). The model must predict "eps" (an adapter
    predicting anything else is refused).
    """
    model, parameterization = _check_inputs(model, diffusion, x0)
    if parameterization.name != "eps":
        raise ValueError(f"noise_prediction_loss needs a model predicting 'eps', got one predicting "
                         f"{parameterization.name!r}")
    diffusion = diffusion.with_t_min(t_min)
    t64, _ = _time(diffusion, x0, t, False, generator)
    tk = diffusion.transition_f64(t64, "hybrid")
    u, eps = diffusion.perturb_with_kernel(x0, tk, "hybrid", generator, store_noise=False)
    K = diffusion.K
    two = torch.eye(K, dtype=x0.dtype, device=x0.device).mul(2).expand(x0.shape[0], K, K)
    return weighted_dsm(_network_output(model, parameterization, u, t64), eps, two)


def drift_divergence(diffusion: LinearDiffusion, t64: Tensor, d: int) -> Tensor:
    """∇·f = β(t) tr(A) d, float64 (B,)."""
    return diffusion.beta(t64) * torch.diagonal(diffusion.A).sum().to(t64.device) * d


def prior_cross_entropy(diffusion: LinearDiffusion, x0: Tensor,
                        kernel_T: TransitionKernel | None = None) -> Tensor:
    """−E log π(u_T), u_T ~ q(u_T | x) hybrid, π = N(0, Σ∞) — exact, float64 (B,).

    ½[d log det(2πΣ∞) + d tr(Σ∞⁻¹ Σ_T) + (aᵀ Σ∞⁻¹ a) ‖x‖²], a = M_T[:, 0].
    ``kernel_T``: the hybrid kernel at T if already computed (batch 1 or B).
    """
    d = data_dim(x0.shape)
    tk = kernel_T or diffusion.transition_f64(diffusion.check_time(diffusion.T, 1, x0.device))
    var = diffusion.stationary_var.to(x0.device)
    a = tk.mean_coef[:, :, 0]
    tr = (torch.diagonal(tk.cov, dim1=-2, dim2=-1) / var).sum(-1)
    quad = (a * a / var).sum(-1) * sum_data(x0.to(torch.float64) ** 2)
    return 0.5 * (d * (torch.log(2 * math.pi * var).sum() + tr) + quad)


def aux_entropy(diffusion: LinearDiffusion, x0: Tensor) -> float:
    """H[q(v₀)] = −E log q(v₀) = (K − 1) d ½ log(2πe σ₀²), exact."""
    return (diffusion.K - 1) * data_dim(x0.shape) * 0.5 * math.log(
        2 * math.pi * math.e * diffusion.init_aux_var)


def _aux_sample(diffusion: LinearDiffusion, x0: Tensor, generator) -> Tensor:
    """u₀ = (x, v₀), v₀ ~ N(0, σ₀² I)."""
    v0 = torch.randn((x0.shape[0], diffusion.K - 1, *x0.shape[1:]), dtype=x0.dtype,
                     device=x0.device, generator=generator) * math.sqrt(diffusion.init_aux_var)
    return torch.cat([x0.unsqueeze(1), v0], dim=1)


def tmin_offset(model, diffusion: LinearDiffusion, x0: Tensor, parameterization: Parameterization,
                generator: torch.Generator | None = None,
                kernels: tuple[TransitionKernel, TransitionKernel] | None = None) -> Tensor:
    """log p(u₀ | u_ε) − log q(u_ε | u₀) at t_min (full start), one sample, (B,).

    The decoder is Tweedie's: N(M⁻¹(u_ε + Σ s), M⁻¹ Σ M⁻ᵀ). With u_ε = M u₀ + L ε this is
    −½‖ε + Lᵀ s‖² + ½‖ε‖² + d τ(t_min) tr(A), free of the O(τ) cancellations.
    ``kernels``: the (full, hybrid) kernels at t_min if already computed (batch 1).
    """
    B, d = x0.shape[0], data_dim(x0.shape)
    t64 = diffusion.check_time(diffusion.t_min, B, x0.device)
    if kernels is None:
        kernels = tuple(diffusion.transition_f64(t64[:1], start) for start in ("full", "hybrid"))
    full, hybrid = (TransitionKernel(*(m.expand(B, -1, -1) for m in tk)) for tk in kernels)
    u_eps, eps = diffusion.perturb_with_kernel(_aux_sample(diffusion, x0, generator), full, "full",
                                               generator)
    y = _network_output(model, parameterization, u_eps, t64)
    eps = eps.to(y.dtype)
    score = parameterization.score(y, u_eps.to(y.dtype), hybrid)
    resid = eps + apply_kk(full.chol.transpose(-1, -2), score)
    log_det = diffusion.tau(t64) * torch.diagonal(diffusion.A).sum().to(t64.device) * d
    return -0.5 * sum_data(resid**2) + 0.5 * sum_data(eps**2) + log_det.to(y.dtype)


def _elbo_terms(model, diffusion, x0, parameterization, importance, generator, t, integrand,
                store_noise: bool = True) -> Tensor:
    t64, pdf = _time(diffusion, x0, t, importance, generator)
    B = x0.shape[0]
    ends = torch.tensor([diffusion.T, diffusion.t_min], dtype=torch.float64, device=x0.device)
    hybrid = diffusion.transition_f64(torch.cat([t64, ends]), "hybrid")  # t, T and t_min at once
    tk, at_T, at_tmin = (TransitionKernel(*(m[rows] for m in hybrid))
                         for rows in (slice(0, B), slice(B, B + 1), slice(B + 1, B + 2)))
    u, eps = diffusion.perturb_with_kernel(x0, tk, "hybrid", generator, store_noise=store_noise)
    with stage("elbo.integrand"):
        ell = integrand(u, eps, t64, tk)  # (B,)
    integral = ell / pdf.to(ell.dtype)
    with stage("elbo.tmin_offset"):
        full = diffusion.transition_f64(ends[1:], "full")
        offset = tmin_offset(model, diffusion, x0, parameterization, generator, (full, at_tmin))
    with stage("elbo.prior"):
        elbo = -prior_cross_entropy(diffusion, x0, at_T).to(integral.dtype) + integral + offset
    return -(elbo + aux_entropy(diffusion, x0))


def dsm_elbo(model, diffusion: LinearDiffusion, x0: Tensor, prediction: str | None = None,
             importance: bool = True, t=None, generator: torch.Generator | None = None,
             t_min: float | None = None) -> Tensor:
    """Negative ELBO per sample (nats, (B,)) with the denoising score-matching integrand.

    One draw of t (importance-sampled by default, estimate g(t)/p(t)) and one of u_t, on
    [t_min, T] (``t_min``: this call's, default the diffusion's). ``prediction``: what the model
    predicts (default: an adapter's own, else "eps").
    """
    model, parameterization = _check_inputs(model, diffusion, x0, prediction)
    diffusion = diffusion.with_t_min(t_min)
    d = data_dim(x0.shape)

    def integrand(u, eps, t64, tk):
        W = dsm_weight(diffusion, t64, tk)
        out = _network_output(model, parameterization, u, t64)
        if parameterization.name == "eps":  # ½ Σ (ε̂ − ε)ᵀ W (ε̂ − ε), ε possibly regenerated from its seed
            mismatch = weighted_dsm(out, eps, W)
        else:  # ½ Σ (s − ∇log q)ᵀ 2βD (s − ∇log q), ∇log q = −L⁻ᵀ ε
            two_beta_d = 2 * diffusion.beta(t64)[:, None, None] * diffusion.D.to(u.device)
            score = parameterization.score(out, u.to(out.dtype), tk)
            mismatch = weighted_dsm(score, -apply_kk(tk.chol_inv_t, eps.to(out.dtype)), two_beta_d)
        const = 0.5 * torch.diagonal(W, dim1=-2, dim2=-1).sum(-1) * d + drift_divergence(
            diffusion, t64, d)
        return -mismatch + const.to(mismatch.dtype)

    return _elbo_terms(model, diffusion, x0, parameterization, importance, generator, t, integrand,
                       store_noise=parameterization.name != "eps")


def ism_elbo(model, diffusion: LinearDiffusion, x0: Tensor, prediction: str | None = None,
             probes: int = 1, importance: bool = True, t=None,
             generator: torch.Generator | None = None, t_min: float | None = None) -> Tensor:
    """Negative ELBO per sample (nats, (B,)) with the implicit score-matching integrand.

    ∇·(2βD s) by Hutchinson with ``probes`` Rademacher probes in one batched JVP, the mixing
    2βD C_y (C_y = −L_t⁻ᵀ for noise prediction) folded into the probe reduction
    (fastmdm.fields.score_linear_field); differentiable. ``t_min``, ``prediction``: as in
    :func:`dsm_elbo`.
    """
    model, parameterization = _check_inputs(model, diffusion, x0, prediction)
    diffusion = diffusion.with_t_min(t_min)
    check_int(probes, "probes")
    d = data_dim(x0.shape)

    def integrand(u, eps, t64, tk):
        two_beta_d = 2 * diffusion.beta(t64)[:, None, None] * diffusion.D.to(u.device)
        field = score_linear_field(model, diffusion, parameterization, u, t64, None, two_beta_d,
                                   dict(probes=probes, seed=draw_seed(generator)), tk)
        work = field.value.dtype
        const = drift_divergence(diffusion, t64, d).to(work)
        return -0.5 * sum_data(field.score(u.to(work)) * field.value) - field.divergence.to(work) + const

    return _elbo_terms(model, diffusion, x0, parameterization, importance, generator, t, integrand)
