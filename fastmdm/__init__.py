"""fastmdm: fast multivariate diffusion models (Singhal, Goldstein, Ranganath, ICLR 2023)."""

from . import _kernels_path, adapters  # noqa: F401  (_kernels_path first: fastmdm.kernels in a source tree)
from .backend import get_backend, set_backend
from .bpd import bits_per_dim, dequantize, logit_transform
from .data import DataTransform, load_dataset
from .diffusion import LinearDiffusion, alda, cld, cld_sgm, learned, malda, vpsde
from .divergence import exact_divergence, hutchinson_divergence
from .dsm import NoiseSeed
from .evaluation import evaluate_bpd
from .fields import probability_flow_drift
from .likelihood import ode_bits_per_dim, ode_log_likelihood
from .mixtures import GaussianMixture
from .models import MLPScore, UNetScore
from .objectives import dsm_elbo, ism_elbo, noise_prediction_loss
from .sampling import SOLVERS, decode, encode, sample
from .training import MDM, Trainer, load_checkpoint
from .transition import TransitionKernel

__version__ = "0.1.0"

__all__ = [
    "MDM",
    "SOLVERS",
    "DataTransform",
    "GaussianMixture",
    "LinearDiffusion",
    "MLPScore",
    "NoiseSeed",
    "Trainer",
    "TransitionKernel",
    "UNetScore",
    "adapters",
    "alda",
    "bits_per_dim",
    "cld",
    "cld_sgm",
    "decode",
    "dequantize",
    "dsm_elbo",
    "encode",
    "evaluate_bpd",
    "exact_divergence",
    "get_backend",
    "hutchinson_divergence",
    "ism_elbo",
    "learned",
    "load_checkpoint",
    "load_dataset",
    "logit_transform",
    "malda",
    "noise_prediction_loss",
    "ode_bits_per_dim",
    "ode_log_likelihood",
    "probability_flow_drift",
    "sample",
    "set_backend",
    "vpsde",
]
