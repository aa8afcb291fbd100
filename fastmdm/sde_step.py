"""One sampler step u ← Φ (u + Λ y_0) + Σ_j Γ_j y_j + C ξ, ξ ~ N(0, I) (docs/math.md §7).

The coefficients [Φ, C, Λ, Γ_0, …] are K×K matrices shared by the batch (built once per time
grid by :mod:`fastmdm.solvers`); y_j the network outputs or older noise predictions. The fused
kernel (:mod:`fastmdm.kernels.sampler_step`) draws ξ from ``seeds[index]``; the torch path
from ``generator`` with torch.randn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import dispatch
from .ops import apply_kk


def sde_step(u: Tensor, inputs: list[Tensor], coefs: Tensor, seeds: Tensor, index: int, noisy: bool = True,
             generator: torch.Generator | None = None) -> Tensor:
    """u ← Φ (u + Λ y_0) + Σ_j Γ_j y_j + C ξ for a state u (B, K, *data) and inputs y_j of its shape.

    coefs (3 + len(inputs), K, K) = [Φ, C, Λ, Γ_0, …]; seeds an int64 tensor on u's device (the
    kernel's ξ seed is ``seeds[index]``); ``noisy=False`` drops C ξ.
    """
    fused = dispatch("sde_step", u.device, u.shape[1], len(inputs))
    if fused is not None:
        return fused(u, inputs, coefs, seeds, index, noisy)
    out = apply_kk(coefs[0], u + apply_kk(coefs[2], inputs[0]) if inputs else u)
    for j, y in enumerate(inputs):
        out = out + apply_kk(coefs[3 + j], y)
    if noisy:
        xi = torch.randn(u.shape, dtype=u.dtype, device=u.device, generator=generator)
        out = out + apply_kk(coefs[1], xi)
    return out
