"""fastmdm.integrations.k_diffusion against the real k-diffusion package (its sampling module).

k-diffusion's package __init__ imports torchvision, kornia, clip, wandb …, none of which sampling needs
(and torchvision cannot sit beside a CPU torch build): install it with ``pip install --no-deps
k-diffusion`` plus scipy, torchsde, torchdiffeq, Pillow, safetensors (the ``interop`` extra), and the
tests load ``k_diffusion/utils.py`` and ``k_diffusion/sampling.py`` by path, with a stub for the one
module utils imports but sampling never uses (torchvision.transforms.functional).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import fastmdm as fm
from fastmdm.grids import exponential_grid, karras_grid, sigma_times
from fastmdm.integrations.k_diffusion import sample_ancestral, sample_ei
from fastmdm.schedules import sigma_from_tau

NEEDS = ("scipy", "torchsde", "torchdiffeq", "PIL", "safetensors")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def K():
    """k_diffusion.sampling, loaded without k_diffusion/__init__.py."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion; see the interop extra)")
    for name in NEEDS:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (k-diffusion's sampling module needs it; interop extra)")
    root = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    stubs = {"k_diffusion": package}
    if importlib.util.find_spec("torchvision") is None:
        functional = types.ModuleType("torchvision.transforms.functional")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms
        stubs.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                      "torchvision.transforms.functional": functional})
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        for name in ("k_diffusion.utils", "k_diffusion.sampling"):
            mp.delitem(sys.modules, name, raising=False)
        package.utils = _load("k_diffusion.utils", root / "utils.py")
        sampling = _load("k_diffusion.sampling", root / "sampling.py")
    return sampling


def _denoiser(dim: int = 6, seed: int = 0):
    """A smooth nonlinear denoiser D(x, σ; y) with a class-label extra argument."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    bias = torch.randn(3, dim, generator=g, dtype=torch.float64)

    def model(x, sigma, y):
        c = (1 + sigma**2).rsqrt()[:, None]
        return torch.tanh(c * x @ W) + bias[y] / (1 + sigma[:, None])

    return model


def _gaussian_denoiser(mean: float, std: float):
    """The exact denoiser of N(mean, std²) data: D(x, σ) = m + s²/(s² + σ²)(x − m)."""

    def model(x, sigma):
        return mean + std**2 / (std**2 + sigma[:, None] ** 2) * (x - mean)

    return model


def test_order1_equals_sample_euler(K):
    model = _denoiser()
    g = torch.Generator().manual_seed(1)
    sigmas = K.get_sigmas_karras(8, 0.03, 14.6, device="cpu").to(torch.float64)
    x = sigmas[0] * torch.randn(5, 6, generator=g, dtype=torch.float64)
    extra = {"y": torch.tensor([0, 1, 2, 1, 0])}
    seen_ref, seen = [], []
    ref = K.sample_euler(model, x, sigmas, extra_args=extra, callback=seen_ref.append, disable=True)
    out = sample_ei(model, x, sigmas, extra_args=extra, callback=seen.append, disable=True, order=1)
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    assert [info["i"] for info in seen] == [info["i"] for info in seen_ref] == list(range(len(sigmas) - 1))
    for mine, theirs in zip(seen, seen_ref, strict=True):
        assert set(mine) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(mine["sigma"]) == float(theirs["sigma"]) == float(mine["sigma_hat"])
        torch.testing.assert_close(mine["x"], theirs["x"], rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(mine["denoised"], theirs["denoised"], rtol=1e-11, atol=1e-11)


def test_ancestral_eta0_equals_sample_euler(K):
    model = _denoiser(seed=3)
    sigmas = K.get_sigmas_exponential(6, 0.05, 10.0).to(torch.float64)
    x = sigmas[0] * torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    extra = {"y": torch.tensor([2, 0, 1, 1])}
    ref = K.sample_euler(model, x, sigmas, extra_args=extra, disable=True)
    out = sample_ancestral(model, x, sigmas, extra_args=extra, disable=True, eta=0.0)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


def test_higher_orders_are_more_accurate(K):
    """Gaussian data: the probability-flow ODE is x(σ) = m + (x₀ − m) sqrt((s² + σ²)/(s² + σ₀²))."""
    m, s = 0.7, 0.5
    model = _gaussian_denoiser(m, s)
    sigmas = K.get_sigmas_karras(16, 0.02, 20.0).to(torch.float64)
    x = sigmas[0] * torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    last = float(sigmas[-2])
    ode = m + (x - m) * math.sqrt((s**2 + last**2) / (s**2 + float(sigmas[0]) ** 2))
    exact = model(ode, torch.full((3,), last, dtype=torch.float64))
    errors = [(sample_ei(model, x, sigmas, disable=True, order=q) - exact).abs().max().item() for q in (1, 2, 3)]
    assert max(errors[1:]) < errors[0] / 10, errors  # measured: 0.13, 0.0086, 0.0091


def _ancestral_law(sigmas, m, s, eta=1.0):
    """Mean and variance of sample_euler_ancestral's output for N(m, s²) data and the exact denoiser.

    Each step is x ← D + (σ_down/σ)(x − D) + σ_up ξ with D = m + c (x − m), c = s²/(s² + σ²): affine.
    """
    mean, var = 0.0, float(sigmas[0]) ** 2
    for i in range(len(sigmas) - 1):
        hi, lo = float(sigmas[i]), float(sigmas[i + 1])
        up = min(lo, eta * math.sqrt(lo**2 * (hi**2 - lo**2) / hi**2))
        down = math.sqrt(lo**2 - up**2)
        c = s**2 / (s**2 + hi**2)
        a = c + (down / hi) * (1 - c)  # x − m ← a (x − m) + σ_up ξ
        mean, var = m + a * (mean - m), a * a * var + up * up
    return mean, var


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_law_matches_k_diffusion(K, eta):
    m, s, n = -0.3, 0.8, 20000
    model = _gaussian_denoiser(m, s)
    sigmas = K.get_sigmas_karras(6, 0.05, 8.0).to(torch.float64)
    mean, var = _ancestral_law(sigmas, m, s, eta)
    g = torch.Generator().manual_seed(5)
    x = sigmas[0] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(6)
    samples = {"fastmdm": sample_ancestral(model, x, sigmas, disable=True, eta=eta, generator=g),
               "k-diffusion": K.sample_euler_ancestral(model, x, sigmas, disable=True, eta=eta)}
    for name, out in samples.items():
        # 5 standard errors: of the mean sqrt(v/n), of the variance v sqrt(2/(n − 1))
        assert abs(out.mean().item() - mean) < 5 * math.sqrt(var / n), name
        assert abs(out.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1)), name


def test_single_step_and_nonzero_end(K):
    model = _denoiser(seed=7)
    x = 3.0 * torch.randn(2, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    extra = {"y": torch.tensor([0, 1])}
    one = torch.tensor([3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sample_ei(model, x, one, extra, disable=True),
                               K.sample_euler(model, x, one, extra, disable=True), rtol=1e-12, atol=1e-12)
    open_end = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)  # no final 0: stops at σ = 0.2
    torch.testing.assert_close(sample_ei(model, x, open_end, extra, disable=True, order=1),
                               K.sample_euler(model, x, open_end, extra, disable=True), rtol=1e-11, atol=1e-11)


def test_karras_and_exponential_grids_match_k_diffusion(K):
    vp = fm.vpsde(sigma_min=0.03, sigma_max=14.6)
    ends = sigma_from_tau(vp.tau(torch.tensor([vp.t_min, vp.T], dtype=torch.float64)))
    torch.testing.assert_close(ends, torch.tensor([0.03, 14.6], dtype=torch.float64), rtol=1e-12, atol=0)
    for rho in (7.0, 3.0):
        t = karras_grid(vp, 10, rho=rho)
        assert t[0] == vp.T and t[-1] == vp.t_min and (t[1:] < t[:-1]).all()
        ref = K.get_sigmas_karras(11, 0.03, 14.6, rho=rho).to(torch.float64)[:-1]
        torch.testing.assert_close(sigma_from_tau(vp.tau(t)), ref, rtol=1e-5, atol=0)  # k-diffusion: float32
    ref = K.get_sigmas_exponential(11, 0.03, 14.6).to(torch.float64)[:-1]
    torch.testing.assert_close(sigma_from_tau(vp.tau(exponential_grid(vp, 10))), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(sigma_times(vp, ref), vp.tau_inverse(torch.log1p(ref**2)))


def test_grids_drive_fm_sample():
    vp = fm.vpsde(sigma_min=0.01, sigma_max=80.0, beta_min=0.05)
    assert vp.beta_min == 0.05
    model = fm.adapters.from_k_diffusion(_gaussian_denoiser(0.2, 0.5))
    g = torch.Generator().manual_seed(9)
    for grid in (karras_grid(vp, 12), exponential_grid(vp, 12)):
        x = fm.sample(model, vp, (256, 1), grid=grid, generator=g)
        assert abs(x.mean().item() - 0.2) < 5 * 0.5 / 16 and abs(x.std().item() - 0.5) < 0.1


def test_vpsde_sigma_range():
    small = fm.vpsde(sigma_max=0.1)  # below what β_min = 0.1 allows: constant β
    torch.testing.assert_close(sigma_from_tau(small.tau(torch.tensor([1.0], dtype=torch.float64))),
                               torch.tensor([0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min"):
        fm.vpsde(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_max"):
        fm.vpsde(sigma_max=-1.0)


def test_bad_input_is_named():
    model = _gaussian_denoiser(0.0, 1.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigmas"):
        sample_ei(model, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="sigmas"):
        sample_ei(model, x, torch.tensor([1.0]), disable=True)
    with pytest.raises(TypeError, match="model"):
        sample_ei("not a model", x, torch.tensor([1.0, 0.0]), disable=True)
    with pytest.raises(TypeError, match="extra_args"):
        sample_ei(model, x, torch.tensor([2.0, 1.0, 0.0]), extra_args=[1], disable=True)
    with pytest.raises(ValueError, match="order"):
        sample_ei(model, x, torch.tensor([2.0, 1.0, 0.0]), disable=True, order=4)
    with pytest.raises(ValueError, match="eta"):
        sample_ancestral(model, x, torch.tensor([2.0, 1.0, 0.0]), disable=True, eta=2.0)


def test_progress_bar_follows_disable(capsys):
    model = _gaussian_denoiser(0.0, 1.0)
    sigmas = torch.tensor([5.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    x = 5.0 * torch.randn(2, 3, dtype=torch.float64)
    sample_ei(model, x, sigmas, disable=True)
    assert capsys.readouterr().err == ""
    sample_ei(model, x, sigmas, disable=False)
    assert "3/3" in capsys.readouterr().err
