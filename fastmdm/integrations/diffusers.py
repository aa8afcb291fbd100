"""fastmdm's samplers as a diffusers scheduler (docs/math.md §7).

    pipe.scheduler = FastMDMScheduler.from_config(pipe.scheduler.config)

The config's betas (``beta_schedule`` linear, scaled_linear, squaredcos_cap_v2, or ``trained_betas``),
built by diffusers' own DDPMScheduler, become a VP diffusion on the exact discrete schedule:
τ(t_k) = −log ᾱ_k at t_k = k / (N − 1) (:class:`fastmdm.schedules.TabulatedTau`), so diffusers' timestep
k is fastmdm's time t_k — the labels t·(N − 1) of score_sde's DDPM models.

``set_timesteps(n)``: the model runs at n distinct integer timesteps. ``timestep_spacing`` "leading",
"trailing" or "linspace" (with ``steps_offset``) gives diffusers' own timesteps (DDPMScheduler's, the
same as DDIMScheduler's); "logsnr" (the default) is fastmdm's grid, uniform in φ = log(e^τ − 1),
rounded, from N − 1 down to 0. ``from_config`` takes the values a config sets (a saved one sets them
all); those it left at diffusers' defaults get this scheduler's (no clipping, "logsnr").

The end, as in DDIM: ``set_alpha_to_one=True`` (default) — the last step returns x̂₀ at the last
timestep (fm.sample's ``denoise=True``: the grid is the n timesteps, n − 1 solver steps and the
denoising call); False — the last step lands on the state at timestep 0, ᾱ_0 (``denoise=False``; the
grid is the timesteps and 0). Each other ``step`` is one
step of the fastmdm plan — "ei-ode" (multistep ``solver_order`` 1–3) or "ancestral" (``eta`` 1 = DDPM,
0 = DDIM) — with the coefficients ``fm.sample`` uses, so a pipeline gives the samples of

    fm.sample(fm.adapters.from_score_sde(unet, time_scale=N - 1), scheduler.diffusion, x_T=noise[:, None],
              grid=scheduler.grid, solver=…, denoise=scheduler.config.set_alpha_to_one)

(without clipping). ``prediction_type``: "epsilon" (ε̂), "sample" (x̂₀: ε̂ = (x − α x̂₀)/σ) or
"v_prediction" (v = α ε − σ x₀: ε̂ = α v + σ x), α = sqrt(ᾱ), σ = sqrt(1 − ᾱ). With ``thresholding``
(dynamic thresholding as diffusers defines it: s = the ``dynamic_thresholding_ratio`` quantile of |x̂₀|
per sample, clamped to [1, ``sample_max_value``]; x̂₀ ← clamp(x̂₀, −s, s)/s) or ``clip_sample``
(x̂₀ ← clamp(x̂₀, ±``clip_sample_range``)), the step uses the changed x̂₀ and ε̂ = (x − α x̂₀)/σ
(DDIM's ``use_clipped_model_output=True``; DPMSolverMultistep's thresholding).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from torch import Tensor

from ..diffusion import vpsde
from ..grids import time_grid
from ..schedules import TabulatedTau
from ..sde_step import sde_step
from ..solvers import get_solver, transition_at
from ..validation import check_choice, check_instance, check_int, check_number

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SOLVERS = ("ei-ode", "ancestral")
TIMESTEP_SPACINGS = ("logsnr", "leading", "trailing", "linspace")


class FastMDMScheduler(SchedulerMixin, ConfigMixin):
    """fastmdm's "ei-ode" (``solver_order`` 1–3) or "ancestral" (``eta``) on a DDPM/DDIM config's schedule.

    Attributes: ``diffusion`` (the fastmdm VP diffusion), ``alphas_cumprod``, and after
    ``set_timesteps``: ``timesteps`` (the model's n timesteps), ``grid`` (the fastmdm times of the plan).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 solver: str = "ei-ode", solver_order: int = 3, eta: float = 1.0,
                 timestep_spacing: str = "logsnr", steps_offset: int = 0, set_alpha_to_one: bool = True,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 rescale_betas_zero_snr: bool = False):
        check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
        check_choice(prediction_type, PREDICTION_TYPES, "prediction_type")
        check_choice(solver, SOLVERS, "solver")
        check_choice(solver_order, (1, 2, 3), "solver_order")
        check_number(eta, "eta", 0.0, 1.0)
        check_choice(timestep_spacing, TIMESTEP_SPACINGS, "timestep_spacing")
        check_int(steps_offset, "steps_offset", minimum=0)
        for name, flag in (("set_alpha_to_one", set_alpha_to_one), ("clip_sample", clip_sample),
                           ("thresholding", thresholding)):
            check_instance(flag, bool, name)
        check_number(clip_sample_range, "clip_sample_range", 0.0, low_open=True)
        check_number(dynamic_thresholding_ratio, "dynamic_thresholding_ratio", 0.0, 1.0)
        check_number(sample_max_value, "sample_max_value", 1.0)
        if rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr=True is not supported: a zero terminal SNR "
                             "(alphas_cumprod = 0) has no finite tau")
        try:  # diffusers' own betas and timestep spacings
            self._ddpm = DDPMScheduler(
                num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                beta_schedule=beta_schedule, trained_betas=trained_betas, timestep_spacing=timestep_spacing,
                steps_offset=steps_offset)
        except NotImplementedError as err:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not one diffusers knows: {err}") from None
        self.alphas_cumprod = self._ddpm.alphas_cumprod
        self.diffusion = vpsde(schedule=TabulatedTau.from_alphas_cumprod(self.alphas_cumprod), t_min=0.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.grid = None
        self._coefs = self._noisy = self._signal = self._noise = None
        self._history: list[Tensor] = []
        self._last_index = -1

    # -- the grid --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: list[int] | None = None) -> None:
        """n = ``num_inference_steps`` model timesteps with the config's spacing, or the given strictly
        decreasing ``timesteps`` in [0, N − 1]; the grid ends there (``set_alpha_to_one``) or at 0."""
        last = self.config.num_train_timesteps - 1
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is None:
            n = check_int(num_inference_steps, "num_inference_steps")
            if n > last:
                raise ValueError(f"num_inference_steps must be <= num_train_timesteps - 1 = {last}, got {n}")
            steps = self._spaced_timesteps(n)
        else:
            steps = np.asarray(timesteps, dtype=np.int64)
        if not (steps.ndim == 1 and steps.size >= 1 and (np.diff(steps) < 0).all() and 0 <= steps[-1]
                and steps[0] <= last):
            raise ValueError(f"timesteps must be strictly decreasing integers in [0, {last}], "
                             f"got {steps.tolist()}")
        self.num_inference_steps = steps.size
        self.timesteps = torch.from_numpy(steps.copy()).to(device)
        ends_at_zero = not self.config.set_alpha_to_one and steps[-1] > 0
        grid_steps = np.append(steps, 0) if ends_at_zero else steps
        self.grid = torch.from_numpy(grid_steps / last)
        self._coefs = self._noisy = None
        if self.grid.numel() > 1:
            entry = get_solver(self.config.solver)
            ei = self.config.solver == "ei-ode"
            options = entry.resolve({"order": self.config.solver_order} if ei else {"eta": self.config.eta})
            self._coefs, self._noisy = entry.plan(self.diffusion, self.grid, **options).packed()
        tk = transition_at(self.diffusion, self.grid)
        self._signal, self._noise = tk.mean_coef[:, 0, 0].tolist(), tk.chol[:, 0, 0].tolist()  # α, σ
        self._history, self._last_index = [], -1

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """The n model timesteps of the config's spacing (diffusers' own, or fastmdm's logsnr grid)."""
        if self.config.timestep_spacing != "logsnr":
            self._ddpm.set_timesteps(n)
            return self._ddpm.timesteps.numpy().astype(np.int64)
        if self.config.set_alpha_to_one:  # the last call is the denoising one, at timestep 0
            return self._logsnr_timesteps(n - 1) if n > 1 else np.array([self.config.num_train_timesteps - 1])
        return self._logsnr_timesteps(n)[:-1]

    def _logsnr_timesteps(self, steps: int) -> np.ndarray:
        """steps + 1 distinct integer timesteps N − 1 = k_0 > … > k_steps = 0: the logsnr grid, rounded."""
        last = self.config.num_train_timesteps - 1
        rounded = (time_grid(self.diffusion, steps, "logsnr").numpy()[::-1] * last).round().astype(np.int64)
        up = np.arange(steps + 1)  # distinct: at least one above the one below, one below the one above
        return np.minimum(np.maximum.accumulate(rounded - up) + up, last - steps + up)[::-1].copy()

    def _index(self, timestep) -> int:
        """Position of ``timestep`` in ``timesteps``; steps must come in order, each once."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        value = int(timestep)
        hits = (self.timesteps == value).nonzero()
        if hits.numel() != 1:
            raise ValueError(f"timestep {value} is not one of the timesteps {self.timesteps.tolist()}")
        n = int(hits[0, 0])
        if n not in (0, self._last_index + 1):
            raise ValueError(f"timestep {value} is step {n}, but the last step taken was {self._last_index}: "
                             "take the steps in order (or call set_timesteps again)")
        return n

    # -- the step --------------------------------------------------------------------------------
    def _noise_prediction(self, model_output: Tensor, sample: Tensor, n: int) -> Tensor:
        """ε̂ from the model output for the config's prediction_type (α, σ at timestep n)."""
        kind, alpha, sigma = self.config.prediction_type, self._signal[n], self._noise[n]
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - alpha * model_output) / sigma
        return alpha * model_output + sigma * sample

    def _limit(self, x0: Tensor) -> Tensor:
        """x̂₀ dynamically thresholded (``thresholding``) or clipped (``clip_sample``), as diffusers does."""
        if self.config.thresholding:
            flat = x0.flatten(1)
            work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            s = torch.quantile(work.abs(), self.config.dynamic_thresholding_ratio, dim=1)
            s = s.clamp(1.0, self.config.sample_max_value)[:, None]
            return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype).view_as(x0)
        return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """One step of the plan from timestep t_n to t_{n+1}: (prev_sample, pred_original_sample x̂₀); the
        last step returns x̂₀ (``set_alpha_to_one``) or the sample at timestep 0 where it already is."""
        if not (isinstance(model_output, Tensor) and model_output.shape == sample.shape):
            got = getattr(model_output, "shape", type(model_output).__name__)
            raise ValueError(f"model_output must be a tensor shaped like sample {tuple(sample.shape)}, got "
                             f"{got} (a model that also predicts its variance: pass its first half)")
        n = self._index(timestep)
        if n == 0:
            self._history = []
        self._last_index = n
        alpha, sigma = self._signal[n], self._noise[n]
        eps = self._noise_prediction(model_output, sample, n)
        x0 = (sample - sigma * eps) / alpha
        if self.config.thresholding or self.config.clip_sample:
            x0 = self._limit(x0)
            eps = (sample - alpha * x0) / sigma
        if n == self.grid.numel() - 1:  # the end: no step left on the grid
            prev = x0 if self.config.set_alpha_to_one else sample
        else:
            prev = self._plan_step(eps, sample, n, generator)
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _plan_step(self, eps: Tensor, sample: Tensor, n: int, generator) -> Tensor:
        """The fused step n of the plan with ε̂ and the multistep history."""
        self._history = [eps.unsqueeze(1), *self._history][: self._coefs.shape[1] - 3]
        coefs = self._coefs[n, : 3 + len(self._history)].to(sample.device)
        seeds = torch.zeros(1, dtype=torch.int64)
        if self._noisy[n]:  # the Triton step's noise seed (the torch step draws from generator)
            seed_device = generator.device if generator is not None else "cpu"
            seeds = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=seed_device)
        seeds = seeds.to(sample.device)
        return sde_step(sample.unsqueeze(1), self._history, coefs, seeds, 0, self._noisy[n], generator)[:, 0]

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The model takes the VP state itself."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x₀ + sqrt(1 − ᾱ_t) ε at integer ``timesteps`` (fastmdm's forward process)."""
        t = torch.as_tensor(timesteps, device=original_samples.device).to(torch.float64)
        t = t / (self.config.num_train_timesteps - 1)
        return self.diffusion.perturb(original_samples, t, noise=noise.unsqueeze(1))[0][:, 0]

    def __len__(self) -> int:
        return self.config.num_train_timesteps


__all__ = ["FastMDMScheduler"]
