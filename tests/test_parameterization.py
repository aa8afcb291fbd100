"""The parameterisation object: affine maps to the score and to ε̂, against float64 references."""

import pytest
import torch

import fastmdm as fm
from fastmdm.parameterization import PREDICTIONS, AffineMap, denoised_weights, get_parameterization

F64 = torch.float64


def _setup(diffusion, B=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = diffusion.t_min + (diffusion.T - diffusion.t_min) * torch.rand(B, dtype=F64, generator=g)
    tk = diffusion.transition_f64(t, "hybrid")
    x0 = torch.randn(B, d, dtype=F64, generator=g)
    eps = torch.randn(B, diffusion.K, d, dtype=F64, generator=g)
    u = diffusion.mean(x0, tk) + tk.chol @ eps
    return t, tk, x0, eps, u


def _reference_score(tk, x0, eps):
    """∇ log q(u | x₀) = −Σ⁻¹(u − a x₀) = −L⁻ᵀ ε, the exact score of a point-mass data law."""
    return -(tk.chol_inv_t @ eps)


@pytest.mark.parametrize("make", [fm.vpsde, fm.cld, fm.alda])
def test_each_kind_recovers_the_point_mass_score_and_noise(make):
    """For x₀ a point mass, the exact outputs (ε, −L⁻ᵀε, x₀) all map to the same s and ε̂ = ε."""
    diffusion = make()
    t, tk, x0, eps, u = _setup(diffusion)
    score = _reference_score(tk, x0, eps)
    outputs = {"eps": eps, "score": score, "x0": x0}
    assert set(outputs) == {k for k in PREDICTIONS if get_parameterization(k).full_score}  # D·s-only: test_cld_sgm
    for name, out in outputs.items():
        param = get_parameterization(name)
        y = param.output(out, u)
        torch.testing.assert_close(param.score_map(tk).apply(y, u), score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(param.score(y, u, tk), score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(param.eps_map(tk).apply(y, u), eps, rtol=1e-9, atol=1e-9)
    w = denoised_weights(tk)  # x̂₀ = wᵀ(L⁻¹u − ε)
    white = torch.linalg.solve_triangular(tk.chol, u, upper=False) - eps
    torch.testing.assert_close((w[:, :, None] * white).sum(1), x0, rtol=1e-9, atol=1e-9)


def test_x0_output_may_be_data_shaped_or_state_shaped():
    diffusion = fm.cld()
    t, tk, x0, eps, u = _setup(diffusion)
    param = get_parameterization("x0")
    state_shaped = x0.unsqueeze(1).expand_as(u)
    assert param.output(x0, u).shape == (u.shape[0], 1, *u.shape[2:])
    assert torch.equal(param.output(x0, u), param.output(state_shaped, u))
    with pytest.raises(ValueError, match="model output must have the state's shape"):
        get_parameterization("eps").output(x0, u)
    with pytest.raises(TypeError, match="model output must be a tensor"):
        param.output(x0.numpy(), u)
    with pytest.raises(ValueError, match="prediction must be one of"):
        get_parameterization("v")


def test_affine_map_identity_and_zero():
    u = torch.randn(2, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(2, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert AffineMap(None, None).apply(y, u) is y
    M = torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(AffineMap(M, M).apply(y, u), M @ (y + u), rtol=1e-12, atol=1e-12)
