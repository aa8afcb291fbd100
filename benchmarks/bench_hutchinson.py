"""Hutchinson divergence: batched (fastmdm) vs the reference's per-probe loop, CPU.

For an MLP and a small conv net and probes ∈ {1, 10, 32}: median wall time per call (the
suite's timer, the implementations' samples interleaved), time per probe, the ratio to one
probe of the same implementation, and the peak extra memory (torch.profiler's CPU memory
accounting is not used: we report the bytes of the probes and network outputs alive at
once, P·B·n·itemsize for batched, B·n·itemsize for the loop). The suite's ``hutchinson``
case (``fastmdm bench``) times fastmdm's default mode against the reference on MLPScore.

Run: ``python benchmarks/bench_hutchinson.py``. :func:`run_cases` is the plain-function
runner (returns a list of dict rows).
"""

from __future__ import annotations

import torch

from fastmdm import benchmarking as bm
from fastmdm import reference
from fastmdm.divergence import hutchinson_divergence

PROBES = (1, 10, 32)


def mlp_case(B: int = 64, n: int = 32, hidden: int = 128):
    """A small MLP fn: (B, n) -> (B, n) and an input."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.SiLU(), torch.nn.Linear(hidden, n))
    return net, torch.randn(B, n)


def conv_case(B: int = 16, channels: int = 2, size: int = 16, width: int = 16):
    """A small conv net fn: (B, C, H, W) -> same shape and an input."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(width, channels, 3, padding=1))
    return net, torch.randn(B, channels, size, size)


NETWORKS = {"mlp": mlp_case, "conv": conv_case}
IMPLS = {
    "batched-jvp": lambda fn, u, p: hutchinson_divergence(fn, u, probes=p, mode="jvp"),
    "batched-vjp": lambda fn, u, p: hutchinson_divergence(fn, u, probes=p, mode="vjp"),
    "reference-loop": lambda fn, u, p: reference.hutchinson_divergence(fn, u, probes=p),
}


def run_cases(networks=tuple(NETWORKS), probes=PROBES, impls=tuple(IMPLS), budget_s: float = 1.0) -> list[dict]:
    """One row per (network, impl, probes): seconds, seconds per probe, ratio to probes=1, live bytes."""
    rows = []
    for case in networks:
        net, u = NETWORKS[case]()
        base = {}
        for p in probes:
            timings = bm.measure_interleaved(
                {impl: (lambda impl=impl, p=p, net=net, u=u: IMPLS[impl](net, u, p)) for impl in impls}, "cpu",
                budget_s=budget_s)
            for impl, timing in timings.items():
                if isinstance(timing, Exception):
                    raise timing
                seconds = timing.median_s
                base.setdefault(impl, seconds)
                copies = p if impl.startswith("batched") else 1
                rows.append(dict(case=case, impl=impl, probes=p, seconds=seconds, per_probe=seconds / p,
                                 vs_one_probe=seconds / base[impl],
                                 probe_bytes=2 * copies * u.numel() * u.element_size()))
    return rows


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run_cases()
    print(f"{'case':6} {'impl':15} {'P':>3} {'ms':>9} {'ms/probe':>9} {'x P=1':>6} {'probe+out KiB':>13}")
    for r in rows:
        print(f"{r['case']:6} {r['impl']:15} {r['probes']:3d} {1e3 * r['seconds']:9.3f} "
              f"{1e3 * r['per_probe']:9.3f} {r['vs_one_probe']:6.2f} {r['probe_bytes'] / 1024:13.1f}")


if __name__ == "__main__":
    main()
