"""The exact single-point model of the sampler tests (docs/math.md §8): ε̂ by a triangular solve,
no Σ⁻¹, so the Dirac test can see rounding-level errors."""

import torch


def _kernel(diffusion, t):
    """Hybrid kernel at the (shared) time of a sampler call, float64."""
    return diffusion.transition_f64(t[:1].to(torch.float64), "hybrid")


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
