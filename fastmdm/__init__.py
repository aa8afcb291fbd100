"""fastmdm: fast multivariate diffusion models (Singhal, Goldstein, Ranganath, ICLR 2023)."""

from .backend import get_backend, set_backend
from .diffusion import LinearDiffusion, alda, cld, learned, malda, vpsde
from .transition import TransitionKernel

__version__ = "0.1.0"

__all__ = [
    "LinearDiffusion",
    "TransitionKernel",
    "alda",
    "cld",
    "get_backend",
    "learned",
    "malda",
    "set_backend",
    "vpsde",
]
