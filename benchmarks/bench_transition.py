"""Transition coefficients and the perturbation: the registry's cases of that data pass alone.

    python benchmarks/bench_transition.py [--preset tiny|quick|full] [--device cpu|cuda]

Runs ``transition`` ((M, Σ, L, L⁻ᵀ) for B times), ``perturb`` (u_t = M_t x₀ + L_t ε from t)
and ``perturb_data`` (u_t = a x₀ + L ε given the coefficients; ε never stored by the Triton
kernel) from :data:`fastmdm.benchmarking.CASES` with the suite's timer, and prints the ratio
table: fast vs the looped reference, the batched reference and, on CUDA, the torch path,
with the achieved bandwidth of the memory-bound rows. ``fastmdm bench`` runs the same cases
among the others; ``pytest benchmarks/ -k "transition or perturb"`` times them with
pytest-benchmark.
"""

from __future__ import annotations

import argparse

from fastmdm import benchmarking as bm

CASE_NAMES = ["transition", "perturb", "perturb_data"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=bm.PRESETS, default="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = parser.parse_args()
    report = bm.run_suite(args.preset, args.device, cases=CASE_NAMES, compile=False)
    print(bm.ratio_table(report))


if __name__ == "__main__":
    main()
