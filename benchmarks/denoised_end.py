"""Which end should ``fastmdm.sample`` return: the state at t_min or the denoised x̂₀ = E[x₀ | u_{t_min}]?

Exact mixture scores (docs/math.md §8) of a sharp 8-mode mixture (equal weights, std 0.05, means on
the circle of radius 1.5 in the first two coordinates; d = 2 and 16), VP, CLD and MALDA(3), the
default solver and grid at a budget of 10 and 20 network evaluations (NFE), four ends:

- ``state``: ``steps = NFE``, the state x at t_min (``denoise=False``);
- ``denoised``: ``steps = NFE − 1`` and the Tweedie step at t_min (``denoise=True``): NFE in all —
  what k-diffusion (sigmas end in 0: the last model call's x̂₀ is returned) and diffusers (the last
  DDIM/DDPM step lands on its x₀ prediction) do with the same budget;
- ``denoised +1``: ``steps = NFE`` and ``denoise=True`` (NFE + 1);
- ``last x̂₀``: ``steps = NFE``, the last step's own prediction E[x₀ | u] at its evaluation time
  (the callback's "denoised"; no extra call, but one step before t_min).

Each is scored by the weighted per-mode Gaussian W2 (benchmarks/quality.py) against the data law
(x₀) and against the law of x at t_min, beside the floor of exact samples of that law.

The peers' ends on the VP-SDE (``--peers``, needs diffusers): k-diffusion's ``sample_euler``
(fastmdm.integrations.k_diffusion.sample_ei, order 1: the same steps, tested against the package) on
Karras sigmas (ρ = 7) from σ(T) to σ(t_min), ending in 0 (the last call's x̂₀) or not (the state, as
VP x); diffusers' DDIMScheduler (its default "leading" spacing, eta 0, no clipping) on its own
discrete schedule, ``set_alpha_to_one`` True (ends on x̂₀) or False (on the state at ᾱ_0).

    python benchmarks/denoised_end.py --out benchmarks/results/denoised-end.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from quality import DIFFUSIONS, ExactLaw
from tqdm import tqdm

import fastmdm as fm
from fastmdm.grids import karras_grid, sigma_times
from fastmdm.integrations.k_diffusion import sample_ei
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.sampling import sample
from fastmdm.schedules import TabulatedTau, sigma_from_tau

SAMPLES = 4000
FLOOR_DRAWS = 5
BUDGETS = (10, 20)
ENDS = ("state", "denoised", "denoised +1", "last x̂₀")


def sharp_mixture(d: int) -> GaussianMixture:
    """8 equal modes N(μ_c, 0.05² I), μ_c on the circle of radius 1.5 in the first two coordinates."""
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.zeros(8, d, dtype=torch.float64)
    means[:, 0], means[:, 1] = 1.5 * angle.cos(), 1.5 * angle.sin()
    return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.05))


class DataLaw(ExactLaw):
    """The data law itself: modes N(μ_c, s_c² I) (the t_min law with a = 1, Σ_xx = 0)."""

    def __init__(self, mixture: GaussianMixture):
        self.weights, self.means, self.vars = mixture.weights, mixture.means, mixture.stds**2


def draw(model, diff, d: int, budget: int, end: str) -> tuple[torch.Tensor, int]:
    """(samples, NFE used) for one end at one budget."""
    info: dict = {}
    steps = budget - 1 if end == "denoised" else budget
    x = sample(model, diff, (SAMPLES, d), steps=steps, generator=torch.Generator().manual_seed(0),
               denoise=end in ("denoised", "denoised +1"), callback=info.update)
    nfe = info["nfe"] + (end in ("denoised", "denoised +1"))
    return (info["denoised"] if end == "last x̂₀" else x), nfe


def floor(law: ExactLaw) -> float:
    draws = [law.metrics(law.sample(SAMPLES, torch.Generator().manual_seed(100 + i)))[0]
             for i in range(FLOOR_DRAWS)]
    return sum(draws) / FLOOR_DRAWS


def k_diffusion_euler(mixture, diff, d: int, budget: int, to_zero: bool) -> torch.Tensor:
    """sample_euler on Karras sigmas down to σ(t_min), + [0] (budget − 1 steps and the x̂₀) or not."""
    sigmas = sigma_from_tau(diff.tau(karras_grid(diff, budget - 1 if to_zero else budget)))

    def denoiser(x, sigma):  # E[x₀ | x = x₀ + σ n]: the VP state u = x / sqrt(1 + σ²) at t(σ)
        t = sigma_times(diff, sigma[:1]).expand(x.shape[0])
        return mixture.posterior_mean(diff, (x / (1 + sigma[:, None] ** 2).sqrt()).unsqueeze(1), t)

    noise = torch.randn(SAMPLES, d, generator=torch.Generator().manual_seed(0))
    x = sample_ei(denoiser, noise * sigmas[0], torch.cat([sigmas, sigmas.new_zeros(1)]) if to_zero else sigmas,
                  disable=True, order=1)
    return x if to_zero else x / (1 + sigmas[-1] ** 2).sqrt()


def ddim(mixture, d: int, budget: int, set_alpha_to_one: bool) -> tuple[torch.Tensor, object]:
    """diffusers' DDIMScheduler (eta 0) with the exact ε̂ of its discrete schedule; (x, that VP diffusion)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    diff = fm.vpsde(schedule=TabulatedTau.from_alphas_cumprod(scheduler.alphas_cumprod), t_min=0.0)
    eps = exact_score_model(mixture, diff)
    scheduler.set_timesteps(budget)
    x = torch.randn(SAMPLES, d, generator=torch.Generator().manual_seed(0))
    for k in scheduler.timesteps:
        t = torch.full((SAMPLES,), float(k) / 999)
        x = scheduler.step(eps(x.unsqueeze(1), t)[:, 0], k, x).prev_sample
    return x, diff


def peer_rows() -> list[str]:
    rows = []
    for d in (2, 16):
        mixture = sharp_mixture(d)
        data = DataLaw(mixture)
        for budget in BUDGETS:
            for label in ("k-diffusion sample_euler", "diffusers DDIM"):
                for end in (False, True):
                    if label == "diffusers DDIM":
                        x, diff = ddim(mixture, d, budget, end)
                    else:
                        diff = fm.vpsde()
                        x = k_diffusion_euler(mixture, diff, d, budget, end)
                    at_t_min = ExactLaw(mixture, diff)
                    floors = floor(data), floor(at_t_min)
                    w2 = data.metrics(x)[0], at_t_min.metrics(x)[0]
                    rows.append(f"| vpsde ({label}) | {d} | {budget} | {'denoised' if end else 'state'} | "
                                f"{budget} | {w2[0]:.4f} | {w2[0] / floors[0]:.2f} | {w2[1]:.4f} | "
                                f"{w2[1] / floors[1]:.2f} |")
    return rows


def run() -> list[str]:
    torch.set_default_dtype(torch.float64)
    rows = []
    progress = tqdm(total=2 * len(DIFFUSIONS) * len(BUDGETS) * len(ENDS), desc="denoised end")
    for d in (2, 16):
        mixture = sharp_mixture(d)
        data = DataLaw(mixture)
        for name, make in DIFFUSIONS.items():
            diff = make()
            at_t_min = ExactLaw(mixture, diff)
            floors = floor(data), floor(at_t_min)
            model = exact_score_model(mixture, diff)
            for budget in BUDGETS:
                for end in ENDS:
                    x, nfe = draw(model, diff, d, budget, end)
                    w2 = data.metrics(x)[0], at_t_min.metrics(x)[0]
                    rows.append(f"| {name} | {d} | {budget} | {end} | {nfe} | {w2[0]:.4f} | "
                                f"{w2[0] / floors[0]:.2f} | {w2[1]:.4f} | {w2[1] / floors[1]:.2f} |")
                    progress.update()
    progress.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/denoised-end.md"))
    parser.add_argument("--peers", action="store_true", help="add k-diffusion's and diffusers' ends (VP)")
    args = parser.parse_args()
    rows = run() + (peer_rows() if args.peers else [])
    head = ["# The end of sampling: state at t_min vs denoised (exact mixture scores)", "",
            "Generated by `OMP_NUM_THREADS=1 python benchmarks/denoised_end.py --peers --out "
            "benchmarks/results/denoised-end.md` (float64, one seed, "
            f"{SAMPLES} samples). Default solver and grid; ends as in the script's docstring. W2: weighted "
            "per-mode Gaussian W2 to the data law (x₀) and to the law of x at t_min; /floor: divided by "
            f"the W2 of {SAMPLES} exact samples of that law (mean of {FLOOR_DRAWS} draws).", "",
            "| diffusion | d | budget | end | NFE | W2 data | /floor | W2 t_min | /floor |",
            "|---|---|---|---|---|---|---|---|---|"]
    args.out.write_text("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()
