"""Adapters: single-variable VP models trained elsewhere, as fastmdm models over the state (B, 1, *shape).

A VP-SDE (fastmdm.vpsde, K = 1) state is u = x_t = α_t x₀ + σ_t ε with α_t = e^{−τ(t)/2},
σ_t² = 1 − e^{−τ(t)}; match the schedule of the trained model (score_sde's VP uses β_max = 20:
``fm.vpsde(beta_max=20.0)``). The adapters carry their ``prediction`` so ``fm.sample`` needs none.

- ``from_score_sde(eps_model)``: eps_model(x, t) predicts ε from x_t and the continuous time t
  (score_sde / DDPM-style; ``time_scale=999`` for networks trained on the integer DDPM step).
- ``from_k_diffusion(denoiser)``: denoiser(x, sigma) returns E[x₀ | x] for x = x₀ + σ n
  (k-diffusion's convention); the VP state maps to it by x = x_t / α_t, σ = sqrt(e^{τ(t)} − 1).

A model may return a diffusers output object (``UNet2DOutput``): its ``.sample`` is used. A diffusers
DDPM UNet on its exact discrete schedule: ``from_score_sde(unet, time_scale=N - 1)`` with the diffusion
of :class:`fastmdm.integrations.diffusers.FastMDMScheduler` (``scheduler.diffusion``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .validation import check_callable, check_instance


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


def from_score_sde(eps_model, time_scale: float = 1.0) -> ScoreSDEModel:
    """Wrap a score_sde-style noise predictor eps_model(x, t) for a VP-SDE (K = 1)."""
    return ScoreSDEModel(eps_model, time_scale)


def from_k_diffusion(denoiser, diffusion: LinearDiffusion | None = None) -> KDiffusionModel:
    """Wrap a k-diffusion-style denoiser(x, sigma) -> x̂₀ for a VP-SDE (K = 1)."""
    return KDiffusionModel(denoiser, diffusion)


__all__ = ["KDiffusionModel", "ScoreSDEModel", "from_k_diffusion", "from_score_sde"]
