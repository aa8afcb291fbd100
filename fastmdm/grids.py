"""Time grids for the samplers, from T down to t_min (docs/math.md §7), in float64.

- "quadratic" (the published grid): t_i = T − (T − t_min)(1 − (1 − i/N)²), small steps near the data;
- "uniform":   t_i = T − (T − t_min) i/N;
- "logsnr":    uniform in φ(t) = log(e^{τ(t)} − 1) (minus the log-SNR of a VP-SDE), inverted in closed
  form by τ = softplus(φ) and t = τ⁻¹(τ) — nearly uniform in log τ near the data;
- "datasnr":   uniform in the data log-SNR λ = log‖L_t⁻¹a_t‖ clipped to [−1.5, 5] ([−1, 3.75] up to 5
  steps), steps growing like e^{κ_N λ} at 8–11 steps (docs/math.md §10), the default of "ei-data";
- "datasnr-eps": the same in λ clipped to [−1.75, 5] with the warp of a noise-prediction multistep,
  κ_N = min(0.1 + N/100, 0.3) (docs/math.md §10), the default of the "ei-ode" solver;
- "optimized": chosen once per diffusion for "ei-data" on proxy mixtures with exact scores, without
  network or data (docs/math.md §11); built by :func:`fastmdm.grid_search.optimized_grid` (it runs the
  solver, so it is not in GRIDS or :func:`time_grid`); ``fm.sample(grid="optimized")`` takes it.

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

GRIDS = ("quadratic", "uniform", "logsnr", "datasnr", "datasnr-eps")
DATA_SNR_WINDOW = (-1.5, 5.0)  # λ = log‖L⁻¹a‖ range where a unit-scale data law's detail lives
FEW_STEPS_WINDOW = (-1.0, 3.75)  # "datasnr"'s window up to FEW_STEPS steps: no step spent outside it
FEW_STEPS = 5
EPS_SNR_BOTTOM = -1.75  # the window's bottom for noise-prediction solvers ("datasnr-eps")
DATA_SNR_MAX_WARP = 0.2  # κ at 9–11 steps: λ-steps grow like e^{κλ} (Karras ρ = 1/κ in σ = e^{−λ})
DATA_ORDER3_STEPS = 12  # "ei-data" runs order 3 from this many steps on (order 2 below), unwarped
EPS_SNR_MAX_WARP = 0.3  # the largest κ of "datasnr-eps", from 20 steps on
OUTSIDE_DENSITY = (0.05, 0.02)  # step density (below, above) the window: every step shrinks as N grows
_DENSE = 2001


def data_log_snr(diffusion: LinearDiffusion, times: Tensor) -> Tensor:
    """λ(t) = log‖L_t⁻¹ a_t‖ = ½ log(a_tᵀ Σ_t⁻¹ a_t), a_t = M_t[:, 0]: the data variable's log-SNR
    under the hybrid start (float64, CPU); for the VP-SDE it is log(α/σ)."""
    with torch.no_grad():
        tk = diffusion.transition_f64(times.to(torch.float64).cpu(), "hybrid")
    return (tk.chol_inv_t.mT @ tk.mean_coef[..., :1])[..., 0].norm(dim=-1).log()


def data_snr_warp(steps: int) -> float:
    """κ_N = DATA_SNR_MAX_WARP · clip((N − 7)/2, 0, 1) below DATA_ORDER3_STEPS, else 0: "ei-data"'s order 2
    (corrected) has enough steps for the mode decision from 8 steps on if they are packed there, and order 3
    runs best on the uniform window (docs/math.md §10, measured on sharp mixtures)."""
    if steps >= DATA_ORDER3_STEPS:
        return 0.0
    return DATA_SNR_MAX_WARP * min(max((steps - 7) / 2, 0.0), 1.0)


def eps_snr_warp(steps: int) -> float:
    """κ_N = min(0.1 + N/100, EPS_SNR_MAX_WARP) of "datasnr-eps": a noise-prediction multistep wants its
    steps packed towards low λ more as N grows (docs/math.md §10, measured on sharp mixtures)."""
    return min(0.1 + steps / 100, EPS_SNR_MAX_WARP)


def data_log_snr_table(diffusion: LinearDiffusion, t_min: float, t_max: float) -> tuple[Tensor, Tensor]:
    """(ρ, λ) on a dense grid in ρ = log τ from t_max to t_min, λ = data_log_snr made non-decreasing."""
    ends = diffusion.tau(torch.tensor([t_max, t_min], dtype=torch.float64)).log()
    rho = torch.linspace(float(ends[0]), float(ends[1]), _DENSE, dtype=torch.float64)
    lam = data_log_snr(diffusion, diffusion.tau_inverse(rho.exp()).clamp(t_min, t_max))
    return rho, torch.cummax(lam, 0).values


def times_at_levels(diffusion: LinearDiffusion, rho: Tensor, values: Tensor, levels: Tensor,
                    t_min: float, t_max: float) -> Tensor:
    """The grid t_max, t(level)…, t_min, each interior time where the non-decreasing ``values`` (tabulated
    at ``rho``) reach a level, by linear interpolation in ρ = log τ."""
    i = torch.searchsorted(values, levels).clamp(1, _DENSE - 1)
    frac = ((levels - values[i - 1]) / (values[i] - values[i - 1]).clamp_min(1e-300)).clamp(0, 1)
    inner = diffusion.tau_inverse((rho[i - 1] + frac * (rho[i] - rho[i - 1])).exp()).clamp(t_min, t_max)
    return torch.cat([torch.tensor([t_max], dtype=torch.float64), inner,
                      torch.tensor([t_min], dtype=torch.float64)])


def data_snr_grid(diffusion: LinearDiffusion, steps: int, t_min: float | None = None,
                  t_max: float | None = None, kind: str = "datasnr") -> Tensor:
    """Times uniform in w = −expm1(−κ_N (g − g_T))/κ_N (w = g − g_T at κ_N = 0), where
    g(λ) = clip(λ) + ν (λ − clip(λ)), ν = OUTSIDE_DENSITY[0] below the window and [1] above; "datasnr": clip
    to DATA_SNR_WINDOW (FEW_STEPS_WINDOW up to FEW_STEPS steps) and κ_N = data_snr_warp(N), "datasnr-eps":
    clip to [EPS_SNR_BOTTOM, 5] and κ_N = eps_snr_warp(N).

    λ is tabulated on a dense grid in ρ = log τ and made non-decreasing; each level is inverted by
    linear interpolation in ρ (docs/math.md §10).
    """
    steps = check_int(steps, "steps")
    lo, hi = diffusion.t_min if t_min is None else t_min, diffusion.T if t_max is None else t_max
    rho, lam = data_log_snr_table(diffusion, lo, hi)
    eps = kind == "datasnr-eps"
    if eps:
        window = (EPS_SNR_BOTTOM, DATA_SNR_WINDOW[1])
    else:
        window = FEW_STEPS_WINDOW if steps <= FEW_STEPS else DATA_SNR_WINDOW
    inside = lam.clamp(*window)
    below, above = OUTSIDE_DENSITY
    g = inside + below * (lam - inside).clamp(max=0) + above * (lam - inside).clamp(min=0)
    g = g - g[0]
    kappa = eps_snr_warp(steps) if eps else data_snr_warp(steps)
    w = g if kappa == 0 else -torch.expm1(-kappa * g) / kappa
    levels = w[-1] * torch.arange(1, steps, dtype=torch.float64) / steps
    return times_at_levels(diffusion, rho, w, levels, lo, hi)


def time_grid(diffusion: LinearDiffusion, steps: int, kind: str = "quadratic",
              t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """The N + 1 times t_0 = t_max > … > t_N = t_min (defaults: the diffusion's T and t_min), N = ``steps``
    (float64)."""
    steps = check_int(steps, "steps")
    check_choice(kind, GRIDS, "grid")
    if kind.startswith("datasnr"):
        return data_snr_grid(diffusion, steps, t_min, t_max, kind)
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
