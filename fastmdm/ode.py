"""ODE integrators for states that are a tensor or a tuple of tensors.

``odeint_adaptive``: Dormand–Prince 5(4) with FSAL, error per step measured as the
RMS over every element of err / (atol + rtol·max(|y|, |y_new|)), step-size
control h ← h·clamp(0.9·err^(−1/5), 0.2, 10); ``odeint_fixed``: Euler, Heun or RK4.
Time may run forward or backward; f(t, y) receives t as a Python float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

State = Tensor | tuple[Tensor, ...]

# Dormand–Prince tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = _A[6] + (0.0,)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True))


def _tuple(y: State) -> tuple[Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def _like(y0: State, parts: tuple[Tensor, ...]) -> State:
    return parts if isinstance(y0, tuple) else parts[0]


def _combine(y: tuple[Tensor, ...], h: float, coefs: Sequence[float], ks: list) -> tuple[Tensor, ...]:
    """y + h Σ_i coefs_i k_i, elementwise over the tuple."""
    out = []
    for j, yj in enumerate(y):
        acc = yj
        for c, k in zip(coefs, ks, strict=False):
            if c:
                acc = acc + (h * c) * k[j]
        out.append(acc)
    return tuple(out)


def _rms(parts) -> float:
    total = sum(float((p.to(torch.float64) ** 2).sum()) for p in parts)
    count = sum(p.numel() for p in parts)
    return math.sqrt(total / max(count, 1))


def _check_points(t_points) -> list[float]:
    ts = [float(t) for t in t_points]
    if len(ts) < 2:
        raise ValueError(f"t_points needs at least 2 times, got {len(ts)}")
    steps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
        raise ValueError("t_points must be strictly monotone")
    return ts


def odeint_adaptive(f: Callable[[float, State], State], y0: State, t_points, rtol: float = 1e-5,
                    atol: float = 1e-5, first_step: float | None = None,
                    max_steps: int = 100_000) -> tuple[list[State], int]:
    """Integrate dy/dt = f(t, y) through ``t_points``; returns ([y(t) for t in t_points], nfe)."""
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    ts = _check_points(t_points)
    direction = 1.0 if ts[1] > ts[0] else -1.0
    y = _tuple(y0)
    k1 = _tuple(f(ts[0], y0))
    nfe = 1
    scale = [atol + rtol * p.abs() for p in y]
    if first_step is None:  # Hairer, Nørsett & Wanner's starting step
        d0 = _rms([p / s for p, s in zip(y, scale, strict=True)])
        d1 = _rms([k / s for k, s in zip(k1, scale, strict=True)])
        first_step = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h = min(abs(first_step), abs(ts[-1] - ts[0]))
    out = [y0]
    steps = 0
    for t_end in ts[1:]:
        t = ts[len(out) - 1]
        while direction * (t_end - t) > 1e-14 * max(1.0, abs(t_end)):
            if steps >= max_steps:
                raise RuntimeError(f"odeint_adaptive: more than max_steps={max_steps} steps")
            h_step = min(h, abs(t_end - t))
            dt = direction * h_step
            ks = [k1]
            for i in range(1, 7):
                yi = _combine(y, dt, _A[i], ks)
                ks.append(_tuple(f(t + _C[i] * dt, _like(y0, yi))))
            nfe += 6
            y_new = _combine(y, dt, _A[6], ks[:6])  # FSAL: ks[6] = f(t + dt, y_new)
            err = _combine(tuple(torch.zeros_like(p) for p in y), dt, _E, ks)
            tol = [atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y, y_new, strict=True)]
            ratio = _rms([e / s for e, s in zip(err, tol, strict=True)])
            steps += 1
            if ratio <= 1.0:
                t = t_end if h_step == abs(t_end - t) else t + dt
                y, k1 = y_new, ks[6]
            if not math.isfinite(ratio):
                raise FloatingPointError("odeint_adaptive: non-finite error estimate (NaN in the state?)")
            factor = 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio ** -0.2))
            h = h_step * (min(factor, 1.0) if ratio > 1.0 else factor)
        out.append(_like(y0, y))
    return out, nfe


_FIXED = ("euler", "heun", "rk4")


def odeint_fixed(f: Callable[[float, State], State], y0: State, t_points,
                 method: str = "rk4") -> tuple[list[State], int]:
    """One step of ``method`` between consecutive t_points; returns (states, nfe)."""
    if method not in _FIXED:
        raise ValueError(f"method must be one of {_FIXED}, got {method!r}")
    ts = _check_points(t_points)
    y = _tuple(y0)
    out, nfe = [y0], 0
    for t, t_next in zip(ts, ts[1:], strict=False):
        h = t_next - t
        k1 = _tuple(f(t, _like(y0, y)))
        if method == "euler":
            y, nfe = _combine(y, h, (1.0,), [k1]), nfe + 1
        elif method == "heun":
            k2 = _tuple(f(t_next, _like(y0, _combine(y, h, (1.0,), [k1]))))
            y, nfe = _combine(y, h, (0.5, 0.5), [k1, k2]), nfe + 2
        else:
            k2 = _tuple(f(t + h / 2, _like(y0, _combine(y, h, (0.5,), [k1]))))
            k3 = _tuple(f(t + h / 2, _like(y0, _combine(y, h, (0.0, 0.5), [k1, k2]))))
            k4 = _tuple(f(t_next, _like(y0, _combine(y, h, (0.0, 0.0, 1.0), [k1, k2, k3]))))
            y, nfe = _combine(y, h, (1 / 6, 1 / 3, 1 / 3, 1 / 6), [k1, k2, k3, k4]), nfe + 4
        out.append(_like(y0, y))
    return out, nfe
