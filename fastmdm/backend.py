"""Backend selection: which implementation (torch or Triton) runs a fused op.

"auto" uses the Triton kernels for CUDA tensors when triton imports and the sizes fit the
kernels, the torch path otherwise; "torch" always the torch path; "triton" always the kernels
(on CPU under ``TRITON_INTERPRET=1``), and raises RuntimeError where they cannot run. The
environment variable ``FASTMDM_BACKEND`` sets the initial choice. :func:`dispatch` is the one
place that decides, and the only importer of :mod:`fastmdm.kernels` modules.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

from .kernels.common import MAX_K, MAX_STEP_INPUTS, TRANSITION_MAX_K

BACKENDS = ("auto", "torch", "triton")
KERNEL_LIMITS = {  # fastmdm.kernels op -> the largest sizes it takes, in dispatch's order
    "transition_coefficients": (TRANSITION_MAX_K,),  # K (registers; torch path above)
    "perturb": (MAX_K,),  # K
    "weighted_dsm": (MAX_K,),  # K
    "generate_probes": (),
    "probe_quadratic_forms": (MAX_K, MAX_K),  # K_v, K_w
    "sde_step": (MAX_K, MAX_STEP_INPUTS),  # K, network outputs read
}

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


def dispatch(op: str, device: torch.device | str, *sizes: int) -> Callable | None:
    """The Triton kernel ``fastmdm.kernels.<op>`` if it runs for tensors on ``device`` with
    these ``sizes`` (see ``KERNEL_LIMITS``), else None: run the torch path.

    The kernels (and triton) are imported only when returned. Sizes beyond the kernel's
    limits select the torch path under "auto" and raise RuntimeError under "triton".
    """
    limits = KERNEL_LIMITS[op]
    if len(sizes) != len(limits):
        raise TypeError(f"dispatch of {op!r} takes {len(limits)} sizes, got {len(sizes)}")
    if not use_triton(device):
        return None
    if any(n > limit for n, limit in zip(sizes, limits, strict=True)):
        if get_backend() == "triton":
            raise RuntimeError(f"backend 'triton' was requested but the {op} kernel supports sizes "
                               f"up to {limits}, got {sizes}")
        return None
    return getattr(importlib.import_module(".kernels", __package__), op)
