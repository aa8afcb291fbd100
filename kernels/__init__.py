"""fastmdm.kernels: the fused Triton kernels, a leaf package (it imports only the standard
library, torch, triton and itself).

Importing the package needs no triton: each name below is loaded, with triton, on first use
(``NoiseSeed``, ``TransitionSeries`` and ``MAX_K`` never need it). fastmdm reaches the kernels through
:func:`fastmdm.backend.dispatch`, which picks them or the torch path.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "MAX_K": "common",
    "NoiseSeed": "common",
    "TransitionSeries": "common",
    "generate_probes": "hutchinson",
    "perturb": "perturbation",
    "probe_quadratic_forms": "hutchinson",
    "sde_step": "sampler_step",
    "transition_coefficients": "transition",
    "weighted_dsm": "dsm_loss",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return __all__
