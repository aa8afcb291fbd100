"""Shared guard for the Triton kernel tests: CUDA, or the interpreter on CPU (CI)."""

import pytest
import torch

from fastmdm.backend import interpreter_enabled


def require_triton_kernels() -> str:
    """Skip the calling test module unless the kernels can run here; return their device."""
    pytest.importorskip("triton", reason="triton is not importable")
    if not (interpreter_enabled() or torch.cuda.is_available()):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (the CPU interpreter)",
                    allow_module_level=True)
    return "cpu" if interpreter_enabled() else "cuda"
