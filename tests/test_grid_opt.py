"""The "optimized" grid (fastmdm.grid_search): the proxies' samples against the sampler itself, the
per-mode W2, and the grid's shape, determinism, cache and use by fm.sample (docs/math.md §11)."""

import pytest
import torch

import fastmdm as fm
import fastmdm.grid_search as grid_search
from fastmdm.grids import data_snr_grid, time_grid
from fastmdm.mixtures import GaussianMixture, exact_score_model

pytestmark = pytest.mark.usefixtures("float64_default")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def small_search(monkeypatch):
    """A short Nelder–Mead budget and an empty cache, so each test builds its grids."""
    monkeypatch.setattr(grid_search, "MAX_EVALUATIONS", 20)
    monkeypatch.setattr(grid_search, "_grids", {})


@pytest.mark.parametrize("maker", [fm.vpsde, fm.cld, lambda: fm.malda(3)])
def test_proxy_samples_are_the_sampler(maker):
    """The proxies' samples are fm.sample's ("ei-data", exact score) from the same prior draws."""
    diff = maker()
    times = time_grid(diff, 6, "datasnr")
    start = grid_search.prior_draws(diff)
    assert start.shape == (grid_search.PROXY_SAMPLES, diff.K, 1) and torch.isfinite(start).all()
    for mix, x in zip(grid_search.proxy_mixtures(), grid_search.proxy_samples(diff, times), strict=True):
        expected = fm.sample(exact_score_model(mix, diff), diff, x_T=start, grid=times, solver="ei-data",
                             denoise=False)[:, 0]
        assert torch.equal(x, expected)


def test_per_mode_w2():
    """Zero against itself; a shift by δ of one mode costs w_c (δ/s)²; a lost mode costs > 1."""
    mix = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.05, 0.05])
    x = mix.sample(4000, gen(4), torch.float64)[:, 0]
    assert grid_search.per_mode_w2(x, x, mix) == 0
    shifted = torch.where(x > 0, x + 0.01, x)
    assert abs(grid_search.per_mode_w2(shifted, x, mix) - float((x > 0).double().mean()) * 0.2**2) < 1e-12
    assert grid_search.per_mode_w2(x.abs(), x, mix) > 1


@pytest.mark.usefixtures("small_search")
@pytest.mark.parametrize("maker", [fm.vpsde, fm.cld])
def test_optimized_grid_shape_and_proxy_error(maker):
    """Monotone with exact ends at 1–5 steps; one step is the "datasnr" grid."""
    diff = maker()
    for steps in range(1, 6):
        t = grid_search.optimized_grid(diff, steps)
        assert t.dtype == torch.float64 and t.shape == (steps + 1,)
        assert t[0] == diff.T and t[-1] == diff.t_min and (t[1:] < t[:-1]).all()
        if steps == 1:
            assert torch.equal(t, data_snr_grid(diff, 1))


@pytest.mark.usefixtures("small_search")
def test_optimized_grid_is_deterministic_and_cached():
    diff = fm.cld()
    first = grid_search.optimized_grid(diff, 4)
    assert len(grid_search._grids) == 1
    first[1] = 0.5  # the caller gets a copy
    grid_search._grids.clear()
    again = grid_search.optimized_grid(diff, 4)
    assert torch.equal(again, grid_search.optimized_grid(diff, 4)) and len(grid_search._grids) == 1
    assert again[1] != 0.5
    assert torch.equal(again, grid_search.optimized_grid(fm.cld(), 4))  # cached by value


@pytest.mark.usefixtures("small_search")
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sample_takes_the_optimized_grid(steps):
    """fm.sample(grid="optimized") runs on the cached grid and stays finite with few steps."""
    diff = fm.cld()
    mix = GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [0.05, 0.05])
    model = exact_score_model(mix, diff)
    states = []
    x = fm.sample(model, diff, (64, 2), steps=steps, solver="ei-data", grid="optimized", generator=gen(2),
                  denoise=False, callback=lambda info: states.append(float(info["t"])))
    assert torch.isfinite(x).all() and x.abs().max() < 3
    assert torch.allclose(torch.tensor(states, dtype=torch.float64), grid_search.optimized_grid(diff, steps))
    with pytest.raises(ValueError, match="grid must be one of"):
        fm.sample(model, diff, (4, 2), steps=steps, grid="optimised")
