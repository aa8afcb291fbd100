"""fastmdm: fast multivariate diffusion models (Singhal, Goldstein, Ranganath, ICLR 2023)."""

from .backend import get_backend, set_backend
from .bpd import bits_per_dim, dequantize, logit_transform
from .diffusion import LinearDiffusion, alda, cld, learned, malda, vpsde
from .divergence import hutchinson_divergence
from .mixtures import GaussianMixture
from .objectives import dsm_elbo, ism_elbo, noise_prediction_loss
from .transition import TransitionKernel

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture",
    "LinearDiffusion",
    "TransitionKernel",
    "alda",
    "bits_per_dim",
    "cld",
    "dequantize",
    "dsm_elbo",
    "get_backend",
    "hutchinson_divergence",
    "ism_elbo",
    "learned",
    "logit_transform",
    "malda",
    "noise_prediction_loss",
    "set_backend",
    "vpsde",
]
