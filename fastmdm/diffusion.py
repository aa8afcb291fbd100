"""Linear multivariate diffusions: du = β(t) A u dt + sqrt(2β(t) D) dW, A = −(Q + D) Σ∞⁻¹.

One class, :class:`LinearDiffusion`, covers VP-SDE (K = 1), CLD (K = 2),
ALDA (K = 3), MALDA (any K) and learned (Q, D) (docs/math.md §1). K×K math is
float64; data tensors keep the caller's dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import dispatch
from .fused import fused_perturb, fused_transition
from .ops import apply_kk, compute_dtype
from .schedules import LinearBeta, TabulatedTau
from .stages import staged
from .transition import (
    TransitionKernel,
    correlation_condition,
    transition_kernel,
)
from .validation import check_choice, check_finite, check_int, check_like, check_number, check_shape

STARTS = ("hybrid", "full")
TIME_SLACK = 1e-6  # relative rounding allowed at the ends of [t_min, T] (or t's dtype's eps)
SKEW_TOL = 1e-10
PSD_TOL = 1e-10
MAX_CONDITION = 1e21  # largest κ₂ of Σ_{t_min}'s correlation matrix (see _check_representable)
FUSED_CONDITION = 1e12  # κ₂(C) up to which the Triton kernel serves (ALDA hybrid at t_min: 3.5e11)
VAR_RANGE = (1e-30, 1e30)  # stationary variances: sqrt and inverse representable in float32


def _as_matrix(M, name: str) -> Tensor:
    if not isinstance(M, Tensor):
        M = torch.as_tensor(M, dtype=torch.float64)
    if not M.is_floating_point():
        raise TypeError(f"{name} must be a floating-point matrix, got dtype {M.dtype}")
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"{name} must be a square K x K matrix with K >= 1, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} has non-finite entries")
    return M.to(torch.float64)


def check_skew(Q: Tensor, name: str = "Q") -> None:
    """Raise ValueError unless ‖Q + Qᵀ‖ ≤ tol·max(1, ‖Q‖)."""
    err = (Q + Q.T).abs().max().item()
    if err > SKEW_TOL * max(1.0, Q.abs().max().item()):
        raise ValueError(f"{name} must be skew-symmetric (Q = -Q^T); max |Q + Q^T| = {err:.3e}")


def check_psd(D: Tensor, name: str = "D") -> None:
    """Raise ValueError unless D is symmetric with eigenvalues ≥ −tol."""
    scale = max(1.0, D.abs().max().item())
    asym = (D - D.T).abs().max().item()
    if asym > SKEW_TOL * scale:
        raise ValueError(f"{name} must be symmetric; max |D - D^T| = {asym:.3e}")
    lam = torch.linalg.eigvalsh(D).min().item()
    if lam < -PSD_TOL * scale:
        raise ValueError(f"{name} must be positive semi-definite; smallest eigenvalue {lam:.3e}")


def check_hurwitz(A: Tensor) -> None:
    """Raise ValueError unless every eigenvalue of A has negative real part (convergence)."""
    lam = torch.linalg.eigvals(A).real.max().item()
    if not lam < -1e-9:
        raise ValueError(
            "the drift A = -(Q + D) Sigma_inf^-1 must be Hurwitz (all eigenvalues with negative "
            f"real part) for the diffusion to converge to N(0, Sigma_inf); max real part {lam:.3e}. "
            "Some variable receives no noise and is not coupled (through Q) to one that does."
        )


class LinearDiffusion(nn.Module):
    """A linear MDM: du = −β(t)(Q + D) Σ∞⁻¹ u dt + sqrt(2β(t) D) dW on K variables.

    β(t) = β_min + (β_max − β_min) t on [t_min, T] unless a ``schedule`` (:mod:`fastmdm.schedules`:
    β, τ = ∫β and τ⁻¹) is given; stationary law N(0, Σ∞), Σ∞ = diag(stationary_var). Hybrid-start
    auxiliaries are N(0, init_aux_var).
    """

    def __init__(
        self,
        Q: Tensor | nn.Module,
        D: Tensor | nn.Module,
        *,
        beta_min: float = 0.1,
        beta_max: float = 10.0,
        t_min: float = 1e-3,
        T: float = 1.0,
        init_aux_var: float = 0.01,
        stationary_var: float | Sequence[float] = 1.0,
        name: str = "linear",
        schedule: LinearBeta | TabulatedTau | None = None,
    ):
        super().__init__()
        self._register_matrix("Q", Q)
        self._register_matrix("D", D)
        Qm, Dm = self.Q.detach(), self.D.detach()
        if Qm.shape != Dm.shape:
            raise ValueError(
                f"Q and D must have the same K x K shape, got {tuple(Qm.shape)} and {tuple(Dm.shape)}"
            )
        check_skew(Qm)
        check_psd(Dm)
        K = self.K = Qm.shape[0]
        self.name = name
        check_number(T, "T", 0.0, low_open=True)
        check_number(t_min, "t_min", 0.0, T)
        if not t_min < T:
            raise ValueError(f"need 0 <= t_min < T, got t_min={t_min}, T={T}")
        if schedule is None:
            check_number(beta_min, "beta_min", 0.0)
            check_number(beta_max, "beta_max")
            if not beta_min + (beta_max - beta_min) * T > 0:
                raise ValueError(f"beta_max must keep beta(t) > 0 on (0, T], got {beta_max}")
            schedule = LinearBeta(beta_min, beta_max)
        if not all(hasattr(schedule, attr) for attr in ("beta", "tau", "tau_inverse", "key")):
            raise TypeError("schedule must provide beta, tau, tau_inverse and key (see fastmdm.schedules), "
                            f"got {type(schedule).__name__}")
        if not schedule.tau(torch.tensor(float(t_min), dtype=torch.float64)) > 0:
            raise ValueError(f"t_min must have tau(t_min) > 0 (the data sits at tau = 0), got t_min={t_min}")
        check_number(init_aux_var, "init_aux_var", *VAR_RANGE)
        var = torch.as_tensor(stationary_var, dtype=torch.float64).flatten()
        if var.numel() == 1:
            var = var.expand(K).clone()
        if var.numel() != K or not ((var >= VAR_RANGE[0]) & (var <= VAR_RANGE[1])).all():
            raise ValueError(f"stationary_var must be a float or {K} floats in [{VAR_RANGE[0]:.0e}, "
                             f"{VAR_RANGE[1]:.0e}], got {stationary_var}")
        self.schedule = schedule
        self.t_min, self.T = float(t_min), float(T)
        self.init_aux_var = float(init_aux_var)
        self.register_buffer("stationary_var", var)
        check_hurwitz(self.A.detach())
        self._check_representable()

    def _check_representable(self) -> None:
        """Raise ValueError unless float64 can represent the transition at t_min.

        The rule (docs/math.md §2): for both starts, the correlation matrix
        C = diag(Σ)^-½ Σ diag(Σ)^-½ of Σ_{t_min} has κ₂(C) ≤ MAX_CONDITION = 1e21. Beyond
        1/eps₆₄ ≈ 4.5e15 no float64 matrix is a positive definite Σ_t; up to 1e21 the
        float64 L_t and L_t⁻ᵀ still exist and are computed (in double-double) to 1e-11;
        beyond, L_t⁻ᵀ (the score) is not determined even at 32 digits.
        """
        tau = self.tau(torch.tensor([self.t_min], dtype=torch.float64))
        A, two_d = self.A.detach(), 2.0 * self.D.detach()
        for start in STARTS:
            aux_var = self.init_aux_var if start == "hybrid" else None
            tk = transition_kernel(A, two_d, tau, aux_var, self.stationary_var)
            cond = correlation_condition(tk.chol).item()
            if not cond <= MAX_CONDITION:
                raise ValueError(
                    f"float64 cannot represent this diffusion at t_min={self.t_min}: Sigma_t "
                    f"({start} start) is singular to rounding (condition number of its "
                    f"correlation matrix {cond:.3e} > {MAX_CONDITION:.0e}). Raise "
                    "t_min (or beta_min), or add damping (D) on the data variable or on the "
                    "variables coupled to it.")

    def _register_matrix(self, name: str, value) -> None:
        """A fixed matrix becomes a float64 buffer; an nn.Module (a parametrization) a submodule."""
        if isinstance(value, nn.Module):
            setattr(self, f"{name}_param", value)
            _as_matrix(value().detach(), name)
        else:
            self.register_buffer(f"{name}_fixed", _as_matrix(value, name))

    @property
    def learned(self) -> bool:
        """True when Q or D comes from a learnable parametrization."""
        return hasattr(self, "Q_param") or hasattr(self, "D_param")

    # -- the matrices ---------------------------------------------------------------------
    @property
    def Q(self) -> Tensor:
        """Skew-symmetric K×K mixing matrix (float64)."""
        return self.Q_param() if hasattr(self, "Q_param") else self.Q_fixed

    @property
    def D(self) -> Tensor:
        """Symmetric PSD K×K diffusion matrix (float64)."""
        return self.D_param() if hasattr(self, "D_param") else self.D_fixed

    @property
    def A(self) -> Tensor:
        """Drift matrix A = −(Q + D) Σ∞⁻¹ (float64)."""
        return -(self.Q + self.D) / self.stationary_var

    def extra_repr(self) -> str:
        return f"name={self.name!r}, K={self.K}, schedule={self.schedule!r}, t=[{self.t_min}, {self.T}]"

    # -- time -----------------------------------------------------------------------------
    @property
    def beta_min(self) -> float:
        """β at the schedule's start (LinearBeta's β_min; a TabulatedTau's first rate)."""
        return self._schedule_value("beta_min")

    @property
    def beta_max(self) -> float:
        """β at the schedule's end (LinearBeta's β_max; a TabulatedTau's last rate)."""
        return self._schedule_value("beta_max")

    def _schedule_value(self, name: str) -> float:
        if not hasattr(self.schedule, name):  # an AttributeError here would read as the diffusion's own
            raise TypeError(f"{name} is not defined for the schedule {self.schedule!r}; use beta(t)")
        return getattr(self.schedule, name)

    def beta(self, t: Tensor) -> Tensor:
        """β(t), the schedule's rate (β_min + (β_max − β_min) t by default)."""
        return self.schedule.beta(t)

    def tau(self, t: Tensor) -> Tensor:
        """τ(t) = ∫ β, the schedule's integrated rate (β_min t + ½(β_max − β_min) t² by default)."""
        return self.schedule.tau(t)

    def tau_inverse(self, tau: Tensor) -> Tensor:
        """t with τ(t) = tau."""
        return self.schedule.tau_inverse(tau)

    def phi(self, t: Tensor) -> Tensor:
        """φ(τ(t)) = log(e^{τ(t)} − 1) = τ + log(−expm1(−τ)), stable for small and large τ (docs/math.md §4).

        Minus the log-SNR of a VP-SDE; φ' = β / (1 − e^{−τ}) is the importance density's shape,
        and τ = softplus(φ) inverts it.
        """
        tau = self.tau(t)
        return tau + torch.log(-torch.expm1(-tau))

    def with_t_min(self, t_min) -> LinearDiffusion:
        """This diffusion ending at another t_min (None: itself); Q, D and parameters are shared."""
        if t_min is None:
            return self
        if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0 < t_min < self.T:
            raise ValueError(f"t_min must be a number in (0, T = {self.T}), got {t_min!r}")
        other = copy.copy(self)
        other.t_min = float(t_min)
        return other

    def check_time(self, t, batch: int | None = None, device=None, name: str = "t") -> Tensor:
        """Validate t ∈ [t_min, T]; return it as a float64 tensor of shape (batch,) on ``device``.

        A scalar (Python float or 0-d tensor) is broadcast to the batch. t within the relative
        slack max(1e-6, eps of t's dtype) of [t_min, T] is clamped into it.
        """
        if isinstance(t, Tensor):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
            if device is not None and t.device != torch.device(device):
                raise ValueError(f"{name} is on {t.device} but the data is on {device}")
            slack = max(TIME_SLACK, torch.finfo(t.dtype).eps)  # t_min rounded to fp16 and back
            t = t.to(torch.float64)
            if t.dim() == 0:
                t = t.expand(batch if batch is not None else 1)
            if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
                raise ValueError(
                    f"{name} must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        else:
            try:
                value = float(t)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}") from None
            t = torch.full((batch or 1,), value, dtype=torch.float64, device=device)
            slack = TIME_SLACK
        if t.numel():
            lo, hi = t.min().item(), t.max().item()
            if not (lo >= self.t_min * (1 - slack) and hi <= self.T * (1 + slack)):
                raise ValueError(f"{name} must lie in [t_min, T] = [{self.t_min}, {self.T}], "
                                 f"got values in [{lo}, {hi}]")
        return t.clamp(self.t_min, self.T)

    # -- transition kernel ----------------------------------------------------------------
    def transition(self, t, start: str = "hybrid", dtype: torch.dtype | None = None,
                   device=None) -> TransitionKernel:
        """q(u_t | start) as (M_t, Σ_t, L_t, L_t⁻ᵀ), each (B, K, K), computed in float64.

        Returned in ``dtype`` (default: t's dtype if t is a tensor, else torch's default);
        t of any floating dtype (float16 and bfloat16 included) is computed in float64.
        """
        if dtype is None:
            dtype = t.dtype if isinstance(t, Tensor) else torch.get_default_dtype()
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        if device is None:
            device = t.device if isinstance(t, Tensor) else self.stationary_var.device
        check_choice(start, STARTS, "start")
        return self.transition_f64(self.check_time(t, device=device), start).to(dtype)

    @staged("transition")
    def transition_f64(self, t64: Tensor, start: str = "hybrid") -> TransitionKernel:
        """Transition kernel in float64 for an already validated float64 t of shape (B,) and start.

        The Triton kernel (float64 only, square-root form) serves unless some Σ_t has a
        correlation matrix with κ₂ > FUSED_CONDITION (a rank-deficient D at small t); then
        the torch path, which switches to double-double, does.
        """
        aux_var = self.init_aux_var if start == "hybrid" else None
        A, two_d = self.A.to(t64.device), 2.0 * self.D.to(t64.device)
        tau, var = self.tau(t64), self.stationary_var.to(t64.device)
        fused = dispatch("transition_coefficients", t64.device, self.K)
        if fused is not None:
            tk = fused_transition(fused, A, two_d, tau, aux_var, var)
            with torch.no_grad():  # the kernel is float64 only: a nearly singular Σ_t → torch
                if (correlation_condition(tk.chol) <= FUSED_CONDITION).all():
                    return tk
        distinct, inverse = torch.unique(tau.detach(), return_inverse=True)
        if tau.requires_grad or distinct.numel() == tau.numel():
            return transition_kernel(A, two_d, tau, aux_var, var)
        shared = transition_kernel(A, two_d, distinct, aux_var, var)  # one per distinct t
        return TransitionKernel(*(m[inverse] for m in shared))

    # -- the forward process on data ------------------------------------------------------
    def check_data(self, x: Tensor, start: str = "hybrid", name: str = "x0") -> None:
        """Raise unless x is a float tensor (B, *data_shape), or a state (B, K, …) for 'full'."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if start == "full":
            if x.dim() < 3 or x.shape[1] != self.K:
                raise ValueError(f"{name} for start='full' must be a state of shape "
                                 f"(B, K={self.K}, *data_shape), got {tuple(x.shape)}")
        elif x.dim() < 2:
            raise ValueError(f"{name} must have shape (B, *data_shape), got {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError(f"{name} has an empty batch")

    def check_state(self, u: Tensor, name: str = "u") -> None:
        """Raise unless u is a float state of shape (B, K, *data_shape)."""
        self.check_data(u, "full", name)

    def mean(self, m0: Tensor, tk: TransitionKernel, start: str = "hybrid") -> Tensor:
        """E[u_t | start]: M_t[:, :, 0] x₀ (hybrid, a rank-one update) or M_t u₀ (full)."""
        if start == "full":
            return apply_kk(tk.mean_coef, m0)
        a = tk.mean_coef[:, :, 0].to(m0.dtype)  # (B, K)
        return a.view(*a.shape, *([1] * (m0.dim() - 1))) * m0.unsqueeze(1)

    def _state_shape(self, x0: Tensor, start: str) -> tuple[int, ...]:
        """(B, K, *data_shape) of u_t: x0's own shape for the full start."""
        return tuple(x0.shape) if start == "full" else (x0.shape[0], self.K, *x0.shape[1:])

    def perturb(self, x0: Tensor, t, start: str = "hybrid", generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw u_t = M_t m₀ + L_t ε, ε ~ N(0, I); returns (u_t, ε), each (B, K, *data_shape).

        x0 is data (B, *data_shape) for the hybrid start, a state (B, K, *data_shape)
        for the full start; ``noise`` optionally supplies ε.
        """
        check_choice(start, STARTS, "start")
        self.check_data(x0, start)
        check_finite(x0, "x0")
        t64 = self.check_time(t, batch=x0.shape[0], device=x0.device)
        if noise is not None:
            check_like(noise, "noise", self._state_shape(x0, start), x0)
            check_finite(noise, "noise")
        return self.perturb_with_kernel(x0, self.transition_f64(t64, start), start, generator, noise)

    @staged("perturb")
    def perturb_with_kernel(self, x0: Tensor, tk: TransitionKernel, start: str = "hybrid",
                            generator: torch.Generator | None = None, noise: Tensor | None = None,
                            store_noise: bool = True):
        """u_t = M_t m₀ + L_t ε for an already computed (float64) kernel; inputs unchecked.

        ``store_noise=False`` lets the Triton path return a :class:`fastmdm.dsm.NoiseSeed`
        instead of ε (regenerated by :func:`fastmdm.dsm.weighted_dsm`); torch always stores ε.
        """
        fused = dispatch("perturb", x0.device, self.K)
        if fused is not None:
            return fused_perturb(fused, x0, tk, start, generator, noise, store_noise)
        if noise is None:
            noise = torch.randn(self._state_shape(x0, start), dtype=x0.dtype, device=x0.device,
                                generator=generator)
        work = compute_dtype(x0.dtype)  # float32 for float16/bfloat16 data, rounded once at the end
        u = self.mean(x0.to(work), tk, start) + apply_kk(tk.chol, noise.to(work))
        return u.to(x0.dtype), noise

    def prior_sample(self, shape, generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device=None) -> Tensor:
        """u_T ~ N(0, Σ∞): shape (B, *data_shape) -> a state (B, K, *data_shape) in ``dtype``
        (a floating dtype; default torch's)."""
        shape = check_shape(shape, "shape")
        dtype = dtype or torch.get_default_dtype()
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        device = device if device is not None else self.stationary_var.device
        eps = torch.randn((shape[0], self.K, *shape[1:]), dtype=dtype, device=device,
                          generator=generator)
        std = self.stationary_var.to(device=device, dtype=dtype).sqrt()
        return eps * std.view(1, self.K, *([1] * (len(shape) - 1)))

    def prior_log_prob(self, u: Tensor) -> Tensor:
        """log N(u; 0, Σ∞ ⊗ I_d) per sample, (B,), in float64."""
        self.check_state(u)
        var = self.stationary_var.to(u.device)
        d = u[0, 0].numel()
        quad = (u.to(torch.float64) ** 2 / var.view(1, -1, *([1] * (u.dim() - 2)))).flatten(1).sum(1)
        return -0.5 * (quad + d * (self.K * math.log(2 * math.pi) + var.log().sum()))


class SkewSymmetric(nn.Module):
    """Learnable skew-symmetric matrix Q = q − qᵀ (float64)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.q = nn.Parameter(init.to(torch.float64).clone())

    def forward(self) -> Tensor:
        return self.q - self.q.T


class DiagonalPSD(nn.Module):
    """Learnable diagonal D = diag(softplus(d)) + floor·I (float64), always ≻ 0."""

    def __init__(self, K: int, floor: float = 1e-3):
        super().__init__()
        self.floor = floor
        self.d = nn.Parameter(torch.zeros(K, dtype=torch.float64))

    def forward(self) -> Tensor:
        eye = torch.eye(self.d.shape[0], dtype=self.d.dtype, device=self.d.device)
        return torch.diag(F.softplus(self.d)) + self.floor * eye


class CholeskyPSD(nn.Module):
    """Learnable full D = R Rᵀ + floor·I with R lower triangular (float64), always ≻ 0."""

    def __init__(self, K: int, floor: float = 1e-3):
        super().__init__()
        self.floor = floor
        self.R = nn.Parameter(torch.eye(K, dtype=torch.float64))

    def forward(self) -> Tensor:
        R = self.R.tril()
        return R @ R.T + self.floor * torch.eye(R.shape[0], dtype=R.dtype, device=R.device)


def vpsde(sigma_min: float | None = None, sigma_max: float | None = None, **kwargs) -> LinearDiffusion:
    """VP-SDE (K = 1): Q = 0, D = ½, so f = −½βx and g² = β; x_t = α x₀ + sqrt(1 − α²) ε, α² = e^{−τ}.

    ``sigma_min``, ``sigma_max``: the range of σ = sqrt((1 − α²)/α²) = sqrt(e^τ − 1) (k-diffusion's
    noise levels) to cover: τ(T) = log(1 + σ_max²) sets β_max (with β_min = min(0.1, τ(T)/T) unless
    given: a constant β for small σ_max), τ(t_min) = log(1 + σ_min²) sets t_min.
    """
    kwargs.setdefault("name", "vpsde")
    T = kwargs.get("T", 1.0)
    if sigma_max is not None:
        tau_T = math.log1p(check_number(sigma_max, "sigma_max", 0.0, low_open=True) ** 2)
        beta_min = kwargs.setdefault("beta_min", min(0.1, tau_T / T))
        if not beta_min * T < 2 * tau_T:
            raise ValueError(f"sigma_max={sigma_max} needs beta_min < {2 * tau_T / T:.4g}, got {beta_min}")
        kwargs["beta_max"] = beta_min + 2 * (tau_T - beta_min * T) / T**2
    if sigma_min is not None:
        tau_min = math.log1p(check_number(sigma_min, "sigma_min", 0.0, low_open=True) ** 2)
        schedule = kwargs.get("schedule") or LinearBeta(kwargs.get("beta_min", 0.1),
                                                        kwargs.get("beta_max", 10.0))
        kwargs["t_min"] = float(schedule.tau_inverse(torch.tensor(tau_min, dtype=torch.float64)))
        if not kwargs["t_min"] < T:
            raise ValueError(f"sigma_min={sigma_min} must be below the diffusion's sigma at T "
                             f"(sigma_max={sigma_max})")
    return LinearDiffusion([[0.0]], [[0.5]], **kwargs)


def cld(aux_var: float = 1.0, **kwargs) -> LinearDiffusion:
    """Critically damped Langevin (K = 2): Q = [[0, −1], [1, 0]], D = diag(0, Γ), Γ = 2σ_a."""
    check_number(aux_var, "aux_var", *VAR_RANGE)
    gamma = 2.0 * math.sqrt(aux_var)
    kwargs.setdefault("name", "cld")
    kwargs.setdefault("stationary_var", [1.0, aux_var])
    return LinearDiffusion([[0.0, -1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, gamma]], **kwargs)


def cld_sgm(mass: float = 0.25, Gamma: float | None = None, beta0: float = 4.0, beta1: float = 0.0,
            gamma: float = 0.04, **kwargs) -> LinearDiffusion:
    """CLD in CLD-SGM's parameters (Dockhorn et al.; their config's m_inv = 1/M, beta0, beta1, gamma).

    dx = M⁻¹β v dt, dv = −β x dt − Γ M⁻¹β v dt + sqrt(2Γβ) dW, β(t) = beta0 + beta1·t (constant for
    beta1 = 0; beta0 = 0 allowed when beta1 > 0): Q = [[0, −1], [1, 0]], D = diag(0, Γ),
    Σ∞ = diag(1, M), velocity start N(0, γM). ``Gamma``: the friction, default critical damping 2√M
    (CLD-SGM's f = 2/sqrt(m_inv)). The defaults are its toy and CIFAR-10 configs.
    """
    check_number(mass, "mass", 0.0, low_open=True)
    check_number(gamma, "gamma", 0.0, low_open=True)
    Gamma = 2.0 * math.sqrt(mass) if Gamma is None else check_number(Gamma, "Gamma", 0.0, low_open=True)
    kwargs.setdefault("name", "cld_sgm")
    return LinearDiffusion([[0.0, -1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, Gamma]], beta_min=beta0,
                           beta_max=beta0 + beta1, stationary_var=[1.0, mass], init_aux_var=gamma * mass,
                           **kwargs)


def alda(aux_var: float = 1.0, gamma: float = 1.0, psi: float = 1.0, **kwargs) -> LinearDiffusion:
    """ALDA (K = 3): Q = [[0, −σ²_a, 0], [σ²_a, 0, −γ], [0, γ, 0]], D = diag(0, 0, ψσ²_a)."""
    a = check_number(aux_var, "aux_var", *VAR_RANGE)
    check_number(gamma, "gamma")
    check_number(psi, "psi", 0.0, low_open=True)
    Q = [[0.0, -a, 0.0], [a, 0.0, -gamma], [0.0, gamma, 0.0]]
    D = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, psi * a]]
    kwargs.setdefault("name", "alda")
    kwargs.setdefault("stationary_var", [1.0, a, a])
    return LinearDiffusion(Q, D, **kwargs)


def malda(K: int = 3, aux_var: float = 1.0, **kwargs) -> LinearDiffusion:
    """MALDA (any K ≥ 2): Q_ij = −1 (i < j), +1 (i > j); D = diag(0, Γ, …, Γ), Γ = 2σ_a."""
    check_int(K, "K", minimum=2)
    check_number(aux_var, "aux_var", *VAR_RANGE)
    Q = torch.ones(K, K, dtype=torch.float64).tril(-1)
    Q = Q - Q.T
    D = torch.diag(torch.tensor([0.0] + [2.0 * math.sqrt(aux_var)] * (K - 1), dtype=torch.float64))
    kwargs.setdefault("name", f"malda{K}")
    kwargs.setdefault("stationary_var", [1.0] + [aux_var] * (K - 1))
    return LinearDiffusion(Q, D, **kwargs)


def learned(K: int = 3, full_d: bool = False, init_noise: float = 0.0,
            generator: torch.Generator | None = None, **kwargs) -> LinearDiffusion:
    """Learnable (Q, D): Q = q − qᵀ, D = diag(softplus(d)) + 1e-3·I, or R Rᵀ + 1e-3·I if full_d.

    q starts at MALDA's pattern (strict lower ones, so Q_ij = ±1) plus
    ``init_noise``·N(0, 1); D starts at (log 2 + 1e-3)·I (diagonal) or 1.001·I (full).
    """
    check_int(K, "K")
    q = torch.ones(K, K, dtype=torch.float64).tril(-1)
    if init_noise:
        q = q + init_noise * torch.randn(K, K, dtype=torch.float64, generator=generator)
    D = CholeskyPSD(K) if full_d else DiagonalPSD(K)
    kwargs.setdefault("name", f"learned{K}")
    return LinearDiffusion(SkewSymmetric(q), D, **kwargs)
