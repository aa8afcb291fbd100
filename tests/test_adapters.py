"""Adapters for models trained elsewhere (fastmdm.adapters): score_sde, k-diffusion (CLD-SGM: test_cld_sgm.py)."""

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


def _vp_mixture_eps(x, alpha_bar):
    """Exact ε̂ = −σ ∇log p of MIX under x = sqrt(ᾱ) x₀ + sqrt(1 − ᾱ) ε, x (B, 1, 2, 1) image-like."""
    flat = x.reshape(x.shape[0], -1).to(F64)
    a, var = alpha_bar.sqrt()[:, None], (1 - alpha_bar)[:, None]
    comp_var = a**2 * MIX.stds**2 + var  # (B, C)
    resid = flat[:, None, :] - a[:, :, None] * MIX.means  # (B, C, d)
    logw = MIX.weights.log() - 0.5 * (resid**2).sum(-1) / comp_var - comp_var.log()  # d = 2
    score = -(torch.softmax(logw, 1)[:, :, None] * resid / comp_var[:, :, None]).sum(1)
    return (-var.sqrt() * score).reshape(x.shape).to(x.dtype)


def test_score_sde_continuous_model_with_its_conventions():
    """score_sde's continuous VP: model(x, labels = 999 t), t ∈ [eps, 1], 4-D data, noise output
    (its score is −output / std): wrapped with time_scale=999 it samples like the native exact model."""
    diff = fm.vpsde(beta_max=20.0)  # score_sde's VPSDE(beta_min=0.1, beta_max=20)
    labels_seen = []

    def model(x, labels):
        assert x.dim() == 4 and labels.shape == (x.shape[0],)
        labels_seen.append(labels)
        t = labels.to(F64) / 999
        return _vp_mixture_eps(x, torch.exp(-diff.tau(t)))

    wrapped = adapters.from_score_sde(model, time_scale=999)
    native = exact_score_model(GaussianMixture(MIX.weights, MIX.means[:, :, None, None].transpose(1, 2),
                                               MIX.stds), diff, "eps")
    x_T = diff.prior_sample((6, 1, 2, 1), torch.Generator().manual_seed(0))
    a = sample(wrapped, diff, x_T=x_T, steps=10)
    b = sample(native, diff, x_T=x_T, steps=10)
    assert a.shape == (6, 1, 2, 1)
    assert (a - b).abs().max() < 1e-9
    every = torch.cat(labels_seen)
    assert every.min() >= 999 * diff.t_min * (1 - 1e-9) and every.max() <= 999 * (1 + 1e-9)


def test_score_sde_discrete_ddpm_model_with_labels():
    """score_sde's discrete DDPM: N = 1000 betas linspace(0.1/N, 20/N), the network called with the
    label t·999 (it sees ᾱ at that label). Through fm.vpsde(beta_max=20) the continuous schedule
    replaces the discrete one, which differs by about one label: samples within 0.02 of the
    continuous model's, from the same start."""
    N = 1000
    betas = torch.linspace(0.1 / N, 20 / N, N, dtype=F64)
    log_alpha_bar = torch.cumsum(torch.log1p(-betas), 0)
    diff = fm.vpsde(beta_max=20.0)

    def ddpm_model(x, labels):  # a DDPM ε-network: ᾱ at the (real-valued) label, interpolated
        lo = labels.to(F64).floor().clamp(0, N - 2)
        frac = labels.to(F64) - lo
        log_ab = torch.lerp(log_alpha_bar[lo.long()], log_alpha_bar[lo.long() + 1], frac)
        return _vp_mixture_eps(x, log_ab.exp())

    def continuous_model(x, labels):
        return _vp_mixture_eps(x, torch.exp(-diff.tau(labels.to(F64) / 999)))

    x_T = diff.prior_sample((32, 1, 2, 1), torch.Generator().manual_seed(1))
    discrete = sample(adapters.from_score_sde(ddpm_model, time_scale=999), diff, x_T=x_T, steps=20)
    continuous = sample(adapters.from_score_sde(continuous_model, time_scale=999), diff, x_T=x_T, steps=20)
    assert torch.isfinite(discrete).all()
    assert (discrete - continuous).abs().max() < 0.02, float((discrete - continuous).abs().max())  # measured 3e-3
