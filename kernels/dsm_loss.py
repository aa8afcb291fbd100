"""Fused weighted DSM loss (docs/math.md §4): ½ Σ_j δ[:, j]ᵀ W δ[:, j], δ = ε̂ − ε, per sample.

ε is regenerated in-kernel from the perturbation's :class:`NoiseSeed` (the grouped noise
layout of :mod:`fastmdm.kernels.common`), or read if given as a tensor, so a training step
never stores it. Forward: per-block partial sums of δᵀWδ.
Backward: ∂/∂ε̂ = ḡ_b · ½(W + Wᵀ) δ in one pass, and ∂/∂W = ḡ_b · ½ Σ_j δ δᵀ (partial sums)
when W requires grad (learned diffusions). Arithmetic in float32 (float64 for float64 ε̂).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import MAX_K, NoiseSeed, acc_dtype, block_size, launch_on, num_warps, strides3
from .perturbation import noise_block


@triton.jit
def _deltas(eh_ptr, noise_ptr, seed, offset, b, blk, d, seb, sek, sej, snb, snk, snj,
            acc_t: tl.constexpr, K: tl.constexpr, FROM_SEED: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """δ_k = ε̂[b, k, cols] − ε[b, k, cols] for k < K, cols = blk·BLOCK_D + [0, BLOCK_D),
    zero outside the data."""
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    out = ()
    for k in tl.static_range(K):
        eh = tl.load(eh_ptr + b * seb + k * sek + cols * sej, mask=mask, other=0.0).to(acc_t)
        e = noise_block(noise_ptr, b * snb + k * snk + cols * snj, seed, offset, b * K + k, d,
                        blk, mask, FROM_SEED, BLOCK_D).to(acc_t)
        out = out + (tl.where(mask, eh - e, 0.0),)
    return out


@triton.jit
def _dsm_fwd(
    eh_ptr, noise_ptr, w_ptr, part_ptr, seed, offset, d, seb, sek, sej, snb, snk, snj,
    K: tl.constexpr, FROM_SEED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    acc_t = part_ptr.dtype.element_ty
    delta = _deltas(eh_ptr, noise_ptr, seed, offset, b, blk, d, seb, sek, sej, snb, snk, snj,
                    acc_t, K, FROM_SEED, BLOCK_D)
    total = delta[0] * 0.0
    for k in tl.static_range(K):
        wd = tl.load(w_ptr + (b * K + k) * K) * delta[0]
        for l in tl.static_range(1, K):
            wd += tl.load(w_ptr + (b * K + k) * K + l) * delta[l]
        total += delta[k] * wd
    tl.store(part_ptr + b * tl.num_programs(1) + blk, 0.5 * tl.sum(total, axis=0))


@triton.jit
def _dsm_bwd(
    eh_ptr, noise_ptr, w_ptr, go_ptr, geh_ptr, gw_ptr, seed, offset, d,
    seb, sek, sej, snb, snk, snj,
    K: tl.constexpr, FROM_SEED: tl.constexpr, NEED_EPS_HAT: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    go = tl.load(go_ptr + b)
    acc_t = go.dtype
    delta = _deltas(eh_ptr, noise_ptr, seed, offset, b, blk, d, seb, sek, sej, snb, snk, snj,
                    acc_t, K, FROM_SEED, BLOCK_D)
    if NEED_EPS_HAT:
        for k in tl.static_range(K):
            acc = delta[0] * 0.0
            for l in tl.static_range(K):
                wkl = tl.load(w_ptr + (b * K + k) * K + l) + tl.load(w_ptr + (b * K + l) * K + k)
                acc += wkl * delta[l]
            tl.store(geh_ptr + (b * K + k) * d + cols,
                     (0.5 * go * acc).to(geh_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        part = b * tl.num_programs(1) + blk
        for k in tl.static_range(K):
            for l in tl.static_range(K):
                tl.store(gw_ptr + (part * K + k) * K + l,
                         0.5 * go * tl.sum(delta[k] * delta[l], axis=0))


def _launch_fwd(eh, noise, w, seed, offset):
    B, K, d = eh.shape
    block = block_size(d, eh.device)
    part = torch.zeros((B, triton.cdiv(d, block)), dtype=w.dtype, device=eh.device)
    if eh.numel():
        with launch_on(eh.device):
            _dsm_fwd[part.shape](eh, noise, w, part, seed, offset, d, *strides3(eh),
                                 *strides3(noise), K=K, FROM_SEED=noise is None, BLOCK_D=block,
                                 num_warps=num_warps(K, eh.dtype == torch.float64))
    return part.sum(1)


def _launch_bwd(eh, noise, w, go, seed, offset, need_eh, need_w):
    B, K, d = eh.shape
    block = block_size(d, eh.device)
    nblk = triton.cdiv(d, block)
    geh = torch.empty((B, K, d), dtype=eh.dtype, device=eh.device) if need_eh else None
    gw = torch.zeros((B, nblk, K, K), dtype=w.dtype, device=eh.device) if need_w else None
    if eh.numel():
        with launch_on(eh.device):
            _dsm_bwd[(B, nblk)](eh, noise, w, go, geh, gw, seed, offset, d, *strides3(eh),
                                *strides3(noise), K=K, FROM_SEED=noise is None,
                                NEED_EPS_HAT=need_eh, NEED_W=need_w, BLOCK_D=block,
                                num_warps=num_warps(K, eh.dtype == torch.float64))
    return geh, None if gw is None else gw.sum(1)


class _DsmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eh, noise, w, seed, offset):
        w_acc = w.detach().to(acc_dtype(eh.dtype)).contiguous()
        ctx.save_for_backward(eh, noise, w_acc)
        ctx.meta = (seed, offset, w.dtype)
        return _launch_fwd(eh, noise, w_acc, seed, offset)

    @staticmethod
    def backward(ctx, go):
        eh, noise, w = ctx.saved_tensors
        seed, offset, w_dtype = ctx.meta
        need_eh, need_noise, need_w = ctx.needs_input_grad[:3]
        geh, gw = _launch_bwd(eh, noise, w, go.to(w.dtype).contiguous(), seed, offset,
                              need_eh or need_noise, need_w)
        gnoise = -geh.to(noise.dtype) if need_noise else None
        return (geh if need_eh else None, gnoise, None if gw is None else gw.to(w_dtype),
                None, None)


def weighted_dsm(eps_hat: Tensor, eps: Tensor | NoiseSeed, weight: Tensor) -> Tensor:
    """½ Σ_j (ε̂ − ε)[:, j]ᵀ W (ε̂ − ε)[:, j] per sample, (B,), in one pass over ε̂.

    eps_hat (B, K, *shape); eps the noise as a tensor of that shape, or the
    :class:`NoiseSeed` it was drawn from by :func:`~fastmdm.kernels.perturbation.perturb`
    (then regenerated, never read); weight (B, K, K). Differentiable in eps_hat, eps and W.
    Validation of shapes, dtypes and devices is :func:`fastmdm.dsm.weighted_dsm`'s.
    """
    B, K = eps_hat.shape[:2]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"the Triton DSM kernel supports 1 <= K <= {MAX_K}, got K={K}")
    eh = eps_hat.reshape(B, K, -1)
    if isinstance(eps, NoiseSeed):
        noise, seed, offset = None, int(eps.seed), int(eps.offset)
    else:
        noise, seed, offset = eps.reshape(B, K, -1), 0, 0
    tensors = (eh, weight) if noise is None else (eh, weight, noise)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _DsmFn.apply(eh, noise, weight, seed, offset)
    return _launch_fwd(eh, noise, weight.detach().to(acc_dtype(eh.dtype)).contiguous(), seed,
                       offset)
