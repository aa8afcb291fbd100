"""The perturbation u_t = M_t m₀ + L_t ε (docs/math.md §2) in one pass over the data.

ε is drawn in-kernel in the grouped noise layout of :mod:`fastmdm.kernels.common`, so it can
be regenerated instead of stored — by the backward here and by the fused DSM loss
(:mod:`fastmdm.kernels.dsm_loss`). A given ε (a tensor) is read instead when supplied.

Per program: one sample b and a block of data columns j. Hybrid start (m₀ = (x₀, 0, …)):
u[k] = a_k x₀ + Σ_{l≤k} L_kl ε_l with a = M[:, 0]; full start:
u[k] = Σ_l M_kl u₀[l] + Σ_{l≤k} L_kl ε_l.
Arithmetic in float32 (float64 for float64 data); any strides are accepted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    DATA_DTYPES,
    MAX_K,
    NoiseSeed,
    acc_dtype,
    block_size,
    check_seed,
    launch_on,
    num_warps,
    strides3,
)
from .philox import grouped_normals


@triton.jit
def noise_block(noise_ptr, where, seed, offset, row, d, blk, mask, FROM_SEED: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """ε of data row ``row`` = b K + k, columns blk·BLOCK_D + [0, BLOCK_D): the grouped-layout
    normals (float32) if FROM_SEED, else loaded at ``noise_ptr + where``."""
    if FROM_SEED:
        return grouped_normals(seed, offset, row, d, blk, BLOCK_D)
    else:
        return tl.load(noise_ptr + where, mask=mask, other=0.0)


@triton.jit
def _perturb_fwd(
    x_ptr, coef_ptr, chol_ptr, noise_ptr, out_ptr, eps_out_ptr, seed, offset, d,
    sxb, sxk, sxj, snb, snk, snj,
    K: tl.constexpr, FULL: tl.constexpr, FROM_SEED: tl.constexpr, WRITE_NOISE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    acc_t = coef_ptr.dtype.element_ty
    eps = ()
    for k in tl.static_range(K):
        e = noise_block(noise_ptr, b * snb + k * snk + cols * snj, seed, offset, b * K + k, d, blk,
                        mask, FROM_SEED, BLOCK_D).to(acc_t)
        eps = eps + (e,)
        if WRITE_NOISE:
            tl.store(eps_out_ptr + (b * K + k) * d + cols, e.to(eps_out_ptr.dtype.element_ty),
                     mask=mask)
    xs = ()
    for k in tl.static_range(K if FULL else 1):
        xs = xs + (tl.load(x_ptr + b * sxb + k * sxk + cols * sxj, mask=mask).to(acc_t),)
    for k in tl.static_range(K):
        if FULL:
            acc = tl.load(coef_ptr + (b * K + k) * K) * xs[0]
            for l in tl.static_range(1, K):
                acc += tl.load(coef_ptr + (b * K + k) * K + l) * xs[l]
        else:
            acc = tl.load(coef_ptr + b * K + k) * xs[0]
        for l in tl.static_range(k + 1):
            acc += tl.load(chol_ptr + (b * K + k) * K + l) * eps[l]
        tl.store(out_ptr + (b * K + k) * d + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _perturb_bwd(
    g_ptr, x_ptr, coef_ptr, noise_ptr, gx_ptr, gcoef_ptr, gchol_ptr, seed, offset, d,
    sgb, sgk, sgj, sxb, sxk, sxj, snb, snk, snj,
    K: tl.constexpr, FULL: tl.constexpr, FROM_SEED: tl.constexpr, NEED_X: tl.constexpr,
    NEED_COEF: tl.constexpr, NEED_CHOL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gx = aᵀg (hybrid) or Mᵀg (full); per-block partial sums of g x₀ᵀ (or g u₀ᵀ) and g εᵀ."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    acc_t = coef_ptr.dtype.element_ty
    part = b * tl.num_programs(1) + blk
    gs = ()
    for k in tl.static_range(K):
        gs = gs + (tl.load(g_ptr + b * sgb + k * sgk + cols * sgj, mask=mask, other=0.0).to(acc_t),)
    if NEED_X:
        for l in tl.static_range(K if FULL else 1):
            if FULL:
                acc = tl.load(coef_ptr + b * K * K + l) * gs[0]
                for k in tl.static_range(1, K):
                    acc += tl.load(coef_ptr + (b * K + k) * K + l) * gs[k]
            else:
                acc = tl.load(coef_ptr + b * K) * gs[0]
                for k in tl.static_range(1, K):
                    acc += tl.load(coef_ptr + b * K + k) * gs[k]
            tl.store(gx_ptr + (b * (K if FULL else 1) + l) * d + cols,
                     acc.to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_COEF:
        for l in tl.static_range(K if FULL else 1):
            x = tl.load(x_ptr + b * sxb + l * sxk + cols * sxj, mask=mask, other=0.0).to(acc_t)
            for k in tl.static_range(K):
                if FULL:
                    tl.store(gcoef_ptr + (part * K + k) * K + l, tl.sum(gs[k] * x, axis=0))
                else:
                    tl.store(gcoef_ptr + part * K + k, tl.sum(gs[k] * x, axis=0))
    if NEED_CHOL:
        for l in tl.static_range(K):
            e = noise_block(noise_ptr, b * snb + l * snk + cols * snj, seed, offset, b * K + l, d,
                            blk, mask, FROM_SEED, BLOCK_D).to(acc_t)
            for k in tl.static_range(K):
                tl.store(gchol_ptr + (part * K + k) * K + l, tl.sum(gs[k] * e, axis=0))


def _strides_x(x: Tensor, full: bool) -> tuple[int, int, int]:
    return strides3(x) if full else (x.stride(0), 0, x.stride(1))


def _launch_fwd(x, coef, chol, noise, seed, offset, full, write_noise):
    B, K = chol.shape[0], chol.shape[-1]
    d = x.shape[-1]
    out = torch.empty((B, K, d), dtype=x.dtype, device=x.device)
    eps = torch.empty_like(out) if write_noise else None
    if out.numel():
        block = block_size(d, x.device)
        with launch_on(x.device):
            _perturb_fwd[(B, triton.cdiv(d, block))](
                x, coef, chol, noise, out, eps, seed, offset, d, *_strides_x(x, full),
                *strides3(noise), K=K, FULL=full, FROM_SEED=noise is None,
                WRITE_NOISE=write_noise, BLOCK_D=block, num_warps=num_warps(K, x.dtype == torch.float64),
            )
    return out, eps


def _launch_bwd(g, x, coef, noise, seed, offset, full, needs):
    B, K, d = g.shape
    acc = coef.dtype
    block = block_size(d, g.device)
    nblk = triton.cdiv(d, block)
    need_x, need_coef, need_chol = needs
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    gcoef = (torch.empty((B, nblk, *coef.shape[1:]), dtype=acc, device=g.device)
             if need_coef else None)
    gchol = torch.empty((B, nblk, K, K), dtype=acc, device=g.device) if need_chol else None
    if g.numel():
        with launch_on(g.device):
            _perturb_bwd[(B, nblk)](
                g, x, coef, noise, gx, gcoef, gchol, seed, offset, d, *strides3(g),
                *_strides_x(x, full), *strides3(noise), K=K, FULL=full, FROM_SEED=noise is None,
                NEED_X=need_x, NEED_COEF=need_coef, NEED_CHOL=need_chol, BLOCK_D=block,
                num_warps=num_warps(K, g.dtype == torch.float64),
            )
    return (gx, *(None if p is None else p.sum(1, dtype=torch.float64) for p in (gcoef, gchol)))


class _PerturbFn(torch.autograd.Function):
    """u = M m₀ + L ε; backward: one pass over the upstream gradient, ε regenerated."""

    @staticmethod
    def forward(ctx, x, coef, chol, noise, seed, offset, full, write_noise):
        acc = acc_dtype(x.dtype)
        coef_a, chol_a = coef.detach().to(acc).contiguous(), chol.detach().to(acc).contiguous()
        out, eps = _launch_fwd(x, coef_a, chol_a, noise, seed, offset, full, write_noise)
        ctx.save_for_backward(x, coef_a, chol_a, noise)
        ctx.meta = (seed, offset, full, coef.dtype, chol.dtype)
        if eps is None:
            return out
        ctx.mark_non_differentiable(eps)
        return out, eps

    @staticmethod
    def backward(ctx, g, *_):
        x, coef, chol, noise = ctx.saved_tensors
        seed, offset, full, coef_dtype, chol_dtype = ctx.meta
        need_x, need_coef, need_chol, need_noise = ctx.needs_input_grad[:4]
        gx, gcoef, gchol = _launch_bwd(g, x, coef, noise, seed, offset, full,
                                       (need_x, need_coef, need_chol))
        gnoise = (chol.transpose(-1, -2).to(g.dtype) @ g).to(noise.dtype) if need_noise else None
        return (gx, None if gcoef is None else gcoef.to(coef_dtype),
                None if gchol is None else gchol.to(chol_dtype), gnoise, None, None, None, None)


def _check(x0: Tensor, coef: Tensor, chol: Tensor, start: str) -> tuple[Tensor, bool]:
    """Validate; return x0 viewed as (B, d) (hybrid) or (B, K, d) (full) and ``full``."""
    if start not in ("hybrid", "full"):
        raise ValueError(f"start must be 'hybrid' or 'full', got {start!r}")
    full = start == "full"
    for name, t in (("x0", x0), ("coef", coef), ("chol", chol)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x0.device:
            raise ValueError(f"{name} is on {t.device} but x0 is on {x0.device}")
    if x0.dtype not in DATA_DTYPES:
        raise TypeError(f"x0 must have dtype in {DATA_DTYPES}, got {x0.dtype}")
    if chol.dim() != 3 or chol.shape[1] != chol.shape[2] or not 1 <= chol.shape[1] <= MAX_K:
        raise ValueError(f"chol must be (B, K, K) with 1 <= K <= {MAX_K}, got {tuple(chol.shape)}")
    B, K = chol.shape[:2]
    want = (B, K, K) if full else (B, K)
    if tuple(coef.shape) != want:
        raise ValueError(f"coef must have shape {want} for start={start!r} (M_t, or its first "
                         f"column for 'hybrid'), got {tuple(coef.shape)}")
    if full and (x0.dim() < 3 or tuple(x0.shape[:2]) != (B, K)):
        raise ValueError(f"x0 for start='full' must be a state ({B}, {K}, *data_shape), "
                         f"got {tuple(x0.shape)}")
    if not full and (x0.dim() < 2 or x0.shape[0] != B):
        raise ValueError(f"x0 must have shape ({B}, *data_shape), got {tuple(x0.shape)}")
    return x0.reshape(*x0.shape[: 2 if full else 1], -1), full


def perturb(x0: Tensor, coef: Tensor, chol: Tensor, start: str = "hybrid", *,
            noise: Tensor | None = None, seed: NoiseSeed | None = None, return_noise: bool = False):
    """u_t = M_t m₀ + L_t ε in one pass; ε is ``noise`` (B, K, *shape) if given, else the
    grouped-layout normals of ``seed`` drawn in-kernel (stored only if ``return_noise``).

    Hybrid: x0 (B, *shape), coef = M_t[:, :, 0] (B, K); full: x0 = u₀ (B, K, *shape), coef =
    M_t (B, K, K). chol = L_t (B, K, K). Returns u_t (B, K, *shape) in x0's dtype, and ε too if
    ``return_noise``. Differentiable in x0, coef, chol and a given noise.
    """
    x, full = _check(x0, coef, chol, start)
    K = chol.shape[1]
    out_shape = (x0.shape[0], K, *x0.shape[(2 if full else 1):])
    if (noise is None) == (seed is None):
        raise ValueError("pass exactly one of noise (a tensor) and seed (a NoiseSeed)")
    if noise is not None:
        if tuple(noise.shape) != out_shape or noise.device != x0.device:
            raise ValueError(f"noise must have shape {out_shape} on {x0.device}, "
                             f"got {tuple(noise.shape)} on {noise.device}")
        noise, seed, return_noise = noise.reshape(out_shape[0], K, -1), NoiseSeed(0), False
    elif not isinstance(seed, NoiseSeed):
        raise TypeError(f"seed must be a NoiseSeed, got {type(seed).__name__}")
    args = (x, coef, chol, noise, *check_seed(seed.seed, seed.offset), full, return_noise)
    tensors = (x, coef, chol) if noise is None else (x, coef, chol, noise)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        res = _PerturbFn.apply(*args)
        out, eps = res if return_noise else (res, None)
    else:
        acc = acc_dtype(x.dtype)
        out, eps = _launch_fwd(x, coef.detach().to(acc).contiguous(),
                               chol.detach().to(acc).contiguous(), *args[3:])
    out = out.view(out_shape)
    return (out, eps.view(out_shape)) if return_noise else out
