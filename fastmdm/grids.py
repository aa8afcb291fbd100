"""Time grids for the samplers, from T down to t_min (mdm-math.md §7), in float64.

- "quadratic" (the published grid): t_i = T − (T − t_min)(1 − (1 − i/N)²), small steps near the data;
- "uniform":   t_i = T − (T − t_min) i/N;
- "logsnr":    uniform in φ(t) = log(e^{τ(t)} − 1) (minus the log-SNR of a VP-SDE), inverted in closed
  form by τ = softplus(φ) and t = τ⁻¹(τ) — nearly uniform in log τ near the data.

k-diffusion's grids, in time (σ = sqrt(e^τ − 1), the VP noise-to-signal ratio; φ = 2 log σ), for
``fm.sample(grid=…)``: :func:`karras_grid` (σ^{1/ρ} uniform), :func:`exponential_grid` (log σ uniform:
the "logsnr" grid), and :func:`sigma_times` for any given σ levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion import LinearDiffusion
from .schedules import sigma_from_tau, tau_from_sigma
from .validation import check_choice, check_int, check_number

GRIDS = ("quadratic", "uniform", "logsnr")


def time_grid(diffusion: LinearDiffusion, steps: int, kind: str = "quadratic",
              t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """The N + 1 times t_0 = t_max > … > t_N = t_min (defaults: the diffusion's T and t_min), N = ``steps``
    (float64)."""
    steps = check_int(steps, "steps")
    check_choice(kind, GRIDS, "grid")
    lo, hi = diffusion.t_min if t_min is None else t_min, diffusion.T if t_max is None else t_max
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "quadratic":
        t = hi - (hi - lo) * (1 - (1 - frac) ** 2)
    elif kind == "uniform":
        t = hi - (hi - lo) * frac
    else:
        phi_hi, phi_lo = diffusion.phi(torch.tensor([hi, lo], dtype=torch.float64))
        t = diffusion.tau_inverse(F.softplus(phi_hi + (phi_lo - phi_hi) * frac, threshold=30.0))
    t[0], t[-1] = hi, lo  # exact ends
    return t


def sigma_times(diffusion: LinearDiffusion, sigmas) -> Tensor:
    """The times t = τ⁻¹(log(1 + σ²)) of noise levels σ (k-diffusion's sigmas), float64 on CPU."""
    sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64)
    return diffusion.tau_inverse(tau_from_sigma(sigmas))


def karras_grid(diffusion: LinearDiffusion, steps: int, rho: float = 7.0,
                t_min: float | None = None) -> Tensor:
    """Karras et al.'s grid: σ_i = (σ_max^{1/ρ} + i/N (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ from σ(T) to σ(t_min)."""
    steps = check_int(steps, "steps")
    rho = check_number(rho, "rho", 0.0, low_open=True)
    lo, hi = diffusion.t_min if t_min is None else t_min, diffusion.T
    s_hi, s_lo = sigma_from_tau(diffusion.tau(torch.tensor([hi, lo], dtype=torch.float64))) ** (1 / rho)
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    t = sigma_times(diffusion, (s_hi + frac * (s_lo - s_hi)) ** rho)
    t[0], t[-1] = hi, lo  # exact ends
    return t


def exponential_grid(diffusion: LinearDiffusion, steps: int, t_min: float | None = None) -> Tensor:
    """k-diffusion's exponential grid, log σ uniform on [t_min, T]: the "logsnr" grid (φ = 2 log σ)."""
    return time_grid(diffusion, steps, "logsnr", t_min)


__all__ = ["GRIDS", "exponential_grid", "karras_grid", "sigma_times", "time_grid"]
