"""The "optimized" grid of "ei-data": chosen once per diffusion, without network or data (docs/math.md §11).

Proxy laws with exact scores (docs/math.md §8): 1-D mixtures of 2 and 3 modes at unit spacing with mode
stds s ∈ PROXY_STDS. From PROXY_SAMPLES fixed prior draws, the sampler on a candidate grid and on a
fine reference grid give samples x and x*; per proxy the error is the per-mode W2 in units of s,

    E = Σ_c w_c mean_q ((Q_x^c(q) − Q_x*^c(q)) / s)² + Σ_c (n_c − n*_c)² / B²,

Q^c the quantiles of the samples nearest mode c, w_c = n*_c / B. The grid minimises mean log E over the
proxies by Nelder–Mead on the N − 1 interior levels of the data log-SNR λ = log‖L_t⁻¹a_t‖ (softmax
increments: monotone, exact ends), started from the "datasnr" grid; it is kept only if it improves on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .data_multistep import data_multistep_plan, run_data_multistep
from .diffusion import LinearDiffusion
from .grids import GRIDS, data_log_snr, data_log_snr_table, data_snr_grid, times_at_levels
from .mixtures import GaussianMixture, exact_score_model
from .noise_frame import diffusion_key
from .validation import check_int

NAMED_GRIDS = (*GRIDS, "optimized")  # the grids fm.sample takes by name
PROXY_STDS = (0.02, 0.05, 0.15)  # mode stds of the proxy mixtures (modes at unit spacing)
PROXY_SAMPLES = 1024  # prior draws per proxy
REFERENCE_STEPS = 200  # fine "datasnr" grid of the reference samples
MAX_EVALUATIONS = 200  # Nelder–Mead budget per grid
_QUANTILES = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
_grids: dict[tuple, Tensor] = {}


def proxy_mixtures() -> list[GaussianMixture]:
    """The proxy data laws: modes {−1, 1} and {−1, 0, 1}, equal weights, each std in PROXY_STDS."""
    return [GaussianMixture([1 / len(m)] * len(m), [[x] for x in m], [s] * len(m))
            for s in PROXY_STDS for m in ((-1.0, 1.0), (-1.0, 0.0, 1.0))]


class _ExactLoop:
    """The sampler loop's interface for run_data_multistep with an exact ε̂ model, no reports."""

    generator = None

    def __init__(self, model, batch: int):
        self.model, self.batch, self.net = model, batch, self

    def times(self, times: Tensor) -> Tensor:
        return times[:, None].expand(-1, self.batch)

    def eps(self, u: Tensor, t: Tensor, n: int) -> Tensor:
        return self.model(u, t)

    def end_step(self, u: Tensor, n: int, u_eval: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
        return u


def prior_draws(diffusion: LinearDiffusion) -> Tensor:
    """PROXY_SAMPLES fixed draws of u_T ~ N(0, Σ∞), (B, K, 1): scrambled Sobol points through the normal
    quantile (low-variance, so the search sees a smooth objective)."""
    engine = torch.quasirandom.SobolEngine(diffusion.K, scramble=True, seed=0)
    sobol = engine.draw(PROXY_SAMPLES, dtype=torch.float64)
    normal = torch.special.ndtri(sobol.clamp(1e-12, 1 - 1e-12))
    return (normal * diffusion.stationary_var.detach().cpu().to(torch.float64).sqrt())[..., None]


def proxy_samples(diffusion: LinearDiffusion, times: Tensor, order: int | None = None) -> list[Tensor]:
    """The "ei-data" samples x (PROXY_SAMPLES,) of each proxy law on ``times`` (float64, fixed draws)."""
    plan = data_multistep_plan(diffusion, times, order)
    start = prior_draws(diffusion)
    with torch.no_grad():
        return [run_data_multistep(_ExactLoop(exact_score_model(mix, diffusion), PROXY_SAMPLES), plan,
                                   start)[:, 0, 0] for mix in proxy_mixtures()]


def per_mode_w2(x: Tensor, reference: Tensor, mixture: GaussianMixture) -> float:
    """E of the module docstring: per-mode quantile W2 in units of the mode std, plus mode-mass error."""
    modes = mixture.means[:, 0]
    near_x = (x[:, None] - modes).abs().argmin(1)
    near_ref = (reference[:, None] - modes).abs().argmin(1)
    total = 0.0
    for c in range(modes.numel()):
        ours, ref = x[near_x == c], reference[near_ref == c]
        total += float((ours.numel() - ref.numel()) ** 2) / reference.numel() ** 2
        if ours.numel() < 2:
            total += 1.0
            continue
        gap = (ours.quantile(_QUANTILES) - ref.quantile(_QUANTILES)) / mixture.stds[c]
        total += ref.numel() / reference.numel() * float(gap.pow(2).mean())
    return total


def _times(diffusion: LinearDiffusion, table: tuple[Tensor, Tensor], logits: np.ndarray,
           t_min: float, t_max: float) -> Tensor:
    """The grid whose λ increments are softmax([logits, 0]) of λ's range (monotone, exact ends)."""
    rho, lam = table
    z = np.concatenate([logits, [0.0]])
    w = np.exp(z - z.max())
    levels = lam[0] + (lam[-1] - lam[0]) * torch.from_numpy(np.cumsum(w / w.sum())[:-1])
    return times_at_levels(diffusion, rho, lam, levels, t_min, t_max)


def optimized_grid(diffusion: LinearDiffusion, steps: int, t_min: float | None = None,
                   t_max: float | None = None, order: int | None = None) -> Tensor:
    """The N + 1 times t_max = t_0 > … > t_N = t_min (defaults T, t_min) minimising the proxy error of
    "ei-data" of ``order`` (None: its default), with its corrector (float64; cached per diffusion, N,
    ends and order; 15–120 CPU s to build)."""
    steps = check_int(steps, "steps")
    lo = diffusion.t_min if t_min is None else float(t_min)
    hi = diffusion.T if t_max is None else float(t_max)
    key = (diffusion_key(diffusion), steps, lo, hi, order)
    if key not in _grids:
        best = data_snr_grid(diffusion, steps, lo, hi)
        if steps > 1:
            try:
                from scipy.optimize import minimize  # an optional dependency: only this grid needs it
            except ImportError:
                raise ImportError('grid="optimized" needs scipy: pip install scipy '
                                  '(or "fastmdm[data]", which brings it)') from None
            mixtures = proxy_mixtures()
            references = proxy_samples(diffusion, data_snr_grid(diffusion, REFERENCE_STEPS, lo, hi), order)
            table = data_log_snr_table(diffusion, lo, hi)

            def objective(logits: np.ndarray) -> float:
                samples = proxy_samples(diffusion, _times(diffusion, table, logits, lo, hi), order)
                if not all(torch.isfinite(x).all() for x in samples):
                    return 1e3
                errors = [per_mode_w2(*args) for args in zip(samples, references, mixtures, strict=True)]
                return float(np.log(np.asarray(errors) + 1e-12).mean())

            increments = np.maximum(np.diff(data_log_snr(diffusion, best).numpy()), 1e-9)
            start = np.log(increments[:-1] / increments[-1])
            options = {"maxfev": MAX_EVALUATIONS, "xatol": 1e-3, "fatol": 1e-4, "adaptive": True}
            found = minimize(objective, start, method="Nelder-Mead", options=options)
            if found.fun < objective(start):
                best = _times(diffusion, table, found.x, lo, hi)
        _grids[key] = best
    return _grids[key].clone()


__all__ = ["NAMED_GRIDS", "optimized_grid", "per_mode_w2", "prior_draws", "proxy_mixtures", "proxy_samples"]
