import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the mp oracle lives beside the tests

# fastmdm is imported by the fixtures, not here: with --no-triton, triton must be made
# unimportable (pytest_configure) before fastmdm or any test module loads.
BUILTINS = {
    "vpsde": lambda fm: fm.vpsde(),
    "cld": lambda fm: fm.cld(),
    "alda": lambda fm: fm.alda(),
    "malda3": lambda fm: fm.malda(3),
    "malda5": lambda fm: fm.malda(5),
}


def pytest_addoption(parser):
    parser.addoption("--no-triton", action="store_true",
                     help="run with triton unimportable (sys.modules['triton'] = None), as on a "
                          "machine without it; the Triton kernel tests skip")


def pytest_configure(config):
    if config.getoption("--no-triton"):
        if any(name == "fastmdm" or name.startswith("fastmdm.") for name in sys.modules):
            raise pytest.UsageError("--no-triton: fastmdm was imported before triton was hidden")
        sys.modules["triton"] = None


@pytest.fixture(params=sorted(BUILTINS))
def builtin(request):
    """Every built-in diffusion, by name."""
    import fastmdm as fm

    return BUILTINS[request.param](fm)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Small tensors: one thread is as fast and immune to OpenMP spin-waits on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_default():
    """Run a test with torch's default dtype float64 (restored by _restore_torch_state)."""
    torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    import fastmdm as fm

    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    fm.set_backend(os.environ.get("FASTMDM_BACKEND", "auto") or "auto")
