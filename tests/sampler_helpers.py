"""Exact models shared by the sampler tests: Gaussian and single-point data laws (mdm-math.md §8)."""

import torch

from fastmdm.mixtures import GaussianMixture
from fastmdm.ops import apply_kk


def _kernel(diffusion, t):
    """Hybrid kernel at the (shared) time of a sampler call, float64."""
    return diffusion.transition_f64(t[:1].to(torch.float64), "hybrid")


def gaussian_eps_model(diffusion, mean, std):
    """ε̂ = −L_tᵀ s for data N(mean, std² I): s = −C⁻¹(u − a meanᵀ), C = std² a aᵀ + Σ_t."""
    mean = torch.as_tensor(mean, dtype=torch.float64)

    def model(u, t):
        tk = _kernel(diffusion, t)
        a = tk.mean_coef[0, :, :1]
        C = std**2 * a @ a.T + tk.cov[0]
        resid = u.to(torch.float64) - a.view(1, -1, *([1] * (u.dim() - 2))) * mean
        score = -apply_kk(torch.linalg.inv(C), resid)
        return (-apply_kk(tk.chol[0].T, score)).to(u.dtype)

    return model


def dirac_eps_model(diffusion, point):
    """ε̂ = L_t⁻¹(u − a x*) for the single-point law x₀ = x* (triangular solve, no Σ⁻¹)."""

    def model(u, t):
        tk = _kernel(diffusion, t)
        a = tk.mean_coef[0, :, 0]
        resid = u.to(torch.float64) - a.view(1, -1, *([1] * (u.dim() - 2))) * point
        flat = resid.reshape(u.shape[0], u.shape[1], -1)
        eps = torch.linalg.solve_triangular(tk.chol[0], flat, upper=False)
        return eps.reshape(u.shape).to(u.dtype)

    return model


def mixture_model(mixture: GaussianMixture, diffusion, prediction="eps"):
    """The exact model of a Gaussian mixture at a time shared by the batch (one K×K kernel per call)."""
    mu = mixture.means.flatten(1)

    def model(u, t):
        tk = _kernel(diffusion, t)
        a = tk.mean_coef[0, :, 0]
        C = (mixture.stds**2)[:, None, None] * torch.outer(a, a) + tk.cov[0]  # (C, K, K)
        u64 = u.to(torch.float64).flatten(2)
        resid = u64[:, None] - a[None, None, :, None] * mu[None, :, None, :]  # (B, C, K, d)
        chol = torch.linalg.cholesky(C)
        solved = torch.cholesky_solve(resid, chol)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logw = mixture.weights.log() - 0.5 * ((resid * solved).sum((-1, -2)) + mu.shape[1] * logdet)
        gamma = torch.softmax(logw, dim=1)
        if prediction == "x0":
            per = mu[None] + (mixture.stds**2)[None, :, None] * (a[None, None, :, None] * solved).sum(2)
            x0 = (gamma[:, :, None] * per).sum(1).reshape(u.shape[0], *u.shape[2:])
            return x0.to(u.dtype)
        score = -(gamma[:, :, None, None] * solved).sum(1).reshape(u.shape)
        if prediction == "score":
            return score.to(u.dtype)
        return (-apply_kk(tk.chol[0].T, score)).to(u.dtype)

    return model
