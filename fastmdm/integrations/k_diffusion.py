"""fastmdm's samplers as k-diffusion sampler functions (docs/math.md §7).

``sample_ei(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3)`` and
``sample_ancestral(…, eta=1.0)`` keep k-diffusion's conventions: x starts at sigmas[0]·noise (x = x₀ + σ n),
``model(x, sigma, **extra_args)`` returns the denoised x̂₀ (sigma of shape (B,)), ``sigmas`` decrease and
end in 0 for a clean sample, ``callback(info)`` receives {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
after each model call (before the step), and ``disable`` turns the tqdm bar off. No k-diffusion import.

Under the hood: the VP-SDE with the same σ range, ``fm.vpsde(sigma_min=σ_last, sigma_max=σ_0)``, whose
state is u = x / sqrt(1 + σ²), on the grid t_i = τ⁻¹(log(1 + σ_i²)) (:func:`fastmdm.grids.sigma_times`);
``fm.sample`` runs from sigmas[0] to the last nonzero σ, and a final σ = 0 is its ``denoise=True`` end:
one more model call whose x̂₀ is the sample, as in every k-diffusion sampler. The first-order
exponential integrator (DDIM) is x ← x̂₀ + (σ_{i+1}/σ_i)(x − x̂₀) in these coordinates: k-diffusion's
``sample_euler``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..diffusion import vpsde
from ..grids import sigma_times
from ..sampling import sample
from ..schedules import tau_from_sigma
from ..validation import check_callable


def _check_sigmas(sigmas, x: Tensor) -> Tensor:
    """sigmas as a float64 CPU tensor: ≥ 2 finite values, strictly decreasing, all > 0 but the last (≥ 0)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"x must be a floating-point tensor (B, *data_shape), got {getattr(x, 'shape', x)!r}")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got {sigmas!r}")
    s = sigmas.detach().to(device="cpu", dtype=torch.float64)
    if not (torch.isfinite(s).all() and (s[1:] < s[:-1]).all() and s[-1] >= 0):
        raise ValueError("sigmas must be finite and strictly decreasing, ending in 0 or a positive sigma")
    return s


def _run(model, x: Tensor, sigmas: Tensor, extra_args, callback, disable, solver: str, **options) -> Tensor:
    """k-diffusion's loop with fastmdm's ``solver`` on the nonzero sigmas and a final x̂₀ at σ = 0."""
    check_callable(model, "model", "model(x, sigma, **extra_args)")
    if callback is not None:
        check_callable(callback, "callback", "callback(info)")
    s64 = _check_sigmas(sigmas, x)
    extra_args = {} if extra_args is None else extra_args
    if not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")
    levels = s64[:-1] if s64[-1] == 0 else s64
    scale = torch.exp(0.5 * tau_from_sigma(levels)).tolist()  # x = sqrt(1 + σ²) u
    s_in = x.new_ones([x.shape[0]])
    bar = tqdm(total=sigmas.numel() - 1, disable=disable)

    def denoise(x_i: Tensor, i: int) -> Tensor:
        denoised = model(x_i, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_i, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        bar.update()
        return denoised

    def vp_model(u: Tensor, t: Tensor) -> Tensor:
        """The denoiser on the VP state (prediction "x0"); the solvers call it once per step, in order."""
        i = next(steps)
        return denoise(u[:, 0] * scale[i], i)

    steps = itertools.count()
    to_zero = bool(s64[-1] == 0)
    with bar:
        if levels.numel() == 1:  # one level: only the final x̂₀ (or nothing)
            return denoise(x, 0) if to_zero else x
        diffusion = vpsde(sigma_min=float(levels[-1]), sigma_max=float(levels[0]))
        u = sample(vp_model, diffusion, x_T=(x / scale[0]).unsqueeze(1), grid=sigma_times(diffusion, levels),
                   solver=solver, prediction="x0", denoise=to_zero, **options)
    return u if to_zero else u * scale[-1]


def sample_ei(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None,
              disable: bool | None = None, order: int = 3) -> Tensor:
    """fastmdm's exponential integrator ("ei-ode", multistep ``order`` 1–3) on k-diffusion's sigmas.

    Deterministic (probability-flow ODE); one model call per step; order 1 is ``sample_euler``.
    """
    return _run(model, x, sigmas, extra_args, callback, disable, "ei-ode", order=order)


def sample_ancestral(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None,
                     disable: bool | None = None, eta: float = 1.0,
                     generator: torch.Generator | None = None) -> Tensor:
    """fastmdm's ancestral step (exact Gaussian posterior; ``eta`` 1 = DDPM, 0 = DDIM) on given sigmas.

    For every ``eta`` this is k-diffusion's ``sample_euler_ancestral`` in law: x ← x̂₀ + (σ_down/σ_i)(x − x̂₀)
    + σ_up ξ, σ_up² = η² σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i², σ_down² = σ_{i+1}² − σ_up². Noise comes from
    ``generator`` (default: torch's global RNG).
    """
    return _run(model, x, sigmas, extra_args, callback, disable, "ancestral", eta=eta, generator=generator)


__all__ = ["sample_ancestral", "sample_ei"]
