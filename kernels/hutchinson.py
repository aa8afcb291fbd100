"""Hutchinson probes from a seed and the fused per-sample probe reduction (docs/math.md §5).

A probe set is P tensors v_p of shape (B, K_v, d), laid out as one contiguous (P, B, K_v, d)
tensor in the flat noise layout of :mod:`fastmdm.kernels.common` (Gaussian or Rademacher,
cast to the probe dtype), so it does not depend on the launch grid and can be regenerated.

* :func:`generate_probes` writes the probes (for the network's JVP/VJP call);
* :func:`probe_quadratic_forms` computes, for every probe p and sample b,

      q[p, b] = Σ_{k < K_v, l < K_w, j < d} v_p[b, k, j] N[b, k, l] w_p[b, l, j]

  regenerating v_p in registers instead of reading it: the only pass over memory is the
  read of w (the network's JVP/VJP output). N is a per-sample K_v × K_w matrix (float64);
  products and sums are float64. Each program reduces one (p, b) and a block of j into a
  partial sum; the partial sums are added on the torch side (deterministic, no atomics).

Gradients (:class:`_QuadraticFormsFn`): ∂q/∂w = Nᵀ v and ∂q/∂N = Σ_j v wᵀ, computed with
torch on probes regenerated from the seed, so nothing but the seed is saved for backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import DISTRIBUTIONS, MAX_K, SEED_BOUND, block_size, check_seed, launch_on, num_warps
from .philox import flat_values


@triton.jit
def _probes_kernel(out_ptr, seed, offset, n, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    value = flat_values(seed, offset + index, GAUSSIAN)
    tl.store(out_ptr + index, value.to(out_ptr.dtype.element_ty), mask=index < n)


@triton.jit
def _quadratic_forms_kernel(
    w_ptr, mix_ptr, partial_ptr, seed, offset, B, d, n_chunks,
    KV: tl.constexpr, KW: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pb = tl.program_id(0).to(tl.int64)  # p * B + b
    chunk = tl.program_id(1).to(tl.int64)
    b = pb % B
    j = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = j < d
    v_base = offset + pb * KV * d
    w_base = pb * KW * d
    v = ()
    for k in tl.static_range(KV):
        probe = flat_values(seed, v_base + k * d + j, GAUSSIAN)
        v = v + (probe.to(w_ptr.dtype.element_ty).to(tl.float64),)  # the probe dtype's exact value
    acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for l in tl.static_range(KW):
        w_l = tl.load(w_ptr + w_base + l * d + j, mask=mask, other=0.0).to(tl.float64)
        mixed = v[0] * tl.load(mix_ptr + b * (KV * KW) + l)
        for k in tl.static_range(1, KV):
            mixed += v[k] * tl.load(mix_ptr + b * (KV * KW) + k * KW + l)
        acc += mixed * w_l
    tl.store(partial_ptr + pb * n_chunks + chunk, tl.sum(acc, axis=0))


def _check_distribution(distribution: str) -> bool:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution == "gaussian"


def generate_probes(shape, seed: int, distribution: str = "rademacher",
                    dtype: torch.dtype = torch.float32, device="cuda", offset: int = 0) -> Tensor:
    """Probes of ``seed``: a contiguous tensor of ``shape`` whose flat entry i is probe(seed, offset + i).

    ``offset`` lets a probe set be produced in pieces: probes p₀… of a (P, B, K, d) set start at
    offset p₀·B·K·d.
    """
    gaussian = _check_distribution(distribution)
    seed, offset = check_seed(seed, offset, SEED_BOUND)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    n = out.numel()
    if n:
        block = block_size(n, out.device)
        with launch_on(out.device):
            _probes_kernel[(triton.cdiv(n, block),)](out, seed, offset, n, GAUSSIAN=gaussian,
                                                      BLOCK=block)
    return out


def _check_reduction(w: Tensor, mixing: Tensor) -> None:
    if not isinstance(w, Tensor) or w.dim() != 4:
        raise ValueError(f"w must be a tensor of shape (P, B, K_w, d), got {getattr(w, 'shape', w)}")
    P, B, KW, d = w.shape
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if not isinstance(mixing, Tensor) or mixing.dim() != 3 or mixing.shape[0] != B or mixing.shape[2] != KW:
        raise ValueError(f"mixing must have shape (B, K_v, K_w) = ({B}, K_v, {KW}), "
                         f"got {getattr(mixing, 'shape', mixing)}")
    if mixing.dtype != torch.float64:
        raise TypeError(f"mixing must be float64, got {mixing.dtype}")
    if mixing.device != w.device:
        raise ValueError(f"mixing is on {mixing.device}, w on {w.device}")
    if not (1 <= mixing.shape[1] <= MAX_K and 1 <= KW <= MAX_K):
        raise ValueError(f"the fused probe reduction supports 1 <= K_v, K_w <= {MAX_K}, "
                         f"got K_v={mixing.shape[1]}, K_w={KW}")


def _launch(w: Tensor, mixing: Tensor, seed: int, gaussian: bool, offset: int) -> Tensor:
    P, B, KW, d = w.shape
    kv = mixing.shape[1]
    w, mixing = w.detach().contiguous(), mixing.detach().contiguous()
    block = block_size(d, w.device)
    n_chunks = triton.cdiv(d, block) if d else 0
    partial = torch.empty((P * B, n_chunks), dtype=torch.float64, device=w.device)
    if P * B and n_chunks:
        with launch_on(w.device):
            _quadratic_forms_kernel[(P * B, n_chunks)](
                w, mixing, partial, seed, offset, B, d, n_chunks,
                KV=kv, KW=KW, GAUSSIAN=gaussian, BLOCK_D=block,
                num_warps=num_warps(kv, fp64=True),  # the probes are held in float64
            )
    return partial.sum(1).view(P, B)


class _QuadraticFormsFn(torch.autograd.Function):
    """Forward: the fused kernel. Backward: torch on probes regenerated from the seed."""

    @staticmethod
    def forward(ctx, w, mixing, seed, gaussian, offset):
        ctx.save_for_backward(w, mixing)
        ctx.seed, ctx.gaussian, ctx.offset = seed, gaussian, offset
        return _launch(w, mixing, seed, gaussian, offset)

    @staticmethod
    def backward(ctx, grad):
        w, mixing = ctx.saved_tensors
        P, B, _, d = w.shape
        distribution = DISTRIBUTIONS[int(ctx.gaussian)]
        v = generate_probes((P, B, mixing.shape[1], d), ctx.seed, distribution, w.dtype, w.device,
                            ctx.offset)
        grad_w = grad_mixing = None
        if ctx.needs_input_grad[0]:
            mixed = torch.einsum("bkl,pbkj->pblj", mixing.to(w.dtype), v)
            grad_w = mixed * grad.to(w.dtype)[:, :, None, None]
        if ctx.needs_input_grad[1]:
            weighted = v.to(torch.float64) * grad[:, :, None, None]
            grad_mixing = torch.einsum("pbkj,pblj->bkl", weighted, w.to(torch.float64))
        return grad_w, grad_mixing, None, None, None


def probe_quadratic_forms(w: Tensor, mixing: Tensor, seed: int, distribution: str = "rademacher",
                          offset: int = 0) -> Tensor:
    """q[p, b] = Σ_{k,l,j} v_p[b, k, j] N[b, k, l] w_p[b, l, j], float64 (P, B).

    w: (P, B, K_w, d) in any float dtype; mixing N: float64 (B, K_v, K_w), K_v, K_w ≤ 8; the
    probes v = generate_probes((P, B, K_v, d), seed, distribution, w.dtype, offset=offset) are
    regenerated in-kernel, never read. Differentiable in w and N.
    """
    gaussian = _check_distribution(distribution)
    seed, offset = check_seed(seed, offset, SEED_BOUND)
    _check_reduction(w, mixing)
    if torch.is_grad_enabled() and (w.requires_grad or mixing.requires_grad):
        return _QuadraticFormsFn.apply(w, mixing, seed, gaussian, offset)
    return _launch(w, mixing, seed, gaussian, offset)
