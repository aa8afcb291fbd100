"""What the network predicts, turned into the score (mdm-math.md §3).

With q(u_t | start) = N(M_t m₀, L_t L_tᵀ): ∇ log q = −L_t⁻ᵀ ε, so
  "eps":   s = −L_t⁻ᵀ ε̂
  "score": s = network output
  "x0":    s = −Σ_t⁻¹ (u − M_t[:, 0] x̂₀)   (hybrid start, exact by Tweedie)
"""

from __future__ import annotations

from torch import Tensor

from .ops import apply_kk
from .transition import TransitionKernel

PREDICTIONS = ("eps", "score", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def check_output(out, u: Tensor, prediction: str, name: str = "model output") -> Tensor:
    """Validate a network output: shaped like the state u (x0 prediction may also be (B, *data))."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(out).__name__}")
    if out.shape == u.shape:
        return out
    if prediction == "x0" and out.shape == u[:, 0].shape:
        return out
    raise ValueError(f"{name} must have the state's shape {tuple(u.shape)}, got {tuple(out.shape)}")


def call_model(model, u: Tensor, t64: Tensor, prediction: str) -> Tensor:
    """model(u, t) with t cast to u's dtype; validates the output's shape."""
    return check_output(model(u, t64.to(u.dtype)), u, prediction)


def score_from_output(out: Tensor, u: Tensor, tk: TransitionKernel, prediction: str) -> Tensor:
    """The score s(u, t) implied by a network output (tk: the hybrid-start kernel at t)."""
    check_prediction(prediction)
    out = check_output(out, u, prediction)
    if prediction == "score":
        return out
    if prediction == "eps":
        return -apply_kk(tk.chol_inv_t, out)
    x0 = out[:, 0] if out.shape == u.shape else out
    a = tk.mean_coef[:, :, 0].to(u.dtype)
    resid = u - a.view(*a.shape, *([1] * (x0.dim() - 1))) * x0.unsqueeze(1)
    return -apply_kk(tk.chol_inv_t, apply_kk(tk.chol_inv_t.transpose(-1, -2), resid))


def eps_from_score(score: Tensor, tk: TransitionKernel) -> Tensor:
    """ε̂ = −L_tᵀ s, the inverse of the noise parameterisation."""
    return -apply_kk(tk.chol.transpose(-1, -2), score)
