"""Noise schedules: the map from diffusion time t to the integrated rate τ(t) = ∫ β (docs/math.md §1).

A :class:`~fastmdm.diffusion.LinearDiffusion` depends on time only through τ(t) (its transition
kernel is a function of τ), the rate β(t) = dτ/dt and the inverse t = τ⁻¹(τ); a schedule supplies
the three, in float64. The data sits at τ = 0; every time the diffusion uses has τ > 0.

- :class:`LinearBeta` (the default): β(t) = β_min + (β_max − β_min) t, τ(t) = β_min t + ½(β_max − β_min) t².
- :class:`TabulatedTau`: τ linear between nodes (t_k, τ_k), β piecewise constant. A discrete
  schedule is one such table: DDPM's ᾱ_k at t_k = k / (N − 1) gives τ_k = −log ᾱ_k
  (:meth:`TabulatedTau.from_alphas_cumprod`), so a VP diffusion on it has exactly the trained
  marginals x_t = sqrt(ᾱ_k) x₀ + sqrt(1 − ᾱ_k) ε at every training step.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LinearBeta:
    """β(t) = β_min + (β_max − β_min) t (the published schedule)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 10.0):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    @property
    def key(self) -> tuple:
        """A hashable fingerprint (values, not identity)."""
        return ("linear", self.beta_min, self.beta_max)

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = β_min + (β_max − β_min) t."""
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def tau(self, t: Tensor) -> Tensor:
        """τ(t) = ∫₀ᵗ β = β_min t + ½(β_max − β_min) t²."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def tau_inverse(self, tau: Tensor) -> Tensor:
        """t with τ(t) = tau: the positive root of ½(β_max − β_min) t² + β_min t − τ = 0."""
        slope = self.beta_max - self.beta_min
        if slope == 0:
            return tau / self.beta_min
        b = self.beta_min
        # t = 2τ / (b + sqrt(b² + 2 slope τ)): the root without cancellation
        return 2 * tau / (b + torch.sqrt(b * b + 2 * slope * tau))

    def __repr__(self) -> str:
        return f"LinearBeta(beta_min={self.beta_min}, beta_max={self.beta_max})"


class TabulatedTau:
    """τ(t) linear between nodes (t_k, τ_k) (strictly increasing, τ_k > 0), extended past the ends."""

    def __init__(self, times, taus):
        times = torch.as_tensor(times, dtype=torch.float64).detach().flatten().cpu()
        taus = torch.as_tensor(taus, dtype=torch.float64).detach().flatten().cpu()
        if times.numel() < 2 or times.shape != taus.shape:
            raise ValueError(f"times and taus must be 1-D with the same number (>= 2) of nodes, got "
                             f"{tuple(times.shape)} and {tuple(taus.shape)}")
        for name, values in (("times", times), ("taus", taus)):
            if not (torch.isfinite(values).all() and (values[1:] > values[:-1]).all()):
                raise ValueError(f"{name} must be finite and strictly increasing")
        if not taus[0] > 0:
            raise ValueError(f"taus must be > 0 (the data is at tau = 0), got taus[0] = {float(taus[0])}")
        self.times, self.taus = times, taus

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> TabulatedTau:
        """DDPM's discrete schedule: τ_k = −log ᾱ_k at t_k = k / (N − 1), k = 0 … N − 1 (so t ∈ [0, 1])."""
        abar = torch.as_tensor(alphas_cumprod).detach().to(torch.float64).flatten().cpu()
        if abar.numel() < 2 or not ((abar > 0) & (abar < 1)).all():
            raise ValueError("alphas_cumprod must hold >= 2 values in (0, 1) (a zero terminal SNR, "
                             "alphas_cumprod = 0, has no finite tau)")
        n = abar.numel()
        return cls(torch.arange(n, dtype=torch.float64) / (n - 1), -torch.log(abar))

    @property
    def beta_min(self) -> float:
        """β at the table's start: its first segment's rate (≈ 0.12 for DDPM's linear betas, N = 1000)."""
        return float((self.taus[1] - self.taus[0]) / (self.times[1] - self.times[0]))

    @property
    def beta_max(self) -> float:
        """β at the table's end: its last segment's rate (≈ 20.2 for DDPM's linear betas, N = 1000)."""
        return float((self.taus[-1] - self.taus[-2]) / (self.times[-1] - self.times[-2]))

    @property
    def key(self) -> tuple:
        """A hashable fingerprint (values, not identity)."""
        return ("tabulated", self.times.numpy().tobytes(), self.taus.numpy().tobytes())

    def _segment(self, x: Tensor, nodes: Tensor) -> Tensor:
        """Index k of the segment [nodes[k], nodes[k + 1]] holding x (end segments past the ends)."""
        k = torch.searchsorted(nodes, x.detach().contiguous(), right=True) - 1
        return k.clamp(0, nodes.numel() - 2)

    def _interpolate(self, x, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        """(y(x), dy/dx) of the piecewise-linear map through (xs, ys)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        xs, ys = xs.to(x.device), ys.to(x.device)
        k = self._segment(x, xs)
        slope = (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
        return ys[k] + slope * (x - xs[k]), slope

    def beta(self, t: Tensor) -> Tensor:
        """β = dτ/dt on t's segment (piecewise constant)."""
        return self._interpolate(t, self.times, self.taus)[1]

    def tau(self, t: Tensor) -> Tensor:
        """τ(t) = τ_k + (t − t_k)(τ_{k+1} − τ_k)/(t_{k+1} − t_k) on [t_k, t_{k+1}]."""
        return self._interpolate(t, self.times, self.taus)[0]

    def tau_inverse(self, tau: Tensor) -> Tensor:
        """t with τ(t) = tau (the same segments, read the other way)."""
        return self._interpolate(tau, self.taus, self.times)[0]

    def __repr__(self) -> str:
        return (f"TabulatedTau({self.times.numel()} nodes, t in [{float(self.times[0])}, "
                f"{float(self.times[-1])}], tau in [{float(self.taus[0]):.4g}, {float(self.taus[-1]):.4g}])")


def tau_from_sigma(sigma) -> Tensor:
    """τ = log(1 + σ²): the VP level with noise-to-signal ratio σ = sqrt((1 − ᾱ)/ᾱ) (float64)."""
    return torch.log1p(torch.as_tensor(sigma, dtype=torch.float64) ** 2)


def sigma_from_tau(tau) -> Tensor:
    """σ = sqrt(e^τ − 1), the inverse of :func:`tau_from_sigma` (float64)."""
    return torch.sqrt(torch.expm1(torch.as_tensor(tau, dtype=torch.float64)))


__all__ = ["LinearBeta", "TabulatedTau", "sigma_from_tau", "tau_from_sigma"]
