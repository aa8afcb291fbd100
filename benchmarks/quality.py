"""Sample quality vs network evaluations on sharp mixtures, with exact scores (no trained network).

Data: 8 equal modes N(μ_c, 0.05² I) — on the circle of radius 1.5 in d = 2, at 1.5 × 8 random unit
directions (fixed seed) in d = 16 and 64 — and the exact model of each diffusion (docs/math.md §8) for
VP, CLD, ALDA, MALDA(3) and a learned (Q, D) (K = 3, full D, fixed seed). Each sampler runs at a budget
of NFE network evaluations, counted honestly: a denoised end (``denoise=True``, Tweedie at t_min) costs
one call, so it runs NFE − 1 steps.

Score: weighted per-mode Gaussian W2 (samples go to the mode of largest responsibility; per mode the W2
between N(mean, cov) of its samples and the exact mode) against the law the output targets — the law of
x at t_min for a state (modes N(a μ_c, (s_c² a² + Σ_xx) I), a = M_{t_min}[0, 0]), the data law for a
denoised end — divided by the floor: the same W2 for as many exact samples of that law (mean of
FLOOR_DRAWS draws). 1 = indistinguishable from exact samples at this sample size.

Columns: ``fm.sample``'s defaults (``steps = NFE − 1`` where the default end is denoised) and a small grid of fastmdm options;
on VP, k-diffusion's DPM-Solver++ 2M and 3M (deterministic, Karras sigmas, ending in 0) and diffusers'
DPM-Solver++ 2M/3M, UniPC and DEIS (their discrete schedule, the exact ε̂ of the VP diffusion on it,
float32 as they run) when those packages are installed. Writes quality-<date>.md (table) and .png (W2/floor vs NFE per
diffusion) to --out.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --out benchmarks/results/
    python benchmarks/quality.py --quick   # VP and CLD in d = 2, NFE 5 and 10
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
from tqdm import tqdm

import fastmdm as fm
from fastmdm.grids import karras_grid
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.sampling import default_denoise, sample
from fastmdm.schedules import TabulatedTau, sigma_from_tau, tau_from_sigma
from fastmdm.solvers import default_solver, get_solver

SAMPLES = 4000
FLOOR_DRAWS = 10
# sampling seeds per d: each entry is the mean ratio over them; one draw of exact samples has a ratio of std
# 0.13 / 0.018 / 0.004 in d = 2 / 16 / 64, so d = 2 takes ten (standard error 0.04)
SEEDS = {2: tuple(range(10)), 16: (0, 1, 2), 64: (0, 1, 2)}
NFES = (5, 10, 20)
DIMS = (2, 16, 64)
DIFFUSIONS = {
    "vpsde": fm.vpsde,
    "cld": fm.cld,
    "alda": fm.alda,
    "malda3": lambda: fm.malda(3),
    "learned3": lambda: fm.learned(3, full_d=True, init_noise=0.5, generator=torch.Generator().manual_seed(0)),
}
# (label, sample() options, denoised end); the defaults run apart (see default_run)
CONFIGS = [
    ("ei-data o3 datasnr", dict(solver="ei-data", order=3, correct=False, grid="datasnr"), False),
    ("ei-data o3 datasnr +den", dict(solver="ei-data", order=3, correct=False, grid="datasnr"), True),
    ("ei-data o3 +corr datasnr", dict(solver="ei-data", order=3, grid="datasnr"), False),
    ("ei-ode o3 logsnr", dict(solver="ei-ode", order=3, grid="logsnr"), False),
    ("ei-ode o3 logsnr +den", dict(solver="ei-ode", order=3, grid="logsnr"), True),
    ("ei-ode o2 quadratic", dict(solver="ei-ode", order=2, grid="quadratic"), False),
    ("ei-ode o2 quadratic +den", dict(solver="ei-ode", order=2, grid="quadratic"), True),
    ("ei-ode o2 datasnr", dict(solver="ei-ode", order=2, grid="datasnr"), False),
]


def sharp_mixture(d: int) -> GaussianMixture:
    """8 equal modes of std 0.05 at radius 1.5: a circle in d = 2, random unit directions (seed d) above."""
    if d == 2:
        angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = torch.stack([angle.cos(), angle.sin()], 1)
    else:
        means = torch.randn(8, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
        means = means / means.norm(dim=1, keepdim=True)
    return GaussianMixture(torch.ones(8), 1.5 * means, torch.full((8,), 0.05))


def make_mixture(d: int) -> GaussianMixture:
    """Four well-separated modes with unequal weights and widths (fixed seed; the stress tests' law)."""
    g = torch.Generator().manual_seed(d)
    means = torch.randn(4, d, generator=g, dtype=torch.float64)
    means = 2.0 * means / means.norm(dim=1, keepdim=True)
    if d == 2:
        means = 2.0 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    return GaussianMixture([0.1, 0.2, 0.3, 0.4], means, [0.15, 0.2, 0.25, 0.3])


class ExactLaw:
    """The law of x at t_min: modes N(a μ_c, v_c I); ``diffusion=None``: the data law (a = 1, Σ_xx = 0)."""

    def __init__(self, mixture: GaussianMixture, diffusion=None):
        a, sxx = 1.0, 0.0
        if diffusion is not None:
            with torch.no_grad():
                tk = diffusion.transition_f64(torch.tensor([diffusion.t_min], dtype=torch.float64))
            a, sxx = tk.mean_coef[0, 0, 0], tk.cov[0, 0, 0]
        self.weights = mixture.weights
        self.means = a * mixture.means
        self.vars = mixture.stds**2 * a**2 + sxx

    def sample(self, n: int, generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return self.means[comp] + self.vars[comp].sqrt()[:, None] * noise

    def metrics(self, x: torch.Tensor) -> tuple[float, float]:
        """(weighted per-mode Gaussian W2, mode-weight TV)."""
        x = x.to(torch.float64).flatten(1)
        d = x.shape[1]
        logp = (self.weights.log() - 0.5 * d * self.vars.log()
                - 0.5 * ((x[:, None] - self.means[None]) ** 2).sum(-1) / self.vars)
        label = logp.argmax(1)
        w2, tv = 0.0, 0.0
        for c in range(self.weights.numel()):
            xc = x[label == c]
            frac = xc.shape[0] / x.shape[0]
            tv += 0.5 * abs(frac - float(self.weights[c]))
            if xc.shape[0] < d + 2:
                w2 += float(self.weights[c]) * float("inf")
                continue
            mean, cov = xc.mean(0), torch.cov(xc.T).reshape(d, d)
            lam = torch.linalg.eigvalsh(cov).clamp_min(0)
            v = float(self.vars[c])
            sq = float(((mean - self.means[c]) ** 2).sum() + lam.sum() + d * v - 2 * math.sqrt(v) * lam.sqrt().sum())
            w2 += float(self.weights[c]) * math.sqrt(max(sq, 0.0))
        return w2, tv

    def floor(self, samples: int) -> float:
        """Mean W2 of ``samples`` exact samples over FLOOR_DRAWS draws."""
        draws = [self.metrics(self.sample(samples, torch.Generator().manual_seed(100 + i)))[0]
                 for i in range(FLOOR_DRAWS)]
        return sum(draws) / FLOOR_DRAWS


def default_run(diffusion, nfes=NFES) -> tuple[str, bool]:
    """(label, denoised end) of what ``fm.sample(model, diffusion, shape, steps)`` runs at these budgets
    (the solver may depend on the number of steps: one label names each solver and its budgets)."""
    runs, ends = {}, set()
    for nfe in nfes:
        solver = default_solver(diffusion, diffusion.t_min, nfe)
        entry = get_solver(solver)
        denoise = default_denoise(diffusion, diffusion.t_min, "eps", entry)
        order = entry.options["order"] or "2/3"  # None: "ei-data" picks 2 or 3 by the number of steps
        corrected = " +corr" if entry.options.get("correct") else ""
        runs.setdefault(f"{solver} o{order}{corrected} {entry.grid}{' +den' if denoise else ''}", []).append(nfe)
        ends.add(denoise)
    if len(ends) > 1:
        raise ValueError("the default's end changes with the budget: steps = NFE − 1 would differ")
    parts = [f"{run} at {', '.join(map(str, budgets))}" if len(runs) > 1 else run for run, budgets in runs.items()]
    return f"default ({'; '.join(parts)})", ends.pop()


def load_k_diffusion():
    """k_diffusion.sampling loaded by path without its package __init__ (as its integration tests do), or None."""
    spec = importlib.util.find_spec("k_diffusion")
    needs = ("scipy", "torchsde", "torchdiffeq")
    if spec is None or any(importlib.util.find_spec(n) is None for n in needs):
        return None
    root = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    stubs = [] if importlib.util.find_spec("torchvision") else [  # utils imports it, sampling never uses it
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    sys.modules.update({name: types.ModuleType(name) for name in stubs})
    try:
        for name in ("utils", "sampling"):
            module_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[f"k_diffusion.{name}"] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
    finally:  # diffusers probes torchvision's spec: leave no stub behind
        for name in stubs:
            sys.modules.pop(name)
    return package.sampling


def k_diffusion_runs(K, mixture, diff, d: int, nfe: int, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """DPM-Solver++ 2M and 3M (eta 0) on Karras sigmas σ(T) … σ(t_min), 0: nfe calls, the last one's x̂₀."""
    sigmas = sigma_from_tau(diff.tau(karras_grid(diff, nfe - 1)))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])

    def denoiser(x, sigma):  # E[x₀ | x = x₀ + σ n]: the VP state u = x / sqrt(1 + σ²) at t(σ)
        t = diff.tau_inverse(tau_from_sigma(sigma[:1])).expand(x.shape[0])
        return mixture.posterior_mean(diff, (x / (1 + sigma[:, None] ** 2).sqrt()).unsqueeze(1), t)

    x = sigmas[0] * torch.randn(samples, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"k-diffusion dpmpp_2m": K.sample_dpmpp_2m(denoiser, x, sigmas, disable=True),
            "k-diffusion dpmpp_3m (eta 0)": K.sample_dpmpp_3m_sde(denoiser, x, sigmas, disable=True, eta=0.0)}


def diffusers_runs(mixture, d: int, nfe: int, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """diffusers' multistep schedulers (default linear betas, 1000 steps) with the exact ε̂ on that schedule."""
    from diffusers import (
        DDPMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    )

    betas = DDPMScheduler().alphas_cumprod
    diff = fm.vpsde(schedule=TabulatedTau.from_alphas_cumprod(betas), t_min=0.0)
    eps = exact_score_model(mixture, diff)
    schedulers = {
        "diffusers DPM-Solver++ 2M": DPMSolverMultistepScheduler(solver_order=2),
        "diffusers DPM-Solver++ 3M": DPMSolverMultistepScheduler(solver_order=3),
        "diffusers UniPC": UniPCMultistepScheduler(),
        "diffusers DEIS": DEISMultistepScheduler(),
    }
    out = {}
    torch.set_default_dtype(torch.float32)  # the schedulers mix their float32 tables with the default dtype
    try:
        for label, scheduler in schedulers.items():
            scheduler.set_timesteps(nfe)
            x = torch.randn(samples, d, generator=torch.Generator().manual_seed(seed))
            for k in scheduler.timesteps:
                t = torch.full((samples,), float(k) / 999)
                x = scheduler.step(eps(x.unsqueeze(1), t)[:, 0], k, x).prev_sample
            out[label] = x
    finally:
        torch.set_default_dtype(torch.float64)
    return out


def fastmdm_runs(model, diff, d: int, nfe: int, samples: int, seed: int,
                 default: tuple[str, bool]) -> dict[str, tuple[torch.Tensor, bool]]:
    """{label: (samples, denoised?)} for the defaults (``default``: default_run's label and end) and CONFIGS
    at a budget of nfe calls."""
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    label, denoise = default
    out = {label: (sample(model, diff, (samples, d), steps=nfe - denoise, generator=gen()), denoise)}
    for label, options, denoise in CONFIGS:
        x = sample(model, diff, (samples, d), steps=nfe - denoise, generator=gen(), denoise=denoise, **options)
        out[label] = (x, denoise)
    return out


def run(out: Path, quick: bool) -> Path:
    torch.set_default_dtype(torch.float64)
    dims, nfes, names, samples = ((2,), (5, 10), ("vpsde", "cld"), 1000) if quick else (DIMS, NFES, DIFFUSIONS, SAMPLES)
    K = load_k_diffusion()
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    rows = []  # (diffusion, d, label, nfe, ratio)
    progress = tqdm(total=len(dims) * len(names), desc="quality", unit="case")
    for d in dims:
        mixture = sharp_mixture(d)
        data = ExactLaw(mixture)
        floor_data = data.floor(samples)
        for name in names:
            diff = DIFFUSIONS[name]()
            state = ExactLaw(mixture, diff)
            floor_state = state.floor(samples)
            model = exact_score_model(mixture, diff)
            default = default_run(diff, nfes)
            for nfe in nfes:
                ratios = {}
                for seed in SEEDS[d]:
                    runs = fastmdm_runs(model, diff, d, nfe, samples, seed, default)
                    if name == "vpsde":
                        peers = (k_diffusion_runs(K, mixture, diff, d, nfe, samples, seed) if K else {}) | (
                            diffusers_runs(mixture, d, nfe, samples, seed) if has_diffusers else {})
                        runs |= {label: (x, True) for label, x in peers.items()}
                    for label, (x, denoised) in runs.items():
                        law, fl = (data, floor_data) if denoised else (state, floor_state)
                        ratio = law.metrics(x)[0] / fl if torch.isfinite(x).all() else float("inf")
                        ratios.setdefault(label, []).append(ratio)
                rows += [(name, d, label, nfe, sum(r) / len(r)) for label, r in ratios.items()]
            progress.update()
    progress.close()
    stem = out / f"quality-{datetime.date.today().isoformat()}{'-quick' if quick else ''}"
    write_table(stem.with_suffix(".md"), rows, samples, quick)
    plot(stem.with_suffix(".png"), rows)
    return stem


def _is_default(label: str) -> bool:
    return label.startswith("default")


def write_table(path: Path, rows, samples: int, quick: bool) -> None:
    cases = list(dict.fromkeys((r[0], r[1]) for r in rows))
    nfes = sorted({r[3] for r in rows})
    table = {(r[0], r[1], r[2], r[3]): r[4] for r in rows}
    labels = list(dict.fromkeys(r[2] for r in rows))
    command = "python benchmarks/quality.py" + (" --quick" if quick else " --out benchmarks/results/")
    seed_text = "; ".join(f"{min(s)}–{max(s)} in d = {d}" for d, s in SEEDS.items())
    lines = [
        "# Sample quality vs NFE on sharp mixtures (exact scores)",
        "",
        f"Generated by `OMP_NUM_THREADS=1 {command}` (float64, {samples} samples; each entry is the mean "
        f"over sampling seeds {seed_text}). "
        "8 equal modes of std 0.05 at radius 1.5 (a circle in d = 2, random directions in d = 16, 64). "
        "Entries: weighted per-mode Gaussian W2 divided by the W2 of as many exact samples of the targeted "
        f"law (mean of {FLOOR_DRAWS} draws): the data law for a denoised end (+den, NFE − 1 steps and the "
        "Tweedie call), the law of x at t_min for a state (NFE steps). Goal: ≤ 3 at 5 NFE, ≤ 1.5 at 10, "
        "≤ 1.2 at 20. Peers run with their own defaults: diffusers' \"linspace\" spacing makes its last "
        "model call at timestep ≈ 1000/NFE (σ = 0.34 at 10 NFE), whose x̂₀ is a blurred posterior mean: the "
        "plateau of its columns.",
        "",
        "## fm.sample's defaults vs the best fastmdm option per case",
        "",
        "| diffusion | d | " + " | ".join(f"default {n}" for n in nfes) + " | "
        + " | ".join(f"best {n}" for n in nfes) + " |",
        "|---|---|" + "---|" * (2 * len(nfes)),
    ]
    for name, d in cases:
        default = [table.get((name, d, lab, n)) for n in nfes for lab in labels if _is_default(lab)
                   and (name, d, lab, n) in table]
        best = []
        for n in nfes:
            cands = [(table[(name, d, lab, n)], lab) for lab in labels if (name, d, lab, n) in table
                     and not lab.startswith(("k-diffusion", "diffusers"))]
            ratio, lab = min(cands)
            best.append(f"{ratio:.2f} ({lab})")
        lines.append(f"| {name} | {d} | " + " | ".join(f"{v:.2f}" for v in default) + " | " + " | ".join(best) + " |")
    default_labels = sorted({lab for lab in labels if _is_default(lab)})
    lines += ["", f"Defaults: {', '.join(default_labels)}.", "", "## All runs (W2 / floor)", "",
              "| diffusion | d | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
              "|---|---|---|" + "---|" * len(nfes)]
    for name, d in cases:
        for lab in labels:
            if (name, d, lab, nfes[0]) in table:
                lines.append(f"| {name} | {d} | {lab} | "
                             + " | ".join(f"{table[(name, d, lab, n)]:.2f}" for n in nfes) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for d in dict.fromkeys(r[1] for r in rows if r[0] == name):
            case = [r for r in rows if r[0] == name and r[1] == d]
            nfes = sorted({r[3] for r in case})
            default = [min(r[4] for r in case if r[3] == n and _is_default(r[2])) for n in nfes]
            best = [min(r[4] for r in case if r[3] == n and not r[2].startswith(("k-diffusion", "diffusers")))
                    for n in nfes]
            line = ax.plot(nfes, default, marker="o", label=f"d={d} default")[0]
            ax.plot(nfes, best, marker="x", ls="--", color=line.get_color(), label=f"d={d} best")
            peers = sorted({r[2] for r in case if r[2].startswith(("k-diffusion", "diffusers"))})
            if d == 2:
                for lab in peers:
                    ax.plot(nfes, [next(r[4] for r in case if r[2] == lab and r[3] == n) for n in nfes],
                            lw=0.8, alpha=0.7, label=f"d=2 {lab}")
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("NFE")
        ax.set_ylabel("W2 / exact-sample floor")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="VP and CLD in d = 2 at NFE 5, 10, 1000 samples")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(run(args.out, args.quick))


if __name__ == "__main__":
    main()
