"""Data for training MDMs: embedded digits, 2-D toys, user files. Nothing is downloaded.

* ``digits``: scikit-learn's 8×8 digits (1,797 images, 17 grey levels 0..16),
  scaled to [0, 1] by /16, shape (1, 8, 8); a fixed train/test split.
* 2-D toys: ``checkerboard``, ``swissroll``, ``8gaussians``, ``moons`` (continuous).
* a path: ``.npy`` / ``.npz`` arrays or MNIST-format IDX files (optionally gzipped).
  Integer arrays are discrete with levels = max + 1 (at least 2; 256 for uint8), scaled
  by /(levels − 1); float arrays are continuous.

Discrete data is modelled through :class:`DataTransform`: uniform dequantisation
x̃ = (x (n − 1) + U)/n and the logit map y = logit(α + (1 − 2α) x̃) with its
log-det, so that bits per dim bound the discrete likelihood (docs/math.md §4).
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .bpd import dequantize, logit_inverse, logit_transform
from .validation import check_finite

TOYS = ("checkerboard", "swissroll", "8gaussians", "moons")
BUILTIN = ("digits", *TOYS)
TOY_SIZE = 20000
TEST_FRACTION = 0.2


@dataclass
class Dataset:
    """A train/test split of one data set; ``levels`` the number of grey levels (None: continuous)."""

    name: str
    train: Tensor
    test: Tensor
    levels: int | None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


class DataTransform:
    """Maps data x to the space the diffusion models, y, with per-sample log-det ldj of x̃ ↦ y.

    levels = None: continuous data, y = x and ldj = 0. Otherwise x on the grid
    {0, 1/(n−1), …, 1} is dequantised and logit-transformed (docs/math.md §4).
    """

    def __init__(self, levels: int | None = None, alpha: float = 0.05):
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 2):
            raise ValueError(f"levels must be None or an integer >= 2, got {levels!r}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        self.levels, self.alpha = levels, float(alpha)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(y, ldj): y the modelled variable, ldj (B,) float64."""
        if self.levels is None:
            return x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        return logit_transform(dequantize(x, self.levels, generator), self.alpha)

    def inverse(self, y: Tensor) -> Tensor:
        """x from y: identity (continuous) or the inverse logit clamped to [0, 1]."""
        if self.levels is None:
            return y
        return logit_inverse(y, self.alpha).clamp(0.0, 1.0)

    def config(self) -> dict:
        return {"levels": self.levels, "alpha": self.alpha}

    def __repr__(self) -> str:
        return f"DataTransform(levels={self.levels}, alpha={self.alpha})"


def _split(x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Fixed random split: a permutation from ``seed``, the last TEST_FRACTION is the test set."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(TEST_FRACTION * x.shape[0])))
    return x[perm[n_test:]].contiguous(), x[perm[:n_test]].contiguous()


def load_digits(seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn's 8×8 digits as (N, 1, 8, 8) in [0, 1] (value/16), 17 levels, fixed split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'fastmdm[data]'") from err
    images = torch.as_tensor(sk_digits().images, dtype=dtype).unsqueeze(1) / 16.0
    train, test = _split(images, seed)
    return Dataset("digits", train, test, levels=17)


def toy_2d(name: str, n: int, generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """n points (n, 2) of a 2-D toy law, scaled to unit order."""
    if name not in TOYS:
        raise ValueError(f"toy must be one of {TOYS}, got {name!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")

    def rand(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    if name == "checkerboard":  # uniform on alternate unit squares of a 4×4 board on [-2, 2]²
        x1 = 4 * rand(n) - 2
        row = 2 * torch.randint(0, 2, (n,), generator=generator).to(torch.float64)
        pts = torch.stack([x1, rand(n) - row + torch.floor(x1).remainder(2)], 1)
    elif name == "swissroll":  # r = θ spiral, θ ∈ [1.5π, 4.5π]
        theta = 1.5 * math.pi * (1 + 2 * rand(n))
        pts = torch.stack([theta * theta.cos(), theta * theta.sin()], 1) / 5 + 0.1 * randn(n, 2)
    elif name == "8gaussians":  # eight modes on the circle of radius 2, std 0.1
        angle = torch.randint(0, 8, (n,), generator=generator).to(torch.float64) * (math.pi / 4)
        pts = 2 * torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * randn(n, 2)
    else:  # two interleaving half circles
        upper = torch.randint(0, 2, (n,), generator=generator).bool()
        theta = math.pi * rand(n)
        x1 = torch.where(upper, theta.cos(), 1 - theta.cos())
        x2 = torch.where(upper, theta.sin(), 0.5 - theta.sin())
        pts = torch.stack([x1 - 0.5, x2 - 0.25], 1) * 2 + 0.05 * randn(n, 2)
    return pts.to(dtype)


def load_toy(name: str, seed: int = 0, n: int = TOY_SIZE, dtype: torch.dtype = torch.float32) -> Dataset:
    """A 2-D toy with n points drawn from ``seed``, split into train and test."""
    train, test = _split(toy_2d(name, n, torch.Generator().manual_seed(seed), dtype), seed)
    return Dataset(name, train, test, levels=None)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an MNIST-format IDX file (magic 0x0000, type byte, ndim byte, big-endian sizes)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) != header + math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: IDX header announces shape {shape} but the file has "
                         f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _read_array(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            key = "x" if "x" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise ValueError(f"{path} holds several arrays {keys}; name the data array 'x'")
            return archive[key]
    return read_idx(path)


def load_file(path: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """User data from a .npy/.npz file or an MNIST-format IDX file (.gz allowed), first axis = samples.

    Integer data are discrete (levels = 256 for uint8, else max + 1) and scaled to [0, 1];
    2-D image stacks (N, H, W) get a channel axis.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    try:
        array = _read_array(path)
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read data file {path!r}: {err}") from err
    if array.ndim < 2 or array.shape[0] < 2:
        raise ValueError(f"data in {path!r} must have shape (N >= 2, *data_shape), got {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0:
            raise ValueError(f"integer data in {path!r} must be non-negative levels, min is {array.min()}")
        levels = 256 if array.dtype == np.uint8 else max(int(array.max()) + 1, 2)
        x = torch.as_tensor(array.astype(np.float64) / (levels - 1), dtype=dtype)
    elif np.issubdtype(array.dtype, np.floating):
        levels = None
        x = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype)
    else:
        raise ValueError(f"data in {path!r} must be numeric, got dtype {array.dtype}")
    check_finite(x, f"data in {path!r}")
    if levels is not None and x.dim() == 3:
        x = x.unsqueeze(1)
    train, test = _split(x, seed)
    return Dataset(os.path.basename(path), train, test, levels)


def load_dataset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """``digits``, a toy name from TOYS, or a path to a .npy/.npz/IDX file."""
    if name == "digits":
        return load_digits(seed, dtype)
    if name in TOYS:
        return load_toy(name, seed, dtype=dtype)
    if os.sep in name or os.path.exists(name) or name.endswith((".npy", ".npz", ".gz", "-ubyte")):
        return load_file(name, seed, dtype)
    raise ValueError(f"data must be one of {BUILTIN} or a path to a .npy/.npz/IDX file, got {name!r}")


__all__ = ["BUILTIN", "DataTransform", "Dataset", "TOYS", "check_finite", "load_dataset", "load_digits",
           "load_file", "load_toy", "read_idx", "toy_2d"]
