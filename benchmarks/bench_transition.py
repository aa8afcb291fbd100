"""Benchmarks of the transition coefficients and the perturbation (issue 4).

    pytest benchmarks/bench_transition.py --bench-preset quick [--bench-device cuda]
    python benchmarks/bench_transition.py [tiny|quick|full] [cpu|cuda]

Three cases, each fast path vs torch path vs :mod:`fastmdm.reference`, in the registry types of
:mod:`fastmdm.benchmarking` (so ``fastmdm bench`` can adopt them; :func:`make_transition_cases`
and :func:`time_cases` work without pytest):

* ``coefficients`` -- (M_t, Σ_t, L_t, L_t⁻ᵀ) for B times (one Triton launch on CUDA);
* ``perturb_only`` -- u_t = a x₀ + L ε given the coefficients: ε drawn in-kernel and never
  stored (``fastmdm.kernels.perturb``) vs the torch path's randn + broadcast + bmm; the reference
  column is the published code's randn + einsum;
* ``perturb_step`` -- both: what a training step does before the network (targets: GPU ≥ 20×
  the reference at B = 128, d = 3072; CPU torch path ≥ 3×).

Memory-bound rows carry the bytes floor of the fused op, x₀ read once and u_t written once
(+ t), and the achieved bandwidth against the measured copy bandwidth (target: perturbation
≥ 70% of copy at B = 512, d = 3072, K = 3 on GPU).
"""

from __future__ import annotations

import sys

import pytest
import torch

from fastmdm import benchmarking as bm
from fastmdm import reference
from fastmdm.backend import use_triton
from fastmdm.ops import apply_kk

SEED = 1234


def _inputs(size: bm.Size, device, dtype):
    diff = bm.bench_diffusion(size.K, device)
    t64 = bm.T_LOW + (1 - bm.T_LOW) * torch.rand(
        size.B, dtype=torch.float64, device=device,
        generator=torch.Generator(device=device).manual_seed(1))
    x0 = torch.randn(size.B, size.d, dtype=dtype, device=device,
                     generator=torch.Generator(device=device).manual_seed(2))
    ref = dict(Q=diff.Q.to(dtype), D=diff.D.to(dtype), t=t64.to(dtype),
               beta_min=diff.beta_min, beta_max=diff.beta_max, init_aux_var=diff.init_aux_var,
               stationary_var=diff.stationary_var.to(dtype), dtype=dtype)
    return diff, t64, x0, ref


def _floor(size: bm.Size, dtype) -> int:
    """x₀ read once, u_t written once, t read: the fused perturbation's least traffic."""
    return size.B * ((1 + size.K) * size.d * torch.finfo(dtype).bits // 8 + 8)


def _seeded(x0, tk):
    from fastmdm.kernels import NoiseSeed, perturb

    return perturb(x0, tk.mean_coef[:, :, 0], tk.chol, seed=NoiseSeed(SEED))


def build_coefficients(size: bm.Size, device, dtype) -> bm.Workload:
    diff, t64, _, ref = _inputs(size, device, dtype)
    Q, D, t = ref.pop("Q"), ref.pop("D"), ref.pop("t")
    return bm.Workload(
        torch_path=lambda: diff.transition_f64(t64, "hybrid"),
        reference=lambda: reference.transition(Q, D, t, "hybrid", **ref),
        floor_bytes=size.B * 8 * (1 + 4 * size.K * size.K),  # τ in, four float64 K×K out
    )


def build_perturb_only(size: bm.Size, device, dtype) -> bm.Workload:
    diff, t64, x0, _ = _inputs(size, device, dtype)
    tk = diff.transition_f64(t64, "hybrid")
    a, L = tk.mean_coef[:, :, 0].to(dtype), tk.chol.to(dtype)  # the published code's float32
    shape = (size.B, size.K, size.d)

    def torch_path():  # LinearDiffusion.perturb's data pass
        eps = torch.randn(shape, dtype=dtype, device=device)
        return diff.mean(x0, tk) + apply_kk(tk.chol, eps)

    def published():
        eps = torch.randn(shape, dtype=dtype, device=device)
        return a[:, :, None] * x0[:, None] + torch.einsum("bkl,bld->bkd", L, eps)

    return bm.Workload(torch_path=torch_path, reference=published,
                       fast=(lambda: _seeded(x0, tk)) if use_triton(device) else None,
                       floor_bytes=_floor(size, dtype))


def build_perturb_step(size: bm.Size, device, dtype) -> bm.Workload:
    diff, t64, x0, ref = _inputs(size, device, dtype)
    Q, D, t = ref.pop("Q"), ref.pop("D"), ref.pop("t")
    return bm.Workload(
        torch_path=lambda: diff.perturb(x0, t64),
        reference=lambda: reference.perturb(Q, D, x0, t, "hybrid", **ref),
        fast=(lambda: _seeded(x0, diff.transition_f64(t64))) if use_triton(device) else None,
        floor_bytes=_floor(size, dtype),
    )


CASES = {
    "coefficients": bm.Case("coefficients", "(M, Σ, L, L⁻ᵀ) for B times, hybrid start",
                            build_coefficients),
    "perturb_only": bm.Case("perturb_only", "u_t = a x₀ + L ε given the coefficients",
                            build_perturb_only, memory_bound=True),
    "perturb_step": bm.Case("perturb_step", "coefficients + perturbation (a training step's "
                            "data pass)", build_perturb_step, memory_bound=True),
}


def _grid(Bs, Ks, ds) -> tuple[bm.Size, ...]:
    return tuple(bm.Size(B, K, d) for B in Bs for K in Ks for d in ds)


SIZES = {
    "tiny": {name: _grid([4], [2], [3]) for name in CASES},
    "quick": {  # a short CPU run, plus the target sizes
        "coefficients": _grid([64], [1, 3], [1]),
        "perturb_only": _grid([64, 512], [1, 3], [2, 784]) + _grid([512], [3], [3072]),
        "perturb_step": _grid([64], [3], [784]) + _grid([128], [2, 3], [3072]),
    },
    "full": {  # the grid
        "coefficients": _grid([64, 512, 4096], [1, 2, 3, 6], [1]),
        "perturb_only": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072]),
        "perturb_step": _grid([64, 512, 4096], [1, 2, 3, 6], [2, 784, 3072])
        + _grid([128], [2, 3], [3072]),
    },
}


def make_transition_cases(preset: str = "quick") -> list[tuple[bm.Case, bm.Size]]:
    """Every (case, size) of a preset ("tiny", "quick", "full")."""
    if preset not in SIZES:
        raise ValueError(f"preset must be one of {tuple(SIZES)}, got {preset!r}")
    return [(CASES[name], size) for name, sizes in SIZES[preset].items() for size in sizes]


def time_cases(preset: str = "quick", device=None, dtype=torch.float32,
               budget_s: float = 0.3) -> list[dict]:
    """Median time of every implementation of every case, with ratios and bandwidth."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    copy_gbps = bm.copy_bandwidth(device, 64 << 20)
    rows = []
    for case, size in make_transition_cases(preset):
        workload = case.build(size, device, dtype)
        times = {impl: bm.measure(fn, device, budget_s=budget_s).median_s
                 for impl, fn in bm.implementations(workload, device).items()}
        row = dict(case=case.name, B=size.B, K=size.K, d=size.d, device=str(device),
                   **{f"{impl}_ms": s * 1e3 for impl, s in times.items()},
                   speedup_vs_reference=times["reference"] / times["fast"])
        if "torch" in times:
            row["speedup_vs_torch"] = times["torch"] / times["fast"]
        if case.memory_bound:
            row["gbps"] = workload.floor_bytes / times["fast"] / 1e9
            row["fraction_of_copy"] = row["gbps"] / copy_gbps
        rows.append(row)
    return rows


# -- pytest-benchmark (options from benchmarks/conftest.py) ------------------------------------
@pytest.fixture(scope="module")
def copy_gbps(bench_device) -> float:
    return bm.copy_bandwidth(bench_device, 64 << 20)


def pytest_generate_tests(metafunc):
    if "transition_case" in metafunc.fixturenames:
        pairs = make_transition_cases(metafunc.config.getoption("--bench-preset"))
        metafunc.parametrize("transition_case", pairs,
                             ids=[f"{c.name}-{s.label().replace(' ', '-')}" for c, s in pairs])


@pytest.mark.parametrize("impl", ("fast", "torch", "reference"))
def test_transition_case(benchmark, transition_case, impl, bench_device, copy_gbps):
    case, size = transition_case
    workload = case.build(size, bench_device, torch.float32)
    impls = bm.implementations(workload, bench_device)
    if impl not in impls:
        pytest.skip(f"{impl}: the fast path is the torch path on {bench_device}")
    fn = impls[impl]
    run = (lambda: (fn(), torch.cuda.synchronize(bench_device))) if bench_device.type == "cuda" else fn
    benchmark.group = f"{case.name} {size.label()}"
    benchmark.extra_info.update(case=case.name, impl=impl, B=size.B, K=size.K, d=size.d,
                                device=str(bench_device))
    run()  # warm-up (and Triton compilation) outside the measured rounds
    benchmark(run)
    if case.memory_bound and benchmark.stats is not None:  # None under --benchmark-disable
        gbps = workload.floor_bytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(floor_bytes=workload.floor_bytes, gbps=gbps,
                                    fraction_of_copy=gbps / copy_gbps)


if __name__ == "__main__":
    for r in time_cases(*(sys.argv[1:3] or ["quick"])):
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()))
