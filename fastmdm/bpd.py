"""Bits per dimension for discrete data: dequantisation, the logit transform, the bound.

Data with n levels scaled to [0, 1]; x̃ = (x (n − 1) + U) / n, U ~ U[0, 1)^d;
y = logit(α + (1 − 2α) x̃) with log-det ldj = Σ_j [log(1 − 2α) − log(s_j (1 − s_j))],
s = α + (1 − 2α) x̃; then bpd = −(ELBO_y + ldj) / (d ln 2) + log₂ n (docs/math.md §4),
a bound on the discrete negative log-likelihood in bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops import data_dim, sum_data


def _check_levels(levels, allow_none: bool = False) -> None:
    if levels is None and allow_none:
        return
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be {'None or ' if allow_none else ''}an integer >= 2, got {levels!r}")


def _check_unit_interval(x, name: str, batched: bool) -> None:
    """Raise unless x is a floating tensor with every entry in [0, 1] (and a batch axis if ``batched``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if batched and x.dim() < 1:
        raise ValueError(f"{name} must be a batch (B, *data_shape), got a 0-d tensor")
    if x.numel() == 0 or ((x >= 0) & (x <= 1)).all():
        return
    nan = int(x.isnan().sum().item())
    if nan:
        raise ValueError(f"{name} has {nan} NaN values; it must lie in [0, 1]")
    raise ValueError(f"{name} must lie in [0, 1], got values in [{x.min().item()}, {x.max().item()}]")


def dequantize(x: Tensor, levels: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of data on the grid {0, 1/(n−1), …, 1}: (x (n − 1) + U) / n."""
    _check_levels(levels)
    _check_unit_interval(x, "x", batched=False)
    k = torch.round(x * (levels - 1))
    return (k + torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)) / levels


def logit_transform(x: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """y = logit(α + (1 − 2α) x) and its per-sample log-det ldj (float64, (B,)); x (B, …) in [0, 1]."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    _check_unit_interval(x, "x", batched=True)
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    s64 = s.to(torch.float64)
    ldj = sum_data(math.log(1 - 2 * alpha) - torch.log(s64) - torch.log1p(-s64))
    return y, ldj


def logit_inverse(y: Tensor, alpha: float = 0.05) -> Tensor:
    """x = (sigmoid(y) − α) / (1 − 2α), the inverse of ``logit_transform``."""
    return (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)


def bits_per_dim(neg_elbo: Tensor, x0_shape, ldj: Tensor | float = 0.0,
                 levels: int | None = 256) -> Tensor:
    """bpd = (−ELBO_y − ldj) / (d ln 2) + log₂ n per sample.

    neg_elbo: (B,) negative ELBO (nats) of the transformed data y; x0_shape: the data batch
    shape (B, *data_shape); ldj: log-det of x̃ ↦ y per sample (0 without a transform);
    levels: n, or None for continuous data (no log₂ n term).
    """
    if not isinstance(neg_elbo, Tensor):
        raise TypeError(f"neg_elbo must be a torch.Tensor of shape (B,), got {type(neg_elbo).__name__}")
    shape = tuple(x0_shape)
    if neg_elbo.dim() != 1 or len(shape) < 2 or neg_elbo.shape[0] != shape[0]:
        raise ValueError(f"neg_elbo must have shape (B,) matching x0_shape {shape}, "
                         f"got {tuple(neg_elbo.shape)}")
    if not isinstance(ldj, (Tensor, int, float)) or isinstance(ldj, bool):
        raise TypeError(f"ldj must be a number or a torch.Tensor, got {type(ldj).__name__}")
    if isinstance(ldj, Tensor) and ldj.shape not in ((), neg_elbo.shape):
        raise ValueError(f"ldj must be a number or a tensor of shape () or {tuple(neg_elbo.shape)}, "
                         f"got {tuple(ldj.shape)}")
    _check_levels(levels, allow_none=True)
    d = data_dim(shape)
    out = (neg_elbo.to(torch.float64) - ldj) / (d * math.log(2))
    return out + (math.log2(levels) if levels is not None else 0.0)
