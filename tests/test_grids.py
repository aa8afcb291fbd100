"""Time grids of the samplers (fastmdm.grids)."""

import pytest
import torch

import fastmdm as fm
from fastmdm import reference
from fastmdm.grids import GRIDS, time_grid


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_grid_ends_and_monotone(kind, steps):
    diff = fm.cld(t_min=2e-3, T=0.9)
    t = time_grid(diff, steps, kind)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert t[0] == 0.9 and t[-1] == 2e-3
    assert (t[1:] < t[:-1]).all()


def test_quadratic_is_the_published_grid():
    diff = fm.vpsde()
    assert torch.allclose(time_grid(diff, 37, "quadratic"), reference.quadratic_grid(37), rtol=0, atol=1e-15)


def test_uniform_and_logsnr_spacing():
    diff = fm.malda(3)
    t = time_grid(diff, 20, "uniform")
    assert torch.allclose(t[:-1] - t[1:], torch.full((20,), (1 - 1e-3) / 20, dtype=torch.float64), atol=1e-14)
    phi = diff.phi(time_grid(diff, 20, "logsnr"))
    gaps = phi[1:] - phi[:-1]
    assert torch.allclose(gaps, gaps.mean().expand(20), rtol=1e-10)


def test_bad_grid_arguments():
    diff = fm.vpsde()
    for steps in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            time_grid(diff, steps)
    with pytest.raises(ValueError, match="grid"):
        time_grid(diff, 3, "cosine")
