"""The fused sampler step kernel (kernels/sde_step.py) against the torch path, under TRITON_INTERPRET=1."""

import math

import pytest
import torch

from fastmdm.backend import interpreter_enabled, set_backend, triton_available
from fastmdm.sde_step import sde_step

pytestmark = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="needs triton with TRITON_INTERPRET=1 on CPU")

F64 = torch.float64


def sde_step_torch(u, inputs, coefs, noisy=True):
    """The torch path of :func:`fastmdm.sde_step.sde_step` (the backend is reset after each test)."""
    set_backend("torch")
    return sde_step(u, inputs, coefs, torch.zeros(1, dtype=torch.int64), 0, noisy)


def coefs_for(K, inputs, gen, noisy=True):
    c = torch.randn(3 + inputs, K, K, dtype=F64, generator=gen)
    if not noisy:
        c[1] = 0
    return c


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("inputs", [0, 1, 3])
def test_noise_free_step_matches_torch(dtype, tol, K, inputs):
    from fastmdm.kernels.sampler_step import sde_step as sde_step_triton

    gen = torch.Generator().manual_seed(K * 10 + inputs)
    u = torch.randn(3, K, 5, 7, generator=gen).to(dtype)
    ys = [torch.randn(3, K, 5, 7, generator=gen).to(dtype) for _ in range(inputs)]
    coefs = coefs_for(K, inputs, gen, noisy=False)
    seeds = torch.tensor([11, 12])
    got = sde_step_triton(u, ys, coefs, seeds, 1, noisy=False)
    want = sde_step_torch(u.double(), [y.double() for y in ys], coefs, noisy=False)
    assert got.dtype == dtype and got.shape == u.shape
    assert ((got.double() - want).abs().max() / want.abs().max()) < tol


def test_noise_is_standard_normal_and_keyed_by_seed():
    """Φ = 0, Λ = 0, C = I returns ξ: mean 0, variance 1 (5-SE bounds), the same for the same seed."""
    from fastmdm.kernels.sampler_step import sde_step as sde_step_triton

    K, n = 2, 4096
    u = torch.zeros(4, K, n, dtype=F64)
    coefs = torch.zeros(3, K, K, dtype=F64)
    coefs[1] = torch.eye(K, dtype=F64)
    seeds = torch.tensor([5, 6])
    xi = sde_step_triton(u, [], coefs, seeds, 0)
    m = xi.numel()
    assert abs(xi.mean()) < 5 / math.sqrt(m) and abs(xi.var() - 1) < 5 * math.sqrt(2 / m)
    assert torch.equal(xi, sde_step_triton(u, [], coefs, seeds, 0))
    other = sde_step_triton(u, [], coefs, seeds, 1)
    assert abs(torch.corrcoef(torch.stack([xi.flatten(), other.flatten()]))[0, 1]) < 5 / math.sqrt(m)
    # keyed by the element index: a sub-batch sees the same noise as the full batch
    assert torch.equal(sde_step_triton(u[:1], [], coefs, seeds, 0), xi[:1])


def test_noisy_step_equals_torch_with_the_kernel_noise():
    """Full step = torch path with the ξ the kernel draws (recovered with Φ = Λ = Γ = 0, C = I)."""
    from fastmdm.kernels.sampler_step import sde_step as sde_step_triton

    gen = torch.Generator().manual_seed(3)
    K = 3
    u = torch.randn(2, K, 33, dtype=F64, generator=gen)
    y = torch.randn(2, K, 33, dtype=F64, generator=gen)
    coefs = coefs_for(K, 1, gen)
    seeds = torch.tensor([123])
    got = sde_step_triton(u, [y], coefs, seeds, 0)
    probe = torch.zeros(4, K, K, dtype=F64)
    probe[1] = torch.eye(K, dtype=F64)
    xi = sde_step_triton(torch.zeros_like(u), [torch.zeros_like(y)], probe, seeds, 0)
    want = sde_step_torch(u, [y], coefs, noisy=False) + torch.einsum("kl,bl...->bk...", coefs[1], xi)
    assert (got - want).abs().max() < 1e-12


def test_sampler_triton_backend_matches_torch():
    """A deterministic solver (EI order 2) gives the same samples on both backends."""
    import fastmdm as fm
    from fastmdm.backend import get_backend, set_backend
    from fastmdm.sampling import sample

    diff = fm.cld()

    def model(u, t):
        return 0.3 * u + t.view(-1, 1, 1)

    before = get_backend()
    try:
        set_backend("torch")
        a = sample(model, diff, (3, 6), steps=4, generator=torch.Generator().manual_seed(0))
        set_backend("triton")
        b = sample(model, diff, (3, 6), steps=4, generator=torch.Generator().manual_seed(0))
        c = sample(model, diff, (3, 6), steps=4, solver="ancestral", generator=torch.Generator().manual_seed(0))
        d = sample(model, diff, (3, 6), steps=4, solver="ancestral", generator=torch.Generator().manual_seed(0))
    finally:
        set_backend(before)
    assert (a - b).abs().max() < 1e-5 * a.abs().max()
    assert torch.equal(c, d) and torch.isfinite(c).all()
