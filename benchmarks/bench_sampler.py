"""Per-step sampler overhead (time excluding the network) vs the published-style reference, on CPU.

The network is trivial (model(u, t) = 0.5 u), so a run's time is the sampler's own work plus a
negligible network time, which is measured on its own (the same number of calls on the same state)
and subtracted. Reference: fastmdm.reference.euler_maruyama_sample (per-sample Van Loan exponential,
Cholesky and inverse at every step, float32), looped over the batch as published and batched.
fastmdm: ``fastmdm.sample`` with its coefficient plan cached (the first call per grid builds it:
reported separately as setup). Every ratio divides medians measured in the same run by the suite's
timer (fastmdm.benchmarking), all implementations' samples interleaved.

    python benchmarks/bench_sampler.py [--batch 64] [--dim 256] [--steps 50] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

import fastmdm as fm
from fastmdm import benchmarking as bm
from fastmdm import reference
from fastmdm.sampling import _plans, sample
from fastmdm.solvers import get_solver

SOLVERS = [("euler-maruyama", {}), ("ei-ode", dict(order=1)), ("ei-ode", dict(order=3)),
           ("ancestral", {}), ("sscs", {}), ("heun", {})]


def trivial(u, t):
    return 0.5 * u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="least number of timed samples")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    B, d, N = args.batch, args.dim, args.steps
    print(f"CPU, float32, B={B}, d={d}, steps={N}, threads={torch.get_num_threads()}; "
          "per-step time excluding the network (ms) and ratio to the looped reference")
    for name, make in (("cld", fm.cld), ("malda3", lambda: fm.malda(3))):
        diff = make()
        u, t = torch.randn(B, diff.K, d), torch.full((B,), 0.5)
        Q, D, var = diff.Q.float(), diff.D.float(), diff.stationary_var.float()
        runs = {
            "network": lambda u=u, t=t: [trivial(u, t) for _ in range(N)],
            **{f"reference{' batched' if batched else ''}": (
                lambda Q=Q, D=D, var=var, batched=batched: reference.euler_maruyama_sample(
                    trivial, Q, D, (B, d), steps=N, stationary_var=var, batched=batched))
               for batched in (False, True)},
            **{solver + ("" if not opts else f" {opts}"): (
                lambda solver=solver, opts=opts, diff=diff: sample(trivial, diff, (B, d), steps=N, solver=solver,
                                                                   denoise=False, **opts))
               for solver, opts in SOLVERS},
        }
        _plans.clear()  # each solver's warm-up call builds its plan: setup = warm-up − median
        timings = bm.measure_interleaved(runs, "cpu", budget_s=0.0, min_samples=max(2, args.repeats))
        network = timings.pop("network").median_s / N
        ref_overhead = timings["reference"].median_s / N - network
        print(f"\n{name} (K={diff.K}): network {network * 1e3:.3f} ms/step; reference Euler-Maruyama "
              f"{ref_overhead * 1e3:.3f} ms/step overhead")
        for label, timing in timings.items():
            nfe_per_step = 1 if label.startswith("reference") else get_solver(label.split()[0]).nfe_per_step
            overhead = (timing.median_s - nfe_per_step * N * network) / N
            setup = "" if label.startswith("reference") else \
                f"   (setup, first call per grid: {(timing.warmup_s - timing.median_s) * 1e3:.0f} ms)"
            print(f"  {label:28s} {overhead * 1e3:8.3f} ms/step  ratio {overhead / ref_overhead:7.4f}{setup}")


if __name__ == "__main__":
    main()
