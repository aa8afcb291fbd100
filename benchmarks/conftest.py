"""pytest-benchmark options for the fastmdm suite: ``pytest benchmarks/ --bench-preset quick``.

Sizes come from the registry in :mod:`fastmdm.benchmarking` (presets tiny, quick, full);
``--bench-device`` picks cpu or cuda (default: cuda when available), ``--bench-compile``
adds the torch.compile column.
"""

import pytest
import torch

from fastmdm import benchmarking


def pytest_addoption(parser):
    group = parser.getgroup("fastmdm benchmarks")
    group.addoption("--bench-preset", default="tiny", choices=benchmarking.PRESETS,
                    help="problem sizes from fastmdm.benchmarking.PRESET_CONFIGS (default tiny)")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                    help="device to measure on (default: cuda when available, else cpu)")
    group.addoption("--bench-compile", action="store_true",
                    help="also time torch.compile of the torch path")


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_compile(request) -> bool:
    return request.config.getoption("--bench-compile")


def pytest_generate_tests(metafunc):
    """Parametrise ``bench_case`` over every (case, size) of the chosen preset."""
    if "bench_case" in metafunc.fixturenames:
        preset = metafunc.config.getoption("--bench-preset")
        pairs = list(benchmarking.iter_cases(preset))
        metafunc.parametrize("bench_case", pairs, ids=[f"{c.name}-{s.label().replace(' ', '-')}"
                                                      for c, s in pairs])
