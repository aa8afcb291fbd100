import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the mp oracle lives beside the tests

import fastmdm as fm  # noqa: E402

BUILTINS = {
    "vpsde": fm.vpsde,
    "cld": fm.cld,
    "alda": fm.alda,
    "malda3": lambda: fm.malda(3),
    "malda5": lambda: fm.malda(5),
}


@pytest.fixture(params=sorted(BUILTINS))
def builtin(request):
    """Every built-in diffusion, by name."""
    return BUILTINS[request.param]()


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
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    fm.set_backend(os.environ.get("FASTMDM_BACKEND", "auto") or "auto")
