"""Adapters: models trained elsewhere, as fastmdm models over the state (B, K, *shape).

A VP-SDE (fastmdm.vpsde, K = 1) state is u = x_t = α_t x₀ + σ_t ε with α_t = e^{−τ(t)/2},
σ_t² = 1 − e^{−τ(t)}; match the schedule of the trained model (score_sde's VP uses β_max = 20:
``fm.vpsde(beta_max=20.0)``). The adapters carry their ``prediction`` so ``fm.sample`` needs none.

- ``from_score_sde(eps_model)``: eps_model(x, t) predicts ε from x_t and the continuous time t
  (score_sde / DDPM-style; ``time_scale=999`` for networks trained on the integer DDPM step).
- ``from_k_diffusion(denoiser)``: denoiser(x, sigma) returns E[x₀ | x] for x = x₀ + σ n
  (k-diffusion's convention); the VP state maps to it by x = x_t / α_t, σ = sqrt(e^{τ(t)} − 1).
- ``from_cld_sgm(score_model)``: a CLD-SGM network score_model(cat(x, v), t) → its velocity-score
  output (B, *data), for a CLD built with ``fm.cld_sgm`` (K = 2): prediction "velocity_score".

A model may return a diffusers output object (``UNet2DOutput``): its ``.sample`` is used. A diffusers
DDPM UNet on its exact discrete schedule: ``from_score_sde(unet, time_scale=N - 1)`` with the diffusion
of :class:`fastmdm.integrations.diffusers.FastMDMScheduler` (``scheduler.diffusion``).

:func:`resolve_model` is the one place that turns (model, prediction) into what the samplers,
the objectives and the likelihood evaluate: an adapter's own prediction is used unless a
different one is asked for, which is an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .parameterization import Parameterization, get_parameterization
from .validation import check_callable, check_choice, check_instance, check_number


def model_tensor(out):
    """A network's output as a tensor: a diffusers output object (UNet2DOutput, …) gives its ``.sample``."""
    sample = getattr(out, "sample", None)
    return sample if not isinstance(out, Tensor) and isinstance(sample, Tensor) else out


def _check_vp(diffusion: LinearDiffusion) -> LinearDiffusion:
    check_instance(diffusion, LinearDiffusion, "diffusion")
    if diffusion.K != 1:
        raise ValueError(f"single-variable adapters need a K = 1 diffusion (vpsde), got K = {diffusion.K}")
    return diffusion


class ScoreSDEModel:
    """model(u, t) = eps_model(u[:, 0], time_scale · t)[:, None]: noise prediction ("eps")."""

    prediction = "eps"

    def __init__(self, eps_model, time_scale: float = 1.0):
        check_callable(eps_model, "eps_model", "eps_model(x, t)")
        self.eps_model, self.time_scale = eps_model, float(time_scale)

    def bind(self, diffusion: LinearDiffusion) -> ScoreSDEModel:
        _check_vp(diffusion)
        return self

    def __call__(self, u: Tensor, t: Tensor) -> Tensor:
        return model_tensor(self.eps_model(u[:, 0], t * self.time_scale)).unsqueeze(1)


class KDiffusionModel:
    """model(u, t) = denoiser(u[:, 0] / α_t, σ_t)[:, None], σ_t = sqrt(e^τ − 1): data prediction ("x0")."""

    prediction = "x0"

    def __init__(self, denoiser, diffusion: LinearDiffusion | None = None):
        check_callable(denoiser, "denoiser", "denoiser(x, sigma)")
        self.denoiser = denoiser
        self.diffusion = None if diffusion is None else _check_vp(diffusion)

    def bind(self, diffusion: LinearDiffusion) -> KDiffusionModel:
        """The adapter for ``diffusion`` (the samplers call this; a bound one must match)."""
        _check_vp(diffusion)
        if self.diffusion is not None and self.diffusion is not diffusion:
            raise ValueError("this adapter is bound to a different diffusion")
        return KDiffusionModel(self.denoiser, diffusion)

    def __call__(self, u: Tensor, t: Tensor) -> Tensor:
        if self.diffusion is None:
            raise ValueError("from_k_diffusion needs a diffusion: pass diffusion= or call it via fm.sample")
        tau = self.diffusion.tau(t.to(torch.float64))
        alpha = torch.exp(-0.5 * tau).to(u.dtype)
        sigma = torch.sqrt(torch.expm1(tau)).to(u.dtype)
        x = u[:, 0] / alpha.view(-1, *([1] * (u.dim() - 2)))
        return model_tensor(self.denoiser(x, sigma)).unsqueeze(1)


OBJECTIVES = ("hsm", "dsm")


class CLDSGMModel:
    """model(u, t) = s_v = ℓ(t) · score_model(cat(x, v), t) (+ −v / Σ̃_vv with ``mixed_score``).

    CLD-SGM's noise parameterisation: its covariance Σ̃ = Σ_t + numerical_eps·I (Σ_t from the hybrid
    start for the "hsm" objective, from the full start for "dsm") and ℓ(t) = −sqrt(Σ̃_xx / det Σ̃),
    minus the inverse of the velocity entry of Σ̃'s Cholesky factor (12.80 instead of the exact 19.94
    at t = 1e-3 for its toy config); with ``mixed_score`` Σ̃_vv is the hybrid one, as in its code.
    """

    prediction = "velocity_score"

    def __init__(self, score_model, numerical_eps: float = 1e-6, mixed_score: bool = False,
                 objective: str = "hsm", diffusion: LinearDiffusion | None = None):
        check_callable(score_model, "score_model", "score_model(u, t)")
        check_number(numerical_eps, "numerical_eps", 0.0)
        check_choice(objective, OBJECTIVES, "objective")
        check_instance(mixed_score, bool, "mixed_score")
        self.score_model, self.numerical_eps = score_model, float(numerical_eps)
        self.mixed_score, self.objective = mixed_score, objective
        self.diffusion = None
        if diffusion is not None:
            check_instance(diffusion, LinearDiffusion, "diffusion")
            get_parameterization(self.prediction).check_diffusion(diffusion)
            self.diffusion = diffusion

    def bind(self, diffusion: LinearDiffusion) -> CLDSGMModel:
        """The adapter for ``diffusion`` (the samplers and the likelihood call this)."""
        if self.diffusion is not None and self.diffusion is not diffusion:
            raise ValueError("this adapter is bound to a different diffusion")
        return CLDSGMModel(self.score_model, self.numerical_eps, self.mixed_score, self.objective, diffusion)

    def multipliers(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(ℓ(t), Σ̃_vv of the hybrid start) at float64 times t (B,), float64."""
        t64 = t.detach().to(torch.float64).clamp(self.diffusion.t_min, self.diffusion.T)
        eye = self.numerical_eps * torch.eye(2, dtype=torch.float64, device=t64.device)
        hybrid = self.diffusion.transition_f64(t64, "hybrid").cov + eye
        cov = hybrid if self.objective == "hsm" else self.diffusion.transition_f64(t64, "full").cov + eye
        det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
        return -torch.sqrt(cov[:, 0, 0] / det), hybrid[:, 1, 1]

    def __call__(self, u: Tensor, t: Tensor) -> Tensor:
        if self.diffusion is None:
            raise ValueError("from_cld_sgm needs a diffusion: pass diffusion= or call it via fm.sample")
        ell, var_vv = (m.to(device=u.device, dtype=u.dtype).view(-1, *([1] * (u.dim() - 2)))
                       for m in self.multipliers(t))
        out = model_tensor(self.score_model(torch.cat([u[:, 0], u[:, 1]], dim=1), t))
        return ell * out - u[:, 1] / var_vv if self.mixed_score else ell * out


def from_cld_sgm(score_model, numerical_eps: float = 1e-6, mixed_score: bool = False, objective: str = "hsm",
                 diffusion: LinearDiffusion | None = None) -> CLDSGMModel:
    """Wrap a CLD-SGM score network (its config's numerical_eps, mixed_score, cld_objective) for a
    diffusion from ``fm.cld_sgm`` with the same mass, γ and β: prediction "velocity_score", for the
    solvers that need only D·s (euler-maruyama, sscs, heun, rk45) and ``ode_log_likelihood``."""
    return CLDSGMModel(score_model, numerical_eps, mixed_score, objective, diffusion)


def resolve_model(model, diffusion: LinearDiffusion,
                  prediction: str | None = None) -> tuple[Callable, Parameterization]:
    """(callable model(u, t), its parameterisation) for ``model`` under ``diffusion``.

    An adapter (anything with ``bind`` and/or ``prediction``) is bound to the diffusion and read
    with its own prediction; an explicit ``prediction`` that differs from it raises ValueError.
    Without either, "eps".
    """
    check_callable(model, "model", "model(u, t)")
    check_instance(diffusion, LinearDiffusion, "diffusion")
    if prediction is not None:
        get_parameterization(prediction)
    own = getattr(model, "prediction", None)
    if not isinstance(own, str):
        own = None
    if prediction is not None and own is not None and prediction != own:
        raise ValueError(f"prediction={prediction!r} conflicts with the model's own prediction {own!r} "
                         f"({type(model).__name__}); omit prediction= or pass {own!r}")
    parameterization = get_parameterization(prediction or own or "eps")
    parameterization.check_diffusion(diffusion)
    bind = getattr(model, "bind", None)
    if callable(bind):
        model = bind(diffusion)
    return model, parameterization


def from_score_sde(eps_model, time_scale: float = 1.0) -> ScoreSDEModel:
    """Wrap a score_sde-style noise predictor eps_model(x, t) for a VP-SDE (K = 1)."""
    return ScoreSDEModel(eps_model, time_scale)


def from_k_diffusion(denoiser, diffusion: LinearDiffusion | None = None) -> KDiffusionModel:
    """Wrap a k-diffusion-style denoiser(x, sigma) -> x̂₀ for a VP-SDE (K = 1)."""
    return KDiffusionModel(denoiser, diffusion)


__all__ = ["CLDSGMModel", "KDiffusionModel", "ScoreSDEModel", "from_cld_sgm", "from_k_diffusion",
           "from_score_sde", "resolve_model"]
