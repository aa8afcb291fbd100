"""Small helpers for K×K matrices acting on states (B, K, *data_shape)."""

from __future__ import annotations

from torch import Tensor


def apply_kk(mat: Tensor, u: Tensor) -> Tensor:
    """(A ⊗ I_d) u: (A u)[b, k, …] = Σ_l A[b, k, l] u[b, l, …]; mat (K, K) or (B, K, K)."""
    flat = u.reshape(u.shape[0], u.shape[1], -1)
    out = mat.to(u.dtype) @ flat
    return out.reshape(u.shape)


def sum_data(x: Tensor, start: int = 1) -> Tensor:
    """Sum over every dim from ``start`` on: (B, …) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(1) if start == 1 else x.flatten(start).sum(-1)


def data_dim(shape) -> int:
    """d = numel of one sample of shape (B, *data_shape)."""
    d = 1
    for n in shape[1:]:
        d *= int(n)
    return d
