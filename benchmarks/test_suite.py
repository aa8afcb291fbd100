"""pytest-benchmark over the case registry of fastmdm.benchmarking.

    pytest benchmarks/ --bench-preset quick [--bench-device cuda] [--bench-compile]

Each (case, size) is one benchmark group; its members are the implementations
(fast, torch where it differs, compile, batched where the case has it, reference), so pytest-benchmark's table
compares them side by side. ``fastmdm bench`` runs the same registry with its own
timer and writes the ratio report.
"""

import pytest
import torch

from fastmdm import benchmarking


@pytest.mark.parametrize("impl", benchmarking.IMPLS)
def test_case(benchmark, bench_case, impl, bench_device, bench_compile):
    case, size = bench_case
    if impl == "compile" and not bench_compile:
        pytest.skip("torch.compile column off (pass --bench-compile)")
    dtype = torch.float32
    try:
        workload = case.build(size, bench_device, dtype)
    except benchmarking.CaseSkipped as err:
        pytest.skip(str(err))
    impls = benchmarking.implementations(workload, bench_device, compile=impl == "compile")
    if impl not in impls:
        pytest.skip(f"torch: the fast path is the torch path on {bench_device}" if impl == "torch"
                    else f"{impl}: the {case.name} case has no such baseline")
    fn = impls[impl]
    benchmark.group = f"{case.name} {size.label()}"
    benchmark.extra_info.update(case=case.name, impl=impl, device=str(bench_device),
                                dtype=str(dtype).replace("torch.", ""), B=size.B, K=size.K, d=size.d,
                                **dict(size.extra))
    if bench_device.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize(bench_device)
    else:
        run = fn
    run()  # warm-up (and compilation) outside the measured rounds
    benchmark(run)
