"""Argument checks shared by the public entry points; each names the argument it rejects.

One helper per kind of check. Every helper returns the (normalised) value, so an entry point
validates and binds in one line: ``steps = check_int(steps, "steps")``. A leaf module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``; ValueError for anything else (bools and 2.0 included)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(value, name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``low_open``); bounds may be None."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or value <= high)
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
        bounds += [f"<= {high}"] if high is not None else []
        limits = " " + " and ".join(bounds) if bounds else ""
        raise ValueError(f"{name} must be a finite number{limits}, got {value!r}")
    return float(value)


def check_choice(value, choices: Sequence, name: str):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_instance(value, cls: type, name: str):
    """``value`` if it is an instance of ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    return value


def check_callable(value, name: str, signature: str):
    """``value`` if callable; ``signature`` shows the expected call, e.g. "model(u, t)"."""
    if not callable(value):
        raise TypeError(f"{name} must be callable as {signature}, got {type(value).__name__}")
    return value


def check_finite(x: Tensor, name: str) -> Tensor:
    """``x`` if it is a tensor without NaN or infinite entries."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    bad = int((~torch.isfinite(x)).sum().item())
    if bad:
        raise ValueError(f"{name} has {bad} NaN or infinite values")
    return x


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple (B, *data_shape) of at least two positive ints."""
    if not isinstance(shape, (Sequence, torch.Size)) or isinstance(shape, str):
        raise TypeError(f"{name} must be a tuple (B, *data_shape) of ints, got {shape!r}")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"{name} must be a tuple (B, *data_shape) of ints, got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"{name} must be (B, *data_shape) with positive sizes, got {shape}")
    return shape


def check_like(x, name: str, shape, ref: Tensor) -> Tensor:
    """``x`` if it is a tensor of ``shape`` with the dtype and device of ``ref``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the data's dtype {ref.dtype}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the data's device {ref.device}, got {x.device}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


__all__ = ["check_callable", "check_choice", "check_finite", "check_instance", "check_int", "check_like",
           "check_number", "check_shape"]
