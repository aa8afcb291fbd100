"""Backend selection: which implementation (torch or Triton) runs a fused op.

"auto" uses the Triton kernels for CUDA tensors when triton imports, the torch
path otherwise; "torch" always the torch path; "triton" always the kernels,
which on CPU requires ``TRITON_INTERPRET=1``. The environment variable
``FASTMDM_BACKEND`` sets the initial choice.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")

_state = {"backend": None}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every fused op: "auto", "torch" or "triton"."""
    _state["backend"] = _check_name(name)


def get_backend() -> str:
    """The backend in force (``set_backend`` wins over ``FASTMDM_BACKEND``)."""
    if _state["backend"] is None:
        name = os.environ.get("FASTMDM_BACKEND", "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"FASTMDM_BACKEND must be one of {BACKENDS}, got {name!r}")
        return name
    return _state["backend"]


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it is an optional dependency off Linux)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device | str) -> bool:
    """Whether a fused op on tensors of ``device`` runs the Triton kernel.

    Raises RuntimeError when the backend is forced to "triton" but the kernels
    cannot run there (no triton, or a CPU tensor without TRITON_INTERPRET=1).
    """
    device = torch.device(device)
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_available() and not interpreter_enabled()
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not importable")
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend 'triton' does not support device {device.type!r}")
    return True
