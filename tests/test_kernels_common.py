"""The noise layout documented once in kernels/common.py, regenerated from its formulas with
bare Philox draws and compared bit for bit with what each kernel draws."""

import math

import torch
from triton_support import require_triton_kernels

DEVICE = require_triton_kernels()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastmdm.kernels import NoiseSeed, generate_probes, perturb, sde_step  # noqa: E402

N = 64  # counters per draw (a power of two)


@triton.jit
def _philox_at(out_ptr, counter_ptr, seed, GROUPED: tl.constexpr, GAUSSIAN: tl.constexpr,
               N: tl.constexpr):
    """out[i, m] = output m of randn4x(seed, counter[i]) (grouped); else out[i] =
    randn(seed, counter[i]) or the sign of the top bit of randint(seed, counter[i])."""
    counters = tl.load(counter_ptr + tl.arange(0, N))
    if GROUPED:
        n0, n1, n2, n3 = tl.randn4x(seed, counters)
        row = out_ptr + tl.arange(0, N) * 4
        tl.store(row, n0)
        tl.store(row + 1, n1)
        tl.store(row + 2, n2)
        tl.store(row + 3, n3)
    elif GAUSSIAN:
        tl.store(out_ptr + tl.arange(0, N), tl.randn(seed, counters))
    else:
        bits = tl.randint(seed, counters)
        tl.store(out_ptr + tl.arange(0, N), tl.where((bits >> 31) == 0, 1.0, -1.0))


def philox_at(counters, seed, grouped=False, gaussian=True):
    n = counters.numel()
    assert n <= N
    padded = torch.cat([counters.flatten(), counters.new_zeros(N - n)]).to(DEVICE)
    out = torch.empty((N, 4) if grouped else (N,), dtype=torch.float32, device=DEVICE)
    _philox_at[(1,)](out, padded, seed, GROUPED=grouped, GAUSSIAN=gaussian, N=N)
    return out[:n]


def test_grouped_layout_of_the_perturbation_noise():
    """ε[b, k, j] = output j mod 4 of randn4x(seed, offset + (b K + k)⌈d/4⌉ + ⌊j/4⌋)."""
    B, K, d, seed, offset = 2, 3, 10, 99, 1000
    x0, coef = torch.zeros(B, d, device=DEVICE), torch.zeros(B, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE).expand(B, K, K)
    eps = perturb(x0, coef, eye, seed=NoiseSeed(seed, offset), return_noise=True)[1]
    b, k, j = torch.meshgrid(torch.arange(B), torch.arange(K), torch.arange(0, d, 4), indexing="ij")
    counters = offset + (b * K + k) * math.ceil(d / 4) + j // 4  # (B, K, ⌈d/4⌉)
    want = philox_at(counters, seed, grouped=True).reshape(B, K, -1)[..., :d]
    assert torch.equal(eps, want)


def test_flat_layout_of_the_sampler_noise():
    """ξ[b, k, j] = randn(seeds[index], (b K + k) d + j): the step with Φ = 0, C = I returns ξ."""
    B, K, d = 2, 3, 7
    coefs = torch.zeros(3, K, K, dtype=torch.float64)
    coefs[1] = torch.eye(K, dtype=torch.float64)
    seeds = torch.tensor([5, 17], device=DEVICE)
    xi = sde_step(torch.zeros(B, K, d, device=DEVICE), [], coefs, seeds, 1)
    want = philox_at(torch.arange(B * K * d), 17).view(B, K, d)
    assert torch.equal(xi, want)


def test_flat_layout_of_the_probes():
    """Probe entry i of a (P, B, K, d) set is randn(seed, offset + i), or ±1 from randint's top bit."""
    shape, seed, offset = (2, 3, 2, 5), 1234, 77
    n = math.prod(shape)
    for gaussian in (True, False):
        distribution = "gaussian" if gaussian else "rademacher"
        got = generate_probes(shape, seed, distribution, torch.float32, DEVICE, offset=offset)
        want = philox_at(torch.arange(offset, offset + n), seed, gaussian=gaussian).view(shape)
        assert torch.equal(got, want)
