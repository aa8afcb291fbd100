"""The benchmark cases: for a size (B, K, d) on a device, the callables one row compares.

Every case builds a :class:`Workload` holding

* ``torch_path`` -- the fastmdm call (under backend "torch" it takes the torch path);
* ``fast``       -- a different fastmdm entry point for the fused path, when there is one;
* ``batched``    -- the published recipe run batched (``fastmdm.reference`` with
                    ``batched=True``): no loop over the batch, no fusion;
* ``reference``  -- :mod:`fastmdm.reference` as published, one loop iteration per sample.

:data:`CASES` is the one registry: ``fastmdm bench``, the pytest-benchmark suite
(benchmarks/test_suite.py) and benchmarks/bench_transition.py take their cases from it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch

from .. import reference
from ..backend import use_triton
from ..ops import apply_kk

# Times are drawn from [T_LOW, 1]: below t ≈ 0.05 the float32 reference's Cholesky fails for
# ALDA (docs/math.md §2), and the timings do not depend on t.
T_LOW = 0.1


class CaseSkipped(Exception):
    """A case cannot run here (a module it needs is missing); the reason goes in the report."""


@dataclasses.dataclass(frozen=True)
class Size:
    """Problem size of one benchmark row: batch B, variables K, data dim d, case extras."""

    B: int
    K: int
    d: int
    extra: tuple[tuple[str, int], ...] = ()

    def get(self, name: str) -> int:
        return dict(self.extra)[name]

    def label(self) -> str:
        return " ".join([f"B={self.B}", f"K={self.K}", f"d={self.d}"] + [f"{k}={v}" for k, v in self.extra])


@dataclasses.dataclass
class Workload:
    """The callables one case compares; each runs the whole operation on prepared inputs.

    ``torch_path``, ``fast``, ``batched`` and ``reference`` as in the module docstring
    (``fast`` and ``batched`` None where the case has none); ``floor_bytes`` the least memory
    traffic of the operation (memory-bound cases).
    """

    torch_path: Callable[[], object]
    reference: Callable[[], object]
    fast: Callable[[], object] | None = None
    batched: Callable[[], object] | None = None
    floor_bytes: int | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """A registry entry: ``build(size, device, dtype)`` prepares the inputs and returns the Workload."""

    name: str
    description: str
    build: Callable[[Size, torch.device, torch.dtype], Workload]
    memory_bound: bool = False


# -- shared inputs ----------------------------------------------------------------------------
def bench_diffusion(K: int, device: torch.device):
    """The built-in diffusion with K variables (VP-SDE, CLD, ALDA, MALDA-K), t ∈ [T_LOW, 1]."""
    from .. import diffusion as dmod

    if K == 1:
        diff = dmod.vpsde(t_min=T_LOW)
    elif K == 2:
        diff = dmod.cld(t_min=T_LOW)
    elif K == 3:
        diff = dmod.alda(t_min=T_LOW)
    else:
        diff = dmod.malda(K, t_min=T_LOW)
    return diff.to(device)


def _generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _times(B: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """B float64 times uniform on [T_LOW, 1] (fixed seed)."""
    g = _generator(device, seed)
    return T_LOW + (1.0 - T_LOW) * torch.rand(B, dtype=torch.float64, device=device, generator=g)


def _randn(shape, dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=_generator(device, seed))


def _reference_args(diff, dtype) -> dict:
    """Keyword arguments that make a fastmdm.reference call use ``diff``'s process."""
    return dict(beta_min=diff.beta_min, beta_max=diff.beta_max, init_aux_var=diff.init_aux_var,
                stationary_var=diff.stationary_var.to(dtype), dtype=dtype)


def _matrices(diff, dtype):
    return diff.Q.detach().to(dtype), diff.D.detach().to(dtype)


def _require(module: str, attr: str | None = None):
    """Import fastmdm.<module> (and an attribute) or raise CaseSkipped saying what is missing."""
    try:
        mod = importlib.import_module(f"fastmdm.{module}")
    except ImportError as err:
        raise CaseSkipped(f"fastmdm.{module} is not available ({err})") from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise CaseSkipped(f"fastmdm.{module}.{attr} is not available")
    return getattr(mod, attr)


def _network(size: Size, device, dtype, hidden: int = 128):
    MLPScore = _require("models", "MLPScore")
    torch.manual_seed(0)
    return MLPScore((size.d,), size.K, hidden=hidden, layers=2).to(device=device, dtype=dtype)


# -- the cases --------------------------------------------------------------------------------
def _build_transition(size: Size, device, dtype) -> Workload:
    diff = bench_diffusion(size.K, device)
    t64 = _times(size.B, device)
    Q, D = _matrices(diff, dtype)
    t_ref, ref_args = t64.to(dtype), _reference_args(diff, dtype)
    return Workload(
        torch_path=lambda: diff.transition_f64(t64, "hybrid"),
        reference=lambda: reference.transition(Q, D, t_ref, "hybrid", **ref_args),
        batched=lambda: reference.transition(Q, D, t_ref, "hybrid", batched=True, **ref_args),
        floor_bytes=size.B * 8 * (1 + 4 * size.K * size.K),  # read τ, write M, Σ, L, L⁻ᵀ (float64)
    )


def _build_perturb(size: Size, device, dtype) -> Workload:
    diff = bench_diffusion(size.K, device)
    t64 = _times(size.B, device)
    x0 = _randn((size.B, size.d), dtype, device, seed=2)
    Q, D = _matrices(diff, dtype)
    t_ref, ref_args = t64.to(dtype), _reference_args(diff, dtype)
    item = torch.finfo(dtype).bits // 8
    return Workload(
        torch_path=lambda: diff.perturb(x0, t64),
        reference=lambda: reference.perturb(Q, D, x0, t_ref, "hybrid", **ref_args),
        batched=lambda: reference.perturb(Q, D, x0, t_ref, "hybrid", batched=True, **ref_args),
        # read x0 and t, write u_t and the ε that perturb returns
        floor_bytes=size.B * (item * size.d * (1 + 2 * size.K) + 8),
    )


def _build_perturb_data(size: Size, device, dtype) -> Workload:
    """The data pass of the perturbation given the coefficients: u_t = a x0 + L ε, ε drawn.

    Fast on CUDA: the seeded Triton kernel (ε drawn in registers, never stored); torch path:
    randn + rank-one mean + batched K×K product; reference: the published randn + einsum.
    """
    diff = bench_diffusion(size.K, device)
    tk = diff.transition_f64(_times(size.B, device), "hybrid")
    x0 = _randn((size.B, size.d), dtype, device, seed=2)
    a, L = tk.mean_coef[:, :, 0].to(dtype), tk.chol.to(dtype)
    shape = (size.B, size.K, size.d)
    item = torch.finfo(dtype).bits // 8
    fast = None
    if use_triton(device):
        from ..kernels import NoiseSeed, perturb

        def fast():
            return perturb(x0, tk.mean_coef[:, :, 0], tk.chol, seed=NoiseSeed(1234))

    def torch_path():
        return diff.mean(x0, tk) + apply_kk(tk.chol, torch.randn(shape, dtype=dtype, device=device))

    def published():
        eps = torch.randn(shape, dtype=dtype, device=device)
        return a[:, :, None] * x0[:, None] + torch.einsum("bkl,bld->bkd", L, eps)

    return Workload(torch_path=torch_path, reference=published, fast=fast,
                    floor_bytes=size.B * item * size.d * (1 + size.K))  # read x0, write u_t


def _build_dsm_loss(size: Size, device, dtype) -> Workload:
    weighted_dsm = _require("dsm", "weighted_dsm")
    from ..objectives import dsm_weight

    diff = bench_diffusion(size.K, device)
    t64 = _times(size.B, device)
    eps_hat = _randn((size.B, size.K, size.d), dtype, device, seed=3)
    eps = _randn((size.B, size.K, size.d), dtype, device, seed=4)
    Q, D = _matrices(diff, dtype)
    t_ref, ref_args = t64.to(dtype), _reference_args(diff, dtype)
    item = torch.finfo(dtype).bits // 8
    return Workload(
        torch_path=lambda: weighted_dsm(eps_hat, eps, dsm_weight(diff, t64, diff.transition_f64(t64))),
        reference=lambda: reference.dsm_loss_weighted(eps_hat, eps, t_ref, Q, D, "hybrid", **ref_args),
        batched=lambda: reference.dsm_loss_weighted(eps_hat, eps, t_ref, Q, D, "hybrid", batched=True,
                                                    **ref_args),
        floor_bytes=size.B * (2 * item * size.K * size.d + 8 + item),  # read ε̂, ε, t; write (B,)
    )


def _build_hutchinson(size: Size, device, dtype) -> Workload:
    from ..divergence import hutchinson_divergence

    net = _network(size, device, dtype)
    t = _times(size.B, device).to(dtype)
    u = _randn((size.B, size.K, size.d), dtype, device, seed=5)
    probes = size.get("probes")

    def fn(x):
        return net(x, t)

    return Workload(
        torch_path=lambda: hutchinson_divergence(fn, u, probes=probes),
        reference=lambda: reference.hutchinson_divergence(fn, u, probes=probes),
    )


def _build_train_step(size: Size, device, dtype) -> Workload:
    """One optimiser step of the noise-prediction loss: fastmdm.MDM vs the reference loss."""
    MDM = _require("training", "MDM")
    diff = bench_diffusion(size.K, device)
    x0 = _randn((size.B, size.d), dtype, device, seed=6)
    Q, D = _matrices(diff, dtype)
    ref_args = _reference_args(diff, dtype)
    mdm = MDM(diff, _network(size, device, dtype), objective="noise")
    fast_opt = torch.optim.Adam(mdm.trainable_parameters(), lr=1e-4)

    def reference_step(batched: bool) -> Callable[[], None]:
        net = _network(size, device, dtype)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        return lambda: _optimiser_step(optimizer, lambda: reference.noise_prediction_loss(
            net, Q, D, x0, t_min=diff.t_min, T=diff.T, batched=batched, **ref_args))

    return Workload(
        torch_path=lambda: _optimiser_step(fast_opt, lambda: mdm.loss(x0)),
        reference=reference_step(batched=False),
        batched=reference_step(batched=True),
    )


def _optimiser_step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn().mean().backward()
    optimizer.step()


def _build_sampling(size: Size, device, dtype) -> Workload:
    """A sampling run of ``steps`` network evaluations from the prior (steps = 1: one step).

    fastmdm.sample with its Euler–Maruyama solver, the reference's algorithm.
    """
    sample = _require("sampling", "sample")
    if dtype != torch.get_default_dtype():
        raise CaseSkipped(f"fastmdm.sample draws the prior in torch's default dtype, not {dtype}")
    diff = bench_diffusion(size.K, device)
    net = _network(size, device, dtype)
    Q, D = _matrices(diff, dtype)
    ref_args = _reference_args(diff, dtype)
    steps, shape = size.get("steps"), (size.B, size.d)

    @torch.no_grad()
    def fast():
        return sample(net, diff, shape=shape, steps=steps, solver="euler-maruyama", denoise=False)

    def reference_run(batched: bool) -> Callable[[], torch.Tensor]:
        return torch.no_grad()(lambda: reference.euler_maruyama_sample(
            net, Q, D, shape, steps=steps, t_min=diff.t_min, T=diff.T, batched=batched, **ref_args))

    return Workload(torch_path=fast, reference=reference_run(batched=False),
                    batched=reference_run(batched=True),
                    note="Euler–Maruyama in fastmdm and in the reference")


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("transition", "transition coefficients (M, Σ, L, L⁻ᵀ) for B times", _build_transition),
        Case("perturb", "u_t = M_t x0 + L_t ε (hybrid start), returns (u_t, ε)", _build_perturb,
             memory_bound=True),
        Case("perturb_data", "u_t = a x0 + L ε given the coefficients (ε not stored when fused)",
             _build_perturb_data, memory_bound=True),
        Case("dsm_loss", "weighted DSM ½ Σ_j (ε̂−ε)ᵀ W_t (ε̂−ε), W_t from t", _build_dsm_loss,
             memory_bound=True),
        Case("hutchinson", "Hutchinson divergence of an MLP, `probes` Rademacher probes",
             _build_hutchinson),
        Case("sampler_step", "one sampler step from the prior (MLP, eps prediction)", _build_sampling),
        Case("sample_run", "a whole sampling run of `steps` network evaluations", _build_sampling),
        Case("train_step", "zero_grad + noise-prediction loss + backward + Adam step (MLP)",
             _build_train_step),
    )
}

