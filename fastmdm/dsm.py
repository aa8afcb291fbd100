"""The weighted DSM term of the ELBO (docs/math.md §4), one pass over (ε̂, ε).

    loss_b = ½ Σ_j (ε̂ − ε)[b, :, j]ᵀ W_b (ε̂ − ε)[b, :, j],   W_t = L_t⁻¹ (2β(t) D) L_t⁻ᵀ

Torch path here; the fused Triton kernel (:mod:`fastmdm.kernels.dsm_loss`) when
:func:`fastmdm.backend.dispatch` picks it — which also accepts the perturbation's
:class:`NoiseSeed` in place of ε and regenerates ε instead of reading it.
"""

from __future__ import annotations

from torch import Tensor

from .backend import dispatch
from .kernels.common import NoiseSeed, acc_dtype
from .ops import apply_kk, sum_data

__all__ = ["NoiseSeed", "weighted_dsm"]


def _check(eps_hat: Tensor, eps, weight: Tensor) -> None:
    if not isinstance(eps_hat, Tensor) or not eps_hat.is_floating_point() or eps_hat.dim() < 3:
        raise TypeError("eps_hat must be a floating-point tensor of shape (B, K, *data_shape)")
    B, K = eps_hat.shape[:2]
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor of shape (B, K, K)")
    if tuple(weight.shape) != (B, K, K):
        raise ValueError(f"weight must have shape {(B, K, K)}, got {tuple(weight.shape)}")
    if weight.device != eps_hat.device:
        raise ValueError(f"weight is on {weight.device} but eps_hat is on {eps_hat.device}")
    if not isinstance(eps, (Tensor, NoiseSeed)):
        raise TypeError(f"eps must be a tensor or a NoiseSeed, got {type(eps).__name__}")
    if isinstance(eps, Tensor):
        if eps.shape != eps_hat.shape or eps.device != eps_hat.device:
            raise ValueError(f"eps must match eps_hat's shape {tuple(eps_hat.shape)} and device "
                             f"{eps_hat.device}, got {tuple(eps.shape)} on {eps.device}")


def weighted_dsm(eps_hat: Tensor, eps, weight: Tensor) -> Tensor:
    """½ Σ_j (ε̂ − ε)[:, :, j]ᵀ W (ε̂ − ε)[:, :, j] per sample: shape (B,).

    eps_hat, eps: (B, K, *data_shape); eps may also be the :class:`NoiseSeed` of a seeded
    perturbation (``perturb_with_kernel(…, store_noise=False)`` on the Triton backend).
    weight: (B, K, K). Accumulates in float32 (float64 for float64 eps_hat).
    Differentiable in all inputs.
    """
    _check(eps_hat, eps, weight)
    K = eps_hat.shape[1]
    fused = dispatch("weighted_dsm", eps_hat.device, K)
    if fused is not None:
        return fused(eps_hat, eps, weight)
    if not isinstance(eps, Tensor):
        raise TypeError(f"eps must be a tensor on the torch path (K={K}, device "
                        f"{eps_hat.device}); a NoiseSeed needs the Triton backend")
    acc = acc_dtype(eps_hat.dtype)
    delta = eps_hat.to(acc) - eps.to(acc)
    return 0.5 * sum_data(delta * apply_kk(weight.to(acc), delta))
