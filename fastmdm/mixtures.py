"""Gaussian-mixture data laws with exact scores under any linear MDM (docs/math.md §8).

If x₀ ~ Σ_c w_c N(μ_c, s_c² I_d), the hybrid-start marginal at t is
u_t ~ Σ_c w_c N(m_c, C_c ⊗ I_d) with m_c = a μ_cᵀ (K × d), a = M_t[:, 0], and
C_c = s_c² a aᵀ + Σ_t. Its score is Σ_c γ_c(u) (−C_c⁻¹(u − m_c)) with
responsibilities γ_c ∝ w_c N(u; m_c, C_c): K×K algebra only. s_c = 0 is a point mass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .diffusion import LinearDiffusion
from .parameterization import get_parameterization


class GaussianMixture:
    """x₀ ~ Σ_c w_c N(μ_c, s_c² I): weights (C,), means (C, *data_shape), stds (C,) ≥ 0."""

    def __init__(self, weights, means, stds):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64).flatten()
        if mu.dim() < 2 or mu.shape[0] != w.numel() or s.numel() != w.numel():
            raise ValueError(f"need weights (C,), means (C, *data_shape), stds (C,); got shapes "
                             f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(s.shape)}")
        if not ((w > 0).all() and (s >= 0).all()):
            raise ValueError("weights must be > 0 and stds >= 0")
        self.weights, self.means, self.stds = w / w.sum(), mu, s
        self.data_shape = tuple(mu.shape[1:])

    @property
    def dim(self) -> int:
        return self.means[0].numel()

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        """n draws of x₀, shape (n, *data_shape)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.data_shape), dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.stds[comp].view(-1, *[1] * len(self.data_shape)) * noise
        return x.to(dtype or torch.get_default_dtype())

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of the data law, (B,) float64 (requires every s_c > 0)."""
        x = x.to(torch.float64).flatten(1)
        mu = self.means.flatten(1)
        var = self.stds**2
        sq = ((x[:, None, :] - mu[None]) ** 2).sum(-1)  # (B, C)
        comp = -0.5 * (sq / var + self.dim * torch.log(2 * math.pi * var))
        return torch.logsumexp(self.weights.log() + comp, dim=1)

    def marginal(self, diffusion: LinearDiffusion, t) -> tuple[Tensor, Tensor]:
        """Per-sample (a, C): a = M_t[:, :, 0] (B, K) and C_c = s_c² a aᵀ + Σ_t (B, C, K, K)."""
        t64 = diffusion.check_time(t, device=self.means.device)
        tk = diffusion.transition_f64(t64, "hybrid")
        a = tk.mean_coef[:, :, 0]
        C = (self.stds**2)[None, :, None, None] * (a[:, None, :, None] * a[:, None, None, :])
        return a, C + tk.cov[:, None]

    def _components(self, diffusion: LinearDiffusion, u: Tensor, t):
        """Residuals r_c = u − m_c, C_c⁻¹ r_c and log w_c N(u; m_c, C_c); all float64."""
        B = u.shape[0]
        u64 = u.to(torch.float64).flatten(2)  # (B, K, d)
        t64 = diffusion.check_time(t, batch=B, device=u.device)
        if bool((t64 == t64[0]).all()):  # a time shared by the batch (samplers): factor once
            t64 = t64[:1]
        a, C = self.marginal(diffusion, t64)  # (B or 1, K), (B or 1, C, K, K)
        mu = self.means.flatten(1).to(u.device)  # (C, d)
        resid = u64[:, None] - a[:, None, :, None] * mu[None, :, None, :]  # (B, C, K, d)
        chol = torch.linalg.cholesky(C)
        solved = torch.cholesky_solve(resid, chol)  # C⁻¹ r
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (B, C)
        d, K = mu.shape[1], diffusion.K
        logn = -0.5 * ((resid * solved).sum((-1, -2)) + d * (logdet + K * math.log(2 * math.pi)))
        return resid, solved, self.weights.log().to(u.device) + logn, a

    def marginal_log_prob(self, diffusion: LinearDiffusion, u: Tensor, t) -> Tensor:
        """log p_t(u) of the hybrid-start marginal, (B,) float64."""
        return torch.logsumexp(self._components(diffusion, u, t)[2], dim=1)

    def score(self, diffusion: LinearDiffusion, u: Tensor, t) -> Tensor:
        """∇_u log p_t(u) = Σ_c γ_c (−C_c⁻¹(u − m_c)), in u's dtype."""
        _, solved, logw, _ = self._components(diffusion, u, t)
        gamma = torch.softmax(logw, dim=1)
        return (-(gamma[:, :, None, None] * solved).sum(1)).reshape(u.shape).to(u.dtype)

    def posterior_mean(self, diffusion: LinearDiffusion, u: Tensor, t) -> Tensor:
        """E[x₀ | u_t] = Σ_c γ_c (μ_c + s_c² aᵀ C_c⁻¹ (u − m_c)), shape (B, *data_shape)."""
        _, solved, logw, a = self._components(diffusion, u, t)
        gamma = torch.softmax(logw, dim=1)
        mu = self.means.flatten(1).to(u.device)
        per = mu[None] + (self.stds**2)[None, :, None] * (a[:, None, :, None] * solved).sum(2)
        x0 = (gamma[:, :, None] * per).sum(1)
        return x0.reshape(u.shape[0], *u.shape[2:]).to(u.dtype)


def exact_score_model(mixture: GaussianMixture, diffusion: LinearDiffusion, prediction: str = "eps"):
    """A model(u, t) with the exact answer for ``prediction``: ε̂ = −L_tᵀ s, s, or E[x₀ | u]."""
    get_parameterization(prediction)
    score_to_eps = get_parameterization("score").eps_map

    def model(u: Tensor, t: Tensor) -> Tensor:
        if prediction == "x0":
            x0 = mixture.posterior_mean(diffusion, u, t)
            return x0.unsqueeze(1).expand_as(u).contiguous()
        s = mixture.score(diffusion, u, t)
        if prediction == "score":
            return s
        tk = diffusion.transition_f64(diffusion.check_time(t, batch=u.shape[0], device=u.device))
        return score_to_eps(tk).apply(s, u)

    return model
