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

from .common import MAX_K, MAX_STEP_INPUTS, acc_dtype, block_size, launch_on, num_warps
from .philox import flat_values


@triton.jit
def _axpy(acc, col_ptr, x, K: tl.constexpr):
    """acc[k] += c[k] x for k < K, c the column of a row-major K×K matrix at ``col_ptr``."""
    out = ()
    for k in tl.static_range(K):
        out = out + (acc[k] + tl.load(col_ptr + k * K) * x,)
    return out


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
    # coefficient layout: [Φ, C, Λ, Γ_0, …, Γ_{INPUTS-1}], each K×K row-major. Each input row
    # is streamed into K accumulators by a loop that is not unrolled, so one column of
    # coefficients is live at a time (2K + 1 live rows, not 6K).
    ws = ()  # w = u + Λ y_0, the predicted mean
    acc = ()  # Σ_j Γ_j y_j + C ξ, then + Φ w
    for k in tl.static_range(K):
        ws = ws + (tl.load(u_ptr + (b * K + k) * d + cols, mask=mask, other=0.0).to(acc_t),)
        acc = acc + (tl.zeros((BLOCK_D,), dtype=acc_t),)
    for j in tl.static_range(INPUTS):
        y_ptr = y0_ptr if j == 0 else y1_ptr if j == 1 else y2_ptr
        for l in tl.range(K, loop_unroll_factor=1):
            y = tl.load(y_ptr + (b * K + l) * d + cols, mask=mask, other=0.0).to(acc_t)
            acc = _axpy(acc, coef_ptr + (3 + j) * KK + l, y, K)  # column l of Γ_j
            if j == 0:
                ws = _axpy(ws, coef_ptr + 2 * KK + l, y, K)  # column l of Λ
    if NOISY:
        seed = tl.load(seeds_ptr + index)
        for l in tl.range(K, loop_unroll_factor=1):
            xi = flat_values(seed, (b * K + l) * d + cols, True).to(acc_t)
            acc = _axpy(acc, coef_ptr + KK + l, xi, K)  # column l of C
    for l in tl.static_range(K):
        acc = _axpy(acc, coef_ptr + l, ws[l], K)  # column l of Φ
    for k in tl.static_range(K):
        tl.store(out_ptr + (b * K + k) * d + cols, acc[k].to(out_ptr.dtype.element_ty), mask=mask)


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
                num_warps=num_warps(K, u.dtype == torch.float64),
            )
    return out.view(u.shape)
