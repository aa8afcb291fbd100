"""Adapters for single-variable VP models trained elsewhere (fastmdm.adapters)."""

import pytest
import torch

import fastmdm as fm
from fastmdm import adapters
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.sampling import sample

F64 = torch.float64
MIX = GaussianMixture([0.4, 0.6], [[1.0, 0.0], [-0.5, 0.8]], [0.2, 0.4])


pytestmark = pytest.mark.usefixtures("float64_default")


def test_score_sde_adapter_matches_native_model():
    """eps_model(x, t) on the data alone, wrapped, samples exactly like the state model it came from."""
    diff = fm.vpsde(beta_max=20.0)
    native = exact_score_model(MIX, diff, "eps")
    seen = []

    def eps_model(x, t):  # score_sde convention: x (B, *shape), continuous t (B,)
        seen.append((x.shape, t.shape))
        return native(x.unsqueeze(1), t)[:, 0]

    wrapped = adapters.from_score_sde(eps_model)
    a = sample(native, diff, (6, 2), steps=8, generator=torch.Generator().manual_seed(0))
    b = sample(wrapped, diff, (6, 2), steps=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert seen[0] == (torch.Size([6, 2]), torch.Size([6]))
    scaled = adapters.from_score_sde(lambda x, t: eps_model(x, t / 999), time_scale=999)
    c = sample(scaled, diff, (6, 2), steps=8, generator=torch.Generator().manual_seed(0))
    assert (c - a).abs().max() < 1e-12


def test_k_diffusion_adapter_matches_x0_model():
    """denoiser(x, σ) with x = x_t/α_t, σ = sqrt(e^τ − 1) is E[x₀ | x_t]: same samples as the x0 model."""
    diff = fm.vpsde()
    x0_model = exact_score_model(MIX, diff, "x0")

    def denoiser(x, sigma):  # k-diffusion convention: x = x₀ + σ n
        alpha = (1 + sigma**2).rsqrt()
        tau = torch.log1p(sigma.to(F64) ** 2)
        t = diff.tau_inverse(tau)
        return x0_model((x * alpha.view(-1, 1)).unsqueeze(1), t)[:, 0]  # state-shaped x̂₀ -> data

    a = sample(x0_model, diff, (6, 2), steps=8, prediction="x0", generator=torch.Generator().manual_seed(1))
    b = sample(adapters.from_k_diffusion(denoiser), diff, (6, 2), steps=8,
               generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().max() < 1e-10


def test_adapter_errors():
    with pytest.raises(TypeError, match="eps_model"):
        adapters.from_score_sde(3)
    with pytest.raises(TypeError, match="denoiser"):
        adapters.from_k_diffusion("x")
    with pytest.raises(ValueError, match="K = 1"):
        sample(adapters.from_score_sde(lambda x, t: x), fm.cld(), (2, 3), steps=2)
    with pytest.raises(ValueError, match="K = 1"):
        adapters.from_k_diffusion(lambda x, s: x, diffusion=fm.cld())
    with pytest.raises(ValueError, match="diffusion"):
        adapters.from_k_diffusion(lambda x, s: x)(torch.zeros(2, 1, 3), torch.full((2,), 0.5))
