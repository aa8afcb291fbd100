"""Sample quality vs network evaluations, with the exact score of a Gaussian mixture (no trained network).

For VP-SDE, CLD and MALDA(3) in d = 2 and d = 16, every solver of ``fastmdm.sample`` runs at several
step counts with the exact model of a Gaussian-mixture data law (docs/math.md §8). Its samples of x
are compared with the exact law of x at t_min (what the samplers target: mode c is
N(a μ_c, (s_c² a² + Σ_xx) I), a = M_{t_min}[0, 0]):

- per-mode Gaussian W2: samples are assigned to the mode of largest responsibility; for each mode the
  W2 distance between N(mean, cov) of its samples and the exact mode, averaged with the weights w_c;
- mode-weight total variation ½ Σ_c |ŵ_c − w_c|;

beside the noise floor: the same metrics for the same number of exact samples (mean of FLOOR_DRAWS
draws). Writes quality.md (table) and quality.png (plot) to --out.

    python benchmarks/quality.py --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

import fastmdm as fm
from fastmdm.mixtures import GaussianMixture, exact_score_model
from fastmdm.sampling import sample

SAMPLES = 2000
FLOOR_DRAWS = 5
DIFFUSIONS = {"vpsde": fm.vpsde, "cld": fm.cld, "malda3": lambda: fm.malda(3)}
# (label, sample() options, NFE values); NFE = steps except Heun (2 per step) and RK45 (adaptive)
RUNS = [
    ("euler-maruyama (reference)", dict(solver="euler-maruyama"), [20, 50, 100, 200, 500]),
    ("ei-ode order 1", dict(solver="ei-ode", order=1), [5, 10, 20, 50]),
    ("ei-ode order 2", dict(solver="ei-ode", order=2), [5, 10, 20, 50]),
    ("ei-ode order 3", dict(solver="ei-ode", order=3), [5, 10, 20, 50]),
    ("ei-ode order 2, cholesky noise", dict(solver="ei-ode", order=2, noise="cholesky"), [10, 20, 50]),
    ("ancestral (eta=1)", dict(solver="ancestral"), [10, 20, 50, 100]),
    ("heun", dict(solver="heun"), [10, 20, 50]),
    ("sscs", dict(solver="sscs"), [10, 20, 50, 100]),
    ("rk45", dict(solver="rk45"), [1e-2, 1e-3]),  # rtol = atol
]


def make_mixture(d: int) -> GaussianMixture:
    """Four well-separated modes with unequal weights and widths (fixed seed)."""
    g = torch.Generator().manual_seed(d)
    means = torch.randn(4, d, generator=g, dtype=torch.float64)
    means = 2.0 * means / means.norm(dim=1, keepdim=True)
    if d == 2:
        means = 2.0 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    return GaussianMixture([0.1, 0.2, 0.3, 0.4], means, [0.15, 0.2, 0.25, 0.3])


class ExactLaw:
    """The law of x at t_min: modes N(a μ_c, v_c I)."""

    def __init__(self, mixture: GaussianMixture, diffusion):
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


def run(out: Path) -> None:
    torch.set_default_dtype(torch.float64)
    rows, curves = [], {}
    progress = tqdm(total=2 * len(DIFFUSIONS), desc="quality", unit="law")
    for d in (2, 16):
        mixture = make_mixture(d)
        for name, make in DIFFUSIONS.items():
            diff = make()
            law = ExactLaw(mixture, diff)
            model = exact_score_model(mixture, diff)
            floor = [law.metrics(law.sample(SAMPLES, torch.Generator().manual_seed(100 + i)))
                     for i in range(FLOOR_DRAWS)]
            floor_w2 = sum(f[0] for f in floor) / FLOOR_DRAWS
            floor_tv = sum(f[1] for f in floor) / FLOOR_DRAWS
            key = (name, d)
            curves[key] = {"floor": (floor_w2, floor_tv)}
            for label, options, values in RUNS:
                points = []
                for v in values:
                    opts = dict(options)
                    if opts["solver"] == "rk45":
                        opts.update(rtol=v, atol=v)
                    else:
                        opts["steps"] = v // 2 if opts["solver"] == "heun" else v
                    info = {}
                    x = sample(model, diff, (SAMPLES, d), generator=torch.Generator().manual_seed(0),
                               callback=info.update, denoise=False, **opts)  # x at t_min, its NFE
                    w2, tv = law.metrics(x) if torch.isfinite(x).all() else (float("inf"), 1.0)
                    points.append((info["nfe"], w2, tv))
                    rows.append((name, d, label, info["nfe"], w2, tv, w2 / floor_w2, tv / floor_tv))
                curves[key][label] = points
            progress.update()
    progress.close()
    write_table(out / "quality.md", rows, curves)
    plot(out / "quality.png", curves)


def write_table(path: Path, rows, curves) -> None:
    lines = [
        "# Sample quality vs NFE (exact Gaussian-mixture score)",
        "",
        f"Generated by `python benchmarks/quality.py --out benchmarks/results/`. {SAMPLES} samples per run, "
        "one seed; 4-mode Gaussian mixture (weights 0.1-0.4, stds 0.15-0.3, mode means at radius 2). "
        "W2: weighted per-mode Gaussian W2 against the exact law of x at t_min; TV: mode-weight total "
        f"variation. Floor: the same metrics for {SAMPLES} exact samples (mean of {FLOOR_DRAWS} draws). "
        "ratio = metric / floor (1 = indistinguishable from exact samples at this sample size).",
        "",
        "## Best solver at a given NFE budget (ratio W2/floor)",
        "",
        "| diffusion | d | floor W2 | floor TV | best at NFE <= 10 | best at NFE <= 20 | Euler-Maruyama NFE for W2 <= 1.5 floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, d), curve in curves.items():
        fw2, ftv = curve["floor"]
        cells = []
        for budget in (10, 20):
            best = min(((p[1] / fw2, label, p[0]) for label, pts in curve.items() if label != "floor"
                        for p in pts if p[0] <= budget), default=None)
            cells.append("-" if best is None else f"{best[0]:.2f} ({best[1]}, NFE {best[2]})")
        em = curve["euler-maruyama (reference)"]
        ok = [p[0] for p in em if p[1] <= 1.5 * fw2]
        cells.append(str(min(ok)) if ok else f"> {em[-1][0]}")
        lines.append(f"| {name} | {d} | {fw2:.4f} | {ftv:.4f} | {cells[0]} | {cells[1]} | {cells[2]} |")
    lines += ["", "## All runs", "", "| diffusion | d | solver | NFE | W2 | TV | W2/floor | TV/floor |",
              "|---|---|---|---|---|---|---|---|"]
    for name, d, label, nfe, w2, tv, rw, rt in rows:
        lines.append(f"| {name} | {d} | {label} | {nfe} | {w2:.4f} | {tv:.4f} | {rw:.2f} | {rt:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(curves)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True)
    for ax, key in zip(axes.flatten(), keys, strict=False):
        curve = curves[key]
        fw2 = curve["floor"][0]
        for label, pts in curve.items():
            if label == "floor":
                continue
            pts = [p for p in pts if math.isfinite(p[1])]
            ax.plot([p[0] for p in pts], [p[1] / fw2 for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="k", lw=1)
        ax.axhline(1.5, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{key[0]}, d = {key[1]}")
        ax.set_xlabel("NFE")
        ax.set_ylabel("W2 / exact-sample floor")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.out)


if __name__ == "__main__":
    main()
