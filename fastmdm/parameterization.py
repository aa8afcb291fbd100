"""What the network predicts, as affine maps to the score and to the noise (docs/math.md §3).

With the hybrid-start kernel q(u_t | x₀) = N(a x₀, Σ_t), a = M_t[:, 0], Σ_t = L_t L_tᵀ, the score
s = ∇ log p_t and the Cholesky noise ε̂ = −L_tᵀ s are affine in the network output y:

    s  = (S_out ⊗ I) y + (S_state ⊗ I) u,        ε̂ = (E_out ⊗ I) y + (E_state ⊗ I) u,

    kind     y              S_out         S_state     E_out       E_state
    "eps"    ε̂ (K vars)     −L⁻ᵀ          0           I           0
    "score"  s (K vars)     I             0           −Lᵀ         0
    "x0"     x̂₀ (1 var)     Σ⁻¹ a         −Σ⁻¹        −L⁻¹ a      L⁻¹
    "velocity_score"  s_v (var 1)  e₁     0           −Lᵀ e₁      0     (D s only; CLD-SGM)

(x0 by Tweedie: a x̂₀ = u + Σ s). The K×K blocks are float64 per time, None for I (out) or 0
(state). The denoised estimate from ε̂ is the GLS projection of u + Σ s = L(L⁻¹u − ε̂) onto the
data direction a: x̂₀ = wᵀ(L⁻¹u − ε̂), b = L⁻¹a, w = b / ‖b‖².

A new kind is one subclass of :class:`Parameterization` and one entry in ``_KINDS``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .ops import apply_kk, compute_dtype
from .transition import TransitionKernel
from .validation import check_choice


class AffineMap(NamedTuple):
    """z = (out ⊗ I) y + (state ⊗ I) u; out (B, K, K_y) or None for I, state (B, K, K) or None for 0."""

    out: Tensor | None
    state: Tensor | None

    def apply(self, y: Tensor, u: Tensor) -> Tensor:
        """The map on y (B, K_y, *data) and u (B, K, *data), in ``compute_dtype(u.dtype)`` (float32 for
        float16/bfloat16 u, whose range the blocks' entries, ~1e6 near t_min, exceed)."""
        work = compute_dtype(u.dtype)
        z = y.to(work) if self.out is None else apply_kk(self.out, y.to(work))
        return z if self.state is None else z + apply_kk(self.state, u.to(work))


class Parameterization:
    """One prediction kind: its output layout and its maps to the score and to ε̂.

    ``output_variable``: None when the network predicts all K variables (y has the state's shape),
    else the index of the one variable it predicts (y is (B, 1, *data); the network may return it
    as (B, *data) or inside a state-shaped tensor). ``needs_kernel``: False when the maps do not
    depend on the transition kernel (tk may then be None).
    """

    name: str = ""
    output_variable: int | None = None
    needs_kernel: bool = True
    full_score: bool = True  # False: the output determines only D·s (see VelocityScorePrediction)

    def check_diffusion(self, diffusion) -> None:
        """Raise ValueError if this kind cannot describe the score of ``diffusion``."""

    def check_output(self, out, u: Tensor, name: str = "model output") -> Tensor:
        """``out`` if it is a tensor shaped like the state u (or, for one-variable kinds, (B, *data))."""
        if not isinstance(out, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(out).__name__}")
        if out.shape != u.shape and not (self.output_variable is not None and out.shape == u[:, 0].shape):
            raise ValueError(f"{name} must have the state's shape {tuple(u.shape)}, got {tuple(out.shape)}")
        return out

    def output(self, out, u: Tensor) -> Tensor:
        """The validated network output as y (B, K_y, *data): the state's shape, or (B, 1, *data)."""
        out = self.check_output(out, u)
        if self.output_variable is None:
            return out
        return (out.select(1, self.output_variable) if out.shape == u.shape else out).unsqueeze(1)

    def score_map(self, tk: TransitionKernel | None) -> AffineMap:
        """(S_out, S_state) of s = S_out·y + S_state·u, tk the hybrid-start kernel at t (float64)."""
        raise NotImplementedError

    def eps_map(self, tk: TransitionKernel | None) -> AffineMap:
        """(E_out, E_state) of ε̂ = E_out·y + E_state·u, tk the hybrid-start kernel at t (float64)."""
        raise NotImplementedError

    def score(self, y: Tensor, u: Tensor, tk: TransitionKernel | None) -> Tensor:
        """s(u, t) from the compact output y (tk: the hybrid-start kernel at t)."""
        return self.score_map(tk).apply(y, u)

    def __repr__(self) -> str:
        return f"Parameterization({self.name!r})"


class NoisePrediction(Parameterization):
    """y = ε̂, the hybrid-start Cholesky noise: s = −L⁻ᵀ ε̂."""

    name = "eps"

    def score_map(self, tk):
        return AffineMap(-tk.chol_inv_t, None)

    def eps_map(self, tk):
        return AffineMap(None, None)


class ScorePrediction(Parameterization):
    """y = s: ε̂ = −Lᵀ s."""

    name = "score"
    needs_kernel = False

    def score_map(self, tk):
        return AffineMap(None, None)

    def eps_map(self, tk):
        return AffineMap(-tk.chol.mT, None)


class DataPrediction(Parameterization):
    """y = x̂₀ (one variable; a network may return it as (B, *data) or as a whole state)."""

    name = "x0"
    output_variable = 0

    def score_map(self, tk):
        precision = tk.chol_inv_t @ tk.chol_inv_t.mT  # Σ⁻¹ = L⁻ᵀ L⁻¹
        return AffineMap(precision @ tk.mean_coef[..., :1], -precision)

    def eps_map(self, tk):
        L_inv = tk.chol_inv_t.mT
        return AffineMap(-(L_inv @ tk.mean_coef[..., :1]), L_inv)

    def score(self, y, u, tk):
        """s = −L⁻ᵀ L⁻¹ (u − a x̂₀): the residual first, so no O(1/τ) terms cancel near t_min."""
        resid = u - apply_kk(tk.mean_coef[..., :1], y)
        return -apply_kk(tk.chol_inv_t, apply_kk(tk.chol_inv_t.mT, resid))


class VelocityScorePrediction(Parameterization):
    """y = s_v, the velocity component of the score only (CLD-SGM's networks, output (B, *data)).

    s is taken as (0, s_v): wrong in x, but D s is exact when D = diag(0, Γ), so everything that
    sees the score only through D s is exact — the reverse SDE, the probability-flow drift and its
    divergence (euler-maruyama, sscs, heun, rk45, the likelihood). ε̂ = −Lᵀ s is not ε̂: samplers
    and objectives that need the whole score refuse this kind (``full_score = False``).
    """

    name = "velocity_score"
    output_variable = 1
    full_score = False

    def check_diffusion(self, diffusion) -> None:
        D = diffusion.D.detach()
        if diffusion.K != 2 or D[0].abs().max() > 0 or D[1, 1] <= 0:
            raise ValueError("prediction 'velocity_score' needs a K = 2 diffusion with D = diag(0, Gamma) "
                             f"(CLD, fm.cld_sgm), got {diffusion.name!r} with K = {diffusion.K}")

    def score_map(self, tk):
        out = tk.chol.new_zeros(*tk.chol.shape[:-1], 1)
        out[..., 1, 0] = 1.0
        return AffineMap(out, None)

    def eps_map(self, tk):
        return AffineMap(-tk.chol.mT[..., :, 1:2], None)


_KINDS = {kind.name: kind for kind in (NoisePrediction(), ScorePrediction(), DataPrediction(),
                                       VelocityScorePrediction())}
PREDICTIONS = tuple(_KINDS)


def get_parameterization(name: str) -> Parameterization:
    """The registered parameterisation called ``name`` (one of ``PREDICTIONS``)."""
    return _KINDS[check_choice(name, PREDICTIONS, "prediction")]


def denoised_weights(tk: TransitionKernel) -> Tensor:
    """w (B, K), float64, with x̂₀ = wᵀ(L⁻¹u − ε̂): b = L⁻¹ a, w = b / ‖b‖² (GLS projection)."""
    b = (tk.chol_inv_t.mT @ tk.mean_coef[..., :1])[..., 0]
    return b / (b * b).sum(-1, keepdim=True)


__all__ = ["PREDICTIONS", "AffineMap", "Parameterization", "denoised_weights", "get_parameterization"]
