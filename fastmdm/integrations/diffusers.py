"""fastmdm's samplers as a diffusers scheduler (docs/math.md §7).

    pipe.scheduler = FastMDMScheduler.from_config(pipe.scheduler.config)

The config's betas (``beta_schedule`` linear, scaled_linear, squaredcos_cap_v2, or ``trained_betas``),
built by diffusers' own DDPMScheduler, become a VP diffusion on the exact discrete schedule:
τ(t_k) = −log ᾱ_k at t_k = k / (N − 1) (:class:`fastmdm.schedules.TabulatedTau`), so diffusers' timestep
k is fastmdm's time t_k — the labels t·(N − 1) of score_sde's DDPM models. ``set_timesteps(n)`` takes
n + 1 distinct integer timesteps from N − 1 down to 0: ``grid="logsnr"`` (default; fastmdm's grid, uniform
in φ = log(e^τ − 1), rounded) or "linspace" (round(linspace(N − 1, 0, n + 1))); the model runs at the
first n and the last step ends at timestep 0 (noise level sqrt(1 − ᾱ_0), like
DPMSolverMultistepScheduler's final_sigmas_type "sigma_min"; fm.sample's end). A config's
``timestep_spacing`` is not used. Each ``step`` is one step of the fastmdm plan — "ei-ode" (multistep
``solver_order`` 1–3) or "ancestral" (``eta`` 1 = DDPM, 0 = DDIM) — with the coefficients
``fm.sample`` uses, so a pipeline gives the samples of

    fm.sample(fm.adapters.from_score_sde(unet, time_scale=N - 1), scheduler.diffusion, x_T=noise[:, None],
              grid=scheduler.grid, solver=…)

``prediction_type``: "epsilon" (ε̂), "sample" (x̂₀: ε̂ = (x − α x̂₀)/σ) or "v_prediction"
(v = α ε − σ x₀: ε̂ = α v + σ x), α = sqrt(ᾱ), σ = sqrt(1 − ᾱ). No clipping or thresholding of x̂₀.
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
from ..validation import check_choice, check_int, check_number

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SOLVERS = ("ei-ode", "ancestral")
GRIDS = ("logsnr", "linspace")


class FastMDMScheduler(SchedulerMixin, ConfigMixin):
    """fastmdm's "ei-ode" (``solver_order`` 1–3) or "ancestral" (``eta``) on a DDPM/DDIM config's schedule.

    Attributes: ``diffusion`` (the fastmdm VP diffusion), ``alphas_cumprod``, and after
    ``set_timesteps``: ``timesteps`` (the model's n timesteps), ``grid`` (the n + 1 fastmdm times).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 solver: str = "ei-ode", solver_order: int = 3, eta: float = 1.0, grid: str = "logsnr",
                 rescale_betas_zero_snr: bool = False):
        check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
        check_choice(prediction_type, PREDICTION_TYPES, "prediction_type")
        check_choice(solver, SOLVERS, "solver")
        check_choice(solver_order, (1, 2, 3), "solver_order")
        check_number(eta, "eta", 0.0, 1.0)
        check_choice(grid, GRIDS, "grid")
        if rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr=True is not supported: a zero terminal SNR "
                             "(alphas_cumprod = 0) has no finite tau")
        try:
            betas = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                  beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas)
        except NotImplementedError as err:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not one diffusers knows: {err}") from None
        self.alphas_cumprod = betas.alphas_cumprod
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
        """n = ``num_inference_steps`` model timesteps on the config's grid, or the given strictly
        decreasing ``timesteps`` in [1, N − 1]; the grid ends at timestep 0."""
        last = self.config.num_train_timesteps - 1
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is None:
            n = check_int(num_inference_steps, "num_inference_steps")
            if n > last:
                raise ValueError(f"num_inference_steps must be <= num_train_timesteps - 1 = {last}, got {n}")
            steps = self._grid_timesteps(n)
        else:
            steps = np.append(np.asarray(timesteps, dtype=np.int64), 0)
            if steps.ndim != 1 or not ((np.diff(steps) < 0).all() and 0 < steps[0] <= last):
                raise ValueError(f"timesteps must be strictly decreasing integers in [1, {last}], "
                                 f"got {timesteps}")
        self.num_inference_steps = steps.size - 1
        self.timesteps = torch.from_numpy(steps[:-1].copy()).to(device)
        self.grid = torch.from_numpy(steps / last)
        entry = get_solver(self.config.solver)
        ei = self.config.solver == "ei-ode"
        options = {"order": self.config.solver_order} if ei else {"eta": self.config.eta}
        self._coefs, self._noisy = entry.plan(self.diffusion, self.grid, **entry.resolve(options)).packed()
        tk = transition_at(self.diffusion, self.grid)
        self._signal, self._noise = tk.mean_coef[:, 0, 0].tolist(), tk.chol[:, 0, 0].tolist()  # α, σ
        self._history, self._last_index = [], -1

    def _grid_timesteps(self, n: int) -> np.ndarray:
        """n + 1 distinct integer timesteps N − 1 = k_0 > … > k_n = 0 on the config's grid."""
        last = self.config.num_train_timesteps - 1
        if self.config.grid == "linspace":
            return np.linspace(last, 0, n + 1).round().astype(np.int64)
        rounded = (time_grid(self.diffusion, n, "logsnr").numpy()[::-1] * last).round().astype(np.int64)
        up = np.arange(n + 1)  # distinct: at least one above the one below, one below the one above
        return np.minimum(np.maximum.accumulate(rounded - up) + up, last - n + up)[::-1].copy()

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

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """One step of the plan from timestep t_n to t_{n+1}: (prev_sample, pred_original_sample x̂₀)."""
        if not (isinstance(model_output, Tensor) and model_output.shape == sample.shape):
            got = getattr(model_output, "shape", type(model_output).__name__)
            raise ValueError(f"model_output must be a tensor shaped like sample {tuple(sample.shape)}, got "
                             f"{got} (a model that also predicts its variance: pass its first half)")
        n = self._index(timestep)
        if n == 0:
            self._history = []
        self._last_index = n
        eps = self._noise_prediction(model_output, sample, n)
        self._history = [eps.unsqueeze(1), *self._history][: self._coefs.shape[1] - 3]
        coefs = self._coefs[n, : 3 + len(self._history)].to(sample.device)
        seeds = torch.zeros(1, dtype=torch.int64)
        if self._noisy[n]:  # the Triton step's noise seed (the torch step draws from generator)
            seed_device = generator.device if generator is not None else "cpu"
            seeds = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=seed_device)
        seeds = seeds.to(sample.device)
        prev = sde_step(sample.unsqueeze(1), self._history, coefs, seeds, 0, self._noisy[n], generator)[:, 0]
        x0 = (sample - self._noise[n] * eps) / self._signal[n]
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

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
