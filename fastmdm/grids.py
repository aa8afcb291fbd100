"""Time grids for the samplers, from T down to t_min (mdm-math.md §7), in float64.

- "quadratic" (the published grid): t_i = T − (T − t_min)(1 − (1 − i/N)²), small steps near the data;
- "uniform":   t_i = T − (T − t_min) i/N;
- "logsnr":    uniform in φ(t) = log(e^{τ(t)} − 1) (minus the log-SNR of a VP-SDE), inverted in closed
  form by τ = softplus(φ) and t = τ⁻¹(τ) — nearly uniform in log τ near the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion import LinearDiffusion
from .validation import check_choice, check_int

GRIDS = ("quadratic", "uniform", "logsnr")


def time_grid(diffusion: LinearDiffusion, steps: int, kind: str = "quadratic",
              t_min: float | None = None) -> Tensor:
    """The N + 1 times t_0 = T > … > t_N = t_min (default: the diffusion's), N = ``steps`` (float64)."""
    steps = check_int(steps, "steps")
    check_choice(kind, GRIDS, "grid")
    lo, hi = diffusion.t_min if t_min is None else t_min, diffusion.T
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "quadratic":
        t = hi - (hi - lo) * (1 - (1 - frac) ** 2)
    elif kind == "uniform":
        t = hi - (hi - lo) * frac
    else:
        phi_hi, phi_lo = diffusion.phi(torch.tensor([hi, lo], dtype=torch.float64))
        t = diffusion.tau_inverse(F.softplus(phi_hi + (phi_lo - phi_hi) * frac, threshold=30.0))
    t[0], t[-1] = hi, lo  # exact ends
    return t


__all__ = ["GRIDS", "time_grid"]
