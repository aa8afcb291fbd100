"""fastmdm.integrations.diffusers.FastMDMScheduler inside real diffusers pipelines (nothing downloaded)."""

from __future__ import annotations

import math

import pytest
import torch

import fastmdm as fm

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[interop]')")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastmdm.integrations.diffusers import FastMDMScheduler  # noqa: E402

N_TRAIN = 1000


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                       block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).double().eval()


def _gaussian_eps(mean: float, std: float, scheduler: FastMDMScheduler):
    """The exact noise prediction of N(mean, std²) data at integer timestep k: ε̂ = σ(x − α m)/(α² s² + σ²)."""
    abar = scheduler.alphas_cumprod.to(torch.float64)

    def eps(x, k):
        a2 = abar[int(k)]
        return (1 - a2).sqrt() * (x - a2.sqrt() * mean) / (a2 * std**2 + 1 - a2)

    return eps


def _run(scheduler: FastMDMScheduler, model, x: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
    """The pipelines' loop."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("solver,options,timesteps", [
    ("ei-ode", {"solver_order": 3, "timestep_spacing": "logsnr"}, [999, 603, 73, 0]),
    ("ancestral", {"eta": 0.0}, [750, 500, 250, 0]),  # the config's spacing, "leading"
    ("ancestral", {"eta": 0.0, "timestep_spacing": "trailing", "set_alpha_to_one": False}, [999, 749, 499, 249]),
])
def test_ddpm_pipeline_gives_fm_sample(solver, options, timesteps):
    unet = _unet()
    reference = DDPMScheduler(num_train_timesteps=N_TRAIN, clip_sample=False, timestep_spacing="leading")
    pipe = DDPMPipeline(unet=unet, scheduler=reference)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FastMDMScheduler.from_config(pipe.scheduler.config, solver=solver, **options)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(1)).images
    scheduler = pipe.scheduler
    assert scheduler.timesteps.tolist() == timesteps
    noise = randn_tensor((2, 2, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = fm.adapters.from_score_sde(unet, time_scale=N_TRAIN - 1)  # unet returns a UNet2DOutput
    fm_options = {"order": 3} if solver == "ei-ode" else {"eta": 0.0}
    x = fm.sample(model, scheduler.diffusion, x_T=noise.unsqueeze(1), grid=scheduler.grid, solver=solver,
                  denoise=scheduler.config.set_alpha_to_one, **fm_options)
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": torch.linspace(1e-4, 0.03, 50).tolist(), "num_train_timesteps": 50},
])
def test_exact_discrete_schedule(config):
    reference = DDPMScheduler(**config)
    scheduler = FastMDMScheduler.from_config(reference.config)
    n = reference.config.num_train_timesteps
    k = torch.arange(n, dtype=torch.float64)
    diffusion = scheduler.diffusion
    abar = reference.alphas_cumprod.to(torch.float64)
    torch.testing.assert_close(diffusion.tau(k / (n - 1)), -abar.log(), rtol=1e-13, atol=0)
    torch.testing.assert_close(diffusion.transition(k / (n - 1)).mean_coef[:, 0, 0] ** 2, abar,
                               rtol=1e-12, atol=0)
    mid = (k[:-1] + 0.5) / (n - 1)
    torch.testing.assert_close(diffusion.tau_inverse(diffusion.tau(mid)), mid, rtol=1e-12, atol=1e-15)
    x0 = torch.randn(6, 3, 4, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, dtype=torch.float64)
    steps = torch.randint(0, n, (6,))
    torch.testing.assert_close(scheduler.add_noise(x0, noise, steps), reference.add_noise(x0, noise, steps),
                               rtol=1e-12, atol=1e-12)
    rates = (abar[:-1] / abar[1:]).log() * (n - 1)  # β = dτ/dt on each segment
    assert diffusion.beta_min == pytest.approx(float(rates[0]), rel=1e-12)
    assert diffusion.beta_max == pytest.approx(float(rates[-1]), rel=1e-12)


def test_ddim_config_and_attributes():
    # a config's values set explicitly are honoured; those left at diffusers' defaults are fastmdm's
    default = FastMDMScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear").config)
    assert default.config.timestep_spacing == "logsnr" and not default.config.clip_sample
    scheduler = FastMDMScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear", clip_sample=True,
                                                           timestep_spacing="leading").config)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.order == 1
    assert scheduler.init_noise_sigma == 1.0 and len(scheduler) == N_TRAIN
    assert DDPMScheduler in scheduler.compatibles
    x = torch.randn(2, 3)
    assert scheduler.scale_model_input(x, 10) is x
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.clip_sample
    scheduler.set_timesteps(timesteps=[900, 500, 100])
    assert scheduler.timesteps.tolist() == [900, 500, 100]
    torch.testing.assert_close(scheduler.grid, torch.tensor([900, 500, 100], dtype=torch.float64) / 999)
    scheduler = FastMDMScheduler.from_config(scheduler.config, set_alpha_to_one=False)
    scheduler.set_timesteps(timesteps=[900, 500, 100])
    torch.testing.assert_close(scheduler.grid, torch.tensor([900, 500, 100, 0], dtype=torch.float64) / 999)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_steps_match_fm_sample_for_every_prediction(order, prediction_type):
    """Scheduler loop on an exact Gaussian model given as ε, x₀ or v equals fm.sample on ε."""
    scheduler = FastMDMScheduler(prediction_type=prediction_type, solver_order=order)
    eps = _gaussian_eps(0.4, 0.6, scheduler)
    abar = scheduler.alphas_cumprod.to(torch.float64)

    def model(x, k):
        e, a, s = eps(x, k), abar[int(k)].sqrt(), (1 - abar[int(k)]).sqrt()
        return {"epsilon": e, "sample": (x - s * e) / a, "v_prediction": a * e - s * (x - s * e) / a}[prediction_type]

    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = _run(scheduler, model, x_T, steps=6)
    fm_model = fm.adapters.from_score_sde(lambda x, t: eps(x, round(float(t[0]))), time_scale=N_TRAIN - 1)
    ref = fm.sample(fm_model, scheduler.diffusion, x_T=x_T.unsqueeze(1), grid=scheduler.grid, order=order,
                    denoise=scheduler.config.set_alpha_to_one)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the end: x̂₀ = E[x₀ | x at timestep 0] of N(0.4, 0.36) data, mean 0.4, std at most 0.6
    assert abs(out.mean().item() - 0.4) < 5 * 0.6 / math.sqrt(out.numel()) + 0.02


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_logsnr_grid_is_distinct_integer_timesteps(set_alpha_to_one):
    """n model timesteps from N − 1; the grid ends at 0 (the denoising call there, or one more step)."""
    scheduler = FastMDMScheduler(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=set_alpha_to_one)
    for n in (1, 2, 3, 10, 100, 998, 999):
        scheduler.set_timesteps(n)
        steps = scheduler.timesteps.tolist()
        grid = steps if set_alpha_to_one and n > 1 else steps + [0]
        assert len(steps) == n and steps[0] == N_TRAIN - 1 and grid[-1] == 0
        assert all(a > b for a, b in zip(grid[:-1], grid[1:], strict=False))
        if set_alpha_to_one and n == 1:  # one call: x̂₀ from the prior draw
            grid = steps
        torch.testing.assert_close(scheduler.grid, torch.tensor(grid, dtype=torch.float64) / (N_TRAIN - 1))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_are_diffusers_own_for_each_spacing(spacing, steps_offset):
    config = {"timestep_spacing": spacing, "steps_offset": steps_offset}
    ddim, ddpm = DDIMScheduler(**config), DDPMScheduler(**config)
    scheduler = FastMDMScheduler.from_config(ddim.config)
    for n in (1, 3, 7, 10, 50, 999):
        for reference in (ddim, ddpm):
            reference.set_timesteps(n)
            scheduler.set_timesteps(n)
            assert scheduler.timesteps.tolist() == reference.timesteps.tolist(), (reference, n)


def test_logsnr_grid_is_the_accurate_default():
    """Gaussian data, exact ε̂, 10 steps: the probability-flow ODE's exact end at timestep 0 is
    α₀ m + sqrt(α₀² s² + σ₀²) z, z = (x_T − α_T m)/sqrt(α_T² s² + σ_T²) (measured: 6.6e-4 on the logsnr
    grid, 4.7e-2 with diffusers' "trailing" spacing; DPMSolverMultistep 3M on "linspace": 0.33)."""
    m, s = 0.5, 0.2
    errors = {}
    for spacing in ("logsnr", "trailing"):
        scheduler = FastMDMScheduler(timestep_spacing=spacing, set_alpha_to_one=False)
        abar = scheduler.alphas_cumprod.to(torch.float64)
        x_T = torch.randn(512, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        z = (x_T - abar[-1].sqrt() * m) / (abar[-1] * s**2 + 1 - abar[-1]).sqrt()
        exact = abar[0].sqrt() * m + (abar[0] * s**2 + 1 - abar[0]).sqrt() * z
        errors[spacing] = (_run(scheduler, _gaussian_eps(m, s, scheduler), x_T, 10) - exact).abs().max().item()
    assert errors["logsnr"] < 5e-3 and errors["logsnr"] < errors["trailing"] / 10, errors


def test_ancestral_law_matches_fm_sample():
    """eta = 1: the same law as fm.sample's ancestral solver (5 standard errors on mean and variance)."""
    scheduler = FastMDMScheduler(solver="ancestral", eta=1.0)
    eps = _gaussian_eps(-0.5, 0.3, scheduler)
    n = 20000
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = _run(scheduler, eps, x_T, steps=8, generator=torch.Generator().manual_seed(4))
    fm_model = fm.adapters.from_score_sde(lambda x, t: eps(x, round(float(t[0]))), time_scale=N_TRAIN - 1)
    ref = fm.sample(fm_model, scheduler.diffusion, x_T=x_T.unsqueeze(1), grid=scheduler.grid, solver="ancestral",
                    generator=torch.Generator().manual_seed(5))
    var = ref.var().item()
    assert abs(out.mean().item() - ref.mean().item()) < 5 * math.sqrt(2 * var / n)
    assert abs(out.var().item() - var) < 5 * var * math.sqrt(4 / (n - 1))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="prediction_type"):
        FastMDMScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="solver_order"):
        FastMDMScheduler(solver_order=4)
    with pytest.raises(ValueError, match="timestep_spacing"):
        FastMDMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="sample_max_value"):
        FastMDMScheduler(thresholding=True, sample_max_value=0.5)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        FastMDMScheduler(dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="clip_sample_range"):
        FastMDMScheduler(clip_sample_range=0.0)
    with pytest.raises(TypeError, match="clip_sample"):
        FastMDMScheduler(clip_sample="yes")
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        FastMDMScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        FastMDMScheduler(beta_schedule="cubic")
    scheduler = FastMDMScheduler()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="in order"):
        scheduler.step(x, scheduler.timesteps[2], x)
    with pytest.raises(ValueError, match="timestep 998"):
        scheduler.step(x, 998, x)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.cat([x, x], 1), 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1000)
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.set_timesteps(timesteps=[100, 500])
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.set_timesteps(timesteps=[1000, 500])


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("limit", [{"clip_sample": False}, {"clip_sample": True, "clip_sample_range": 0.8},
                                   {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_steps_clipping_and_thresholding(spacing, set_alpha_to_one, limit, prediction_type):
    """ancestral with eta = 0 is DDIM: every step equals DDIMScheduler's (x̂₀ clipped or thresholded, ε̂
    re-derived from it: use_clipped_model_output), the end included. (DDIM steps to t − N // n, the next
    timestep for these spacings.)"""
    ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=1, set_alpha_to_one=set_alpha_to_one,
                         prediction_type=prediction_type, **limit)
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()  # its float32 values, in float64 arithmetic
    ddim.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else ddim.alphas_cumprod[0]
    scheduler = FastMDMScheduler.from_config(ddim.config, solver="ancestral", eta=0.0)
    ddim.set_timesteps(10)
    scheduler.set_timesteps(10)

    def model(x, k):  # a smooth nonlinear network whose x̂₀ leaves [-1, 1]
        return torch.tanh(3 * x + k / 500) * 1.3

    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = b = x
    for t in ddim.timesteps:
        mine = scheduler.step(model(b, t), t, b)
        theirs = ddim.step(model(a, t), t, a, use_clipped_model_output=True)
        torch.testing.assert_close(mine.pred_original_sample, theirs.pred_original_sample, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, rtol=1e-10, atol=1e-10)
        a, b = theirs.prev_sample, mine.prev_sample
    if "clip_sample_range" in limit and set_alpha_to_one:
        assert b.abs().max() <= 0.8
