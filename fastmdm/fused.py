"""The torch layer's side of the kernels that need more than tensors (docs/math.md §2).

What such a kernel takes from fastmdm — the transition series and the torch path its backward
differentiates, a seed drawn from a ``torch.Generator`` — is passed in here, so
:mod:`fastmdm.kernels` imports nothing from fastmdm. ``kernel`` is what
:func:`fastmdm.backend.dispatch` returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernels.common import NoiseSeed, TransitionSeries
from .ops import draw_seed
from .transition import LYAPUNOV_TERMS, TAYLOR_TERMS, TransitionKernel, spectral_norm, transition_kernel

SERIES = TransitionSeries(TAYLOR_TERMS, LYAPUNOV_TERMS, spectral_norm, transition_kernel)
SEED_HIGH = 2**31 - 1  # perturbation seeds are drawn in [0, SEED_HIGH)


def fused_transition(kernel: Callable, A: Tensor, two_d: Tensor, tau: Tensor,
                     init_aux_var: float | None, stationary_var: Tensor) -> TransitionKernel:
    """:func:`fastmdm.transition.transition_kernel` by the Triton kernel (same arguments)."""
    return TransitionKernel(*kernel(A, two_d, tau, init_aux_var, stationary_var, SERIES))


def fused_perturb(kernel: Callable, x0: Tensor, tk: TransitionKernel, start: str = "hybrid",
                  generator: torch.Generator | None = None, noise: Tensor | None = None,
                  store_noise: bool = True) -> tuple[Tensor, Tensor | NoiseSeed]:
    """(u_t, ε), u_t = M_t m₀ + L_t ε by the Triton kernel: ε given, or drawn in-kernel from a
    seed that ``generator`` picks; ``store_noise=False`` returns that :class:`NoiseSeed` in
    place of ε (nothing stored; :func:`fastmdm.dsm.weighted_dsm` regenerates it)."""
    coef = tk.mean_coef if start == "full" else tk.mean_coef[:, :, 0]
    if noise is not None:
        return kernel(x0, coef, tk.chol, start, noise=noise), noise
    seed = NoiseSeed(draw_seed(generator, SEED_HIGH))
    if store_noise:
        return kernel(x0, coef, tk.chol, start, seed=seed, return_noise=True)
    return kernel(x0, coef, tk.chol, start, seed=seed), seed
