"""Hutchinson divergence estimation: tr(J) = E[vᵀ J v] for probes with E[v vᵀ] = I."""

from __future__ import annotations

import torch
from torch import Tensor

DISTRIBUTIONS = ("rademacher", "gaussian")


def sample_probes(shape, distribution: str = "rademacher", generator: torch.Generator | None = None,
                  dtype=None, device=None) -> Tensor:
    """Probes v with E[v vᵀ] = I: Rademacher (±1) or standard Gaussian."""
    if distribution == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
        return v
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def hutchinson_divergence(fn, u: Tensor, probes: int = 1, distribution: str = "rademacher",
                          generator: torch.Generator | None = None,
                          create_graph: bool = False) -> Tensor:
    """Per-sample estimate of ∇·fn(u) = tr(∂fn/∂u) with ``probes`` vector–Jacobian products.

    fn maps (B, …) to (B, …) of the same shape, sample-wise. Returns (B,).
    """
    with torch.enable_grad():
        x = u if u.requires_grad else u.detach().requires_grad_(True)
        out = fn(x)
        return divergence_of_output(out, x, probes, distribution, generator, create_graph)


def divergence_of_output(out: Tensor, x: Tensor, probes: int = 1,
                         distribution: str = "rademacher",
                         generator: torch.Generator | None = None,
                         create_graph: bool = False) -> Tensor:
    """Hutchinson estimate of ∇ₓ·out for an already computed out = fn(x) (x requires grad)."""
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if out.shape != x.shape:
        raise ValueError(f"fn must return the input's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(probes):
        v = sample_probes(x.shape, distribution, generator, x.dtype, x.device)
        (jtv,) = torch.autograd.grad(out, x, v, retain_graph=i < probes - 1 or create_graph,
                                     create_graph=create_graph)
        total = total + (v * jtv).flatten(1).sum(1)
    return total / probes
