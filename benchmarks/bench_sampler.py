"""Per-step sampler overhead (time excluding the network) vs the published-style reference, on CPU.

The network is trivial (model(u, t) = 0.5 u), so a run's time is the sampler's own work plus a
negligible network time, which is measured on its own (the same number of calls on the same state)
and subtracted. Reference: fastmdm.reference.euler_maruyama_sample (per-sample Van Loan exponential,
Cholesky and inverse at every step, float32). fastmdm: ``fastmdm.sample`` with its coefficient
plan cached (the first call per grid builds it: reported separately as setup). Every ratio divides
medians measured in the same run.

    python benchmarks/bench_sampler.py [--batch 64] [--dim 256] [--steps 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastmdm as fm
from fastmdm import reference
from fastmdm.sampling import _plans, sample
from fastmdm.solvers import get_solver

SOLVERS = [("euler-maruyama", {}), ("ei-ode", dict(order=1)), ("ei-ode", dict(order=3)),
           ("ancestral", {}), ("sscs", {}), ("heun", {})]


def trivial(u, t):
    return 0.5 * u


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    B, d, N = args.batch, args.dim, args.steps
    print(f"CPU, float32, B={B}, d={d}, steps={N}, threads={torch.get_num_threads()}; "
          "per-step time excluding the network (ms) and ratio to the reference")
    for name, make in (("cld", fm.cld), ("malda3", lambda: fm.malda(3))):
        diff = make()
        K = diff.K
        u = torch.randn(B, K, d)
        t = torch.full((B,), 0.5)
        network = median_time(lambda u=u, t=t: [trivial(u, t) for _ in range(N)], args.repeats) / N
        ref = median_time(lambda diff=diff: reference.euler_maruyama_sample(
            trivial, diff.Q.float(), diff.D.float(), (B, d), steps=N,
            stationary_var=diff.stationary_var.float()), args.repeats) / N
        ref_overhead = ref - network
        print(f"\n{name} (K={K}): network {network * 1e3:.3f} ms/step; reference Euler-Maruyama "
              f"{ref_overhead * 1e3:.3f} ms/step overhead")
        for solver, opts in SOLVERS:
            nfe_per_step = get_solver(solver).nfe_per_step
            _plans.clear()
            start = time.perf_counter()
            sample(trivial, diff, (B, d), steps=N, solver=solver, **opts)
            first = time.perf_counter() - start
            run = median_time(lambda s=solver, o=opts, diff=diff: sample(trivial, diff, (B, d), steps=N,
                                                                         solver=s, **o), args.repeats)
            overhead = (run - nfe_per_step * N * network) / N
            label = solver + ("" if not opts else f" {opts}")
            print(f"  {label:28s} {overhead * 1e3:8.3f} ms/step  ratio {overhead / ref_overhead:7.4f}"
                  f"   (setup, first call per grid: {(first - run) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
