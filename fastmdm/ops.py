"""Small helpers for K×K matrices acting on states (B, K, *data_shape)."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_kk(mat: Tensor, u: Tensor) -> Tensor:
    """(A ⊗ I_d) u: (A u)[b, k, …] = Σ_l A[b, k, l] u[b, l, …], in u's dtype.

    mat (K_out, K) or (B, K_out, K) (usually square); u (B, K, *data) -> (B, K_out, *data).
    """
    flat = u.reshape(u.shape[0], u.shape[1], -1)
    out = mat.to(u.dtype) @ flat
    return out.reshape(u.shape[0], mat.shape[-2], *u.shape[2:])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype K×K maps are applied in: float32 for float16/bfloat16 data (whose range the maps'
    entries, e.g. L⁻ᵀ ≈ 1e6 at t_min, overflow), else the data's own dtype."""
    return torch.promote_types(dtype, torch.float32)


def sum_data(x: Tensor, start: int = 1) -> Tensor:
    """Sum over every dim from ``start`` on: (B, …) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(1) if start == 1 else x.flatten(start).sum(-1)


def data_dim(shape) -> int:
    """d = numel of one sample of shape (B, *data_shape)."""
    d = 1
    for n in shape[1:]:
        d *= int(n)
    return d


def draw_seed(generator: torch.Generator | None = None, high: int = 2**31) -> int:
    """An integer seed in [0, high) drawn from ``generator`` (torch's default if None), so a
    torch.Generator makes in-kernel (Philox) or per-probe randomness reproducible."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, high, (1,), generator=generator, device=device).item())
