"""One sampler step u ← Φ (u + Λ y_0) + Σ_j Γ_j y_j + C ξ in one pass over the state (docs/math.md §7).

Φ, Λ, C and the Γ_j are K×K matrices shared by the whole batch (built once per time grid by
:mod:`fastmdm.solvers`), y_j the network outputs (or older noise predictions, for multistep
solvers) and ξ ~ N(0, I) drawn in the kernel in the flat noise layout of
:mod:`fastmdm.kernels.common` (offset 0), so it does not depend on the launch grid. The seed is
read from a device tensor (``seeds[index]``), so a captured CUDA graph can be replayed with fresh
seeds and the step needs no host synchronisation. Per program: one sample b and a block of data
columns; arithmetic in float32 (float64 for float64 data), like :mod:`fastmdm.kernels.perturbation`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import MAX_K, MAX_STEP_INPUTS, acc_dtype, block_size, launch_on
from .philox import flat_values


@triton.jit
def _sde_step_kernel(
    u_ptr, y0_ptr, y1_ptr, y2_ptr, coef_ptr, seeds_ptr, out_ptr, index, d,
    K: tl.constexpr, INPUTS: tl.constexpr, NOISY: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    acc_t = coef_ptr.dtype.element_ty
    KK: tl.constexpr = K * K
    # coefficient layout: [Φ, C, Λ, Γ_0, …, Γ_{INPUTS-1}], each K×K row-major
    us = ()
    ys0 = ()
    ys1 = ()
    ys2 = ()
    xi = ()
    seed = tl.load(seeds_ptr + index)
    for k in tl.static_range(K):
        where = (b * K + k) * d + cols
        us = us + (tl.load(u_ptr + where, mask=mask, other=0.0).to(acc_t),)
        if INPUTS > 0:
            ys0 = ys0 + (tl.load(y0_ptr + where, mask=mask, other=0.0).to(acc_t),)
        if INPUTS > 1:
            ys1 = ys1 + (tl.load(y1_ptr + where, mask=mask, other=0.0).to(acc_t),)
        if INPUTS > 2:
            ys2 = ys2 + (tl.load(y2_ptr + where, mask=mask, other=0.0).to(acc_t),)
        if NOISY:
            xi = xi + (flat_values(seed, where, True).to(acc_t),)
    ws = ()  # w = u + Λ y_0, the predicted mean
    for k in tl.static_range(K):
        w = us[k]
        if INPUTS > 0:
            for l in tl.static_range(K):
                w += tl.load(coef_ptr + 2 * KK + k * K + l) * ys0[l]
        ws = ws + (w,)
    for k in tl.static_range(K):
        acc = tl.load(coef_ptr + k * K) * ws[0]
        for l in tl.static_range(1, K):
            acc += tl.load(coef_ptr + k * K + l) * ws[l]
        for l in tl.static_range(K):
            if NOISY:
                acc += tl.load(coef_ptr + KK + k * K + l) * xi[l]
            if INPUTS > 0:
                acc += tl.load(coef_ptr + 3 * KK + k * K + l) * ys0[l]
            if INPUTS > 1:
                acc += tl.load(coef_ptr + 4 * KK + k * K + l) * ys1[l]
            if INPUTS > 2:
                acc += tl.load(coef_ptr + 5 * KK + k * K + l) * ys2[l]
        tl.store(out_ptr + (b * K + k) * d + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sde_step(u: Tensor, inputs: list[Tensor], coefs: Tensor, seeds: Tensor, index: int,
             noisy: bool = True) -> Tensor:
    """The fused step (see module docstring); coefs (3 + len(inputs), K, K), seeds an int64 device tensor."""
    B, K = u.shape[0], u.shape[1]
    if not 1 <= K <= MAX_K or len(inputs) > MAX_STEP_INPUTS:
        raise ValueError(f"the fused sampler step supports 1 <= K <= {MAX_K} and <= {MAX_STEP_INPUTS} "
                         f"inputs, got K={K}, {len(inputs)} inputs")
    flat = u.reshape(B, K, -1).contiguous()
    d = flat.shape[-1]
    ys = [y.reshape(B, K, -1).contiguous() for y in inputs]
    coef = coefs.to(device=u.device, dtype=acc_dtype(u.dtype)).contiguous()
    out = torch.empty_like(flat)
    if out.numel():
        block = block_size(d, u.device)
        pad = ys + [flat] * (MAX_STEP_INPUTS - len(ys))
        with launch_on(u.device):
            _sde_step_kernel[(B, triton.cdiv(d, block))](
                flat, *pad, coef, seeds, out, index, d,
                K=K, INPUTS=len(ys), NOISY=noisy, BLOCK_D=block,
            )
    return out.view(u.shape)
